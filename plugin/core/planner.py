"""Hop planner: an arrived object (and the operation that asked for it) in, the decision out.

Reasons and problem messages end up in the event log: they name objects by UID and never quote a
PatientID, a name, a birth date or a treatment date.

Implements the harvest rules of ``docs/harvest-rules.md`` (the paper's ten steps, section 2.1, plus
TomoTherapy doses, ion plans, deformable REGs, re-plans, planning MR and PET/CT frames of reference)
as a pure function. Each arrival is judged against the operation that retrieved it: candidates that
strict hierarchical sources forced us to retrieve only to inspect them (doses of other plans, REGs
of other frames of reference, series in another FoR) come back with ``keep=False`` and a reason.

What follows from an object (which hop, which role, which UIDs) is the rule book's
(:mod:`rtharvest.core.rulebook`, the same entries and functions the manifest checks completeness with); this module
turns them into operations and judges arrivals against them.

Images: every image of a series calls :func:`plan_arrival`; the series-level hops it plans do not
depend on the individual image, so later images produce operations with the same dedupe keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

from .classify import HarvestWindow, PlanClass, classify_plan, is_standard_intent
from .operations import (
    KIND_OF_MODALITY,
    FindReferencing,
    FindSeriesInFrameOfReference,
    FindTreatmentRecords,
    Operation,
    ReferenceCriterion,
    RetrieveInstance,
    RetrieveSeries,
    Role,
    UnpackMimSession,
)
from .references import ObjectKind, ObjectRefs, Problem, ProblemCode
from .rulebook import LinkName, link, names, promised_doses, promised_images, registered, structure_set_from_dose
from .sopclass import IMAGE_MODALITIES, Modality, SopClass
from .strategies import SearchStep, SourceCapability, search_steps

__all__ = [
    "Arrival",
    "Decision",
    "HarvestContext",
    "IdMismatch",
    "ReasonCode",
    "SearchStep",
    "SourceCapability",
    "leaves_kept_alone",
    "plan_arrival",
    "promised_doses",
    "promised_images",
    "search_steps",
    "start_operations",
]


class ReasonCode(StrEnum):
    """Why the planner decided as it did: what counts and decisions read (``rth_objects.reason_code``,
    ``Discarded.ByReason``); :data:`REASON_TEXT` holds the human text shown with it."""

    KEPT = "KEPT"
    UNREADABLE = "UNREADABLE"
    UNPACK_RETRIEVES_NOTHING = "UNPACK_RETRIEVES_NOTHING"
    MIM_SESSION_UNPACKED = "MIM_SESSION_UNPACKED"
    UNSOLICITED = "UNSOLICITED"
    NOT_A_RECORD = "NOT_A_RECORD"
    #: A record of a PatientIDs search whose PatientID is not the one searched (kept out, counted in
    #: ``PatientIDMismatches``: a harvest of 0 patients is never silent).
    PATIENT_ID_MISMATCH = "PATIENT_ID_MISMATCH"
    PATIENT_NOT_IN_WINDOW = "PATIENT_NOT_IN_WINDOW"
    OUT_OF_WINDOW = "OUT_OF_WINDOW"
    UNDATED_RECORD = "UNDATED_RECORD"
    NOT_THE_REQUESTED_INSTANCE = "NOT_THE_REQUESTED_INSTANCE"
    NOT_A_PLAN = "NOT_A_PLAN"
    NOT_A_STRUCTURE_SET = "NOT_A_STRUCTURE_SET"
    OTHER_KIND = "OTHER_KIND"
    NOT_REFERENCING = "NOT_REFERENCING"
    OTHER_MODALITY = "OTHER_MODALITY"
    OTHER_FRAME_OF_REFERENCE = "OTHER_FRAME_OF_REFERENCE"
    SERIES_ALREADY_COLLECTED = "SERIES_ALREADY_COLLECTED"
    NOT_IN_THE_REQUESTED_SERIES = "NOT_IN_THE_REQUESTED_SERIES"
    #: Set by ingest: an instance its source sent after the job that moved it ended.
    ARRIVED_AFTER_JOB_ENDED = "ARRIVED_AFTER_JOB_ENDED"
    #: Set by the harvester: a candidate an earlier harvest inspected and rejected for the same operation.
    INSPECTED_BEFORE = "INSPECTED_BEFORE"


#: The human text of each rejection (``str.format`` fields from the decision). Words only: no decision,
#: count or status reads it.
REASON_TEXT: dict[ReasonCode, str] = {
    ReasonCode.UNREADABLE: "unreadable object: cannot be checked against the request",
    ReasonCode.UNPACK_RETRIEVES_NOTHING: "unpacking a session retrieves nothing itself",
    ReasonCode.MIM_SESSION_UNPACKED: "Raw Data object (MIM session): unpacked, its RTSTRUCT/REG are judged on "
                                     "their own",
    ReasonCode.UNSOLICITED: "unsolicited {kind}: not requested by this harvest",
    ReasonCode.NOT_A_RECORD: "records search returned a {kind} object",
    ReasonCode.PATIENT_ID_MISMATCH: "PatientID mismatch: {how}; kept out, as two patients may differ only so",
    ReasonCode.PATIENT_NOT_IN_WINDOW: "record of a patient not in the window's PatientIDs",
    ReasonCode.OUT_OF_WINDOW: "treatment date outside the window",
    ReasonCode.UNDATED_RECORD: "record without TreatmentDate: outside the window",
    ReasonCode.NOT_THE_REQUESTED_INSTANCE: "not the requested instance {uid}",
    ReasonCode.NOT_A_PLAN: "referenced plan is not an RT plan",
    ReasonCode.NOT_A_STRUCTURE_SET: "referenced structure set is not an RTSTRUCT",
    ReasonCode.OTHER_KIND: "candidate is {kind}, searched {modality}",
    ReasonCode.NOT_REFERENCING: "candidate {modality} does not reference {criterion} {uids}",
    ReasonCode.OTHER_MODALITY: "{modality} is not one of {modalities}",
    ReasonCode.OTHER_FRAME_OF_REFERENCE: "FoR {found} is not {uid}",
    ReasonCode.SERIES_ALREADY_COLLECTED: "series already collected by another hop",
    ReasonCode.NOT_IN_THE_REQUESTED_SERIES: "not in the requested series {uid}",
    ReasonCode.ARRIVED_AFTER_JOB_ENDED: "arrived after job {job} ended (the source was still sending); not part "
                                        "of the harvest",
    ReasonCode.INSPECTED_BEFORE: "inspected before: {reason}",
}


def reason_text(code: ReasonCode, **fields: str) -> str:
    """The human text of ``code`` with its fields."""
    return REASON_TEXT[code].format(**fields)


class IdMismatch(StrEnum):
    """How a PatientID differs from the one it is compared with (the patient searched, or the plan)."""

    ABSENT = "ABSENT"
    PADDING = "PADDING"
    CASE = "CASE"
    OTHER = "OTHER"


#: Human text of each kind of PatientID mismatch (no PatientID in it: it is PHI).
MISMATCH_TEXT: dict[IdMismatch, str] = {
    IdMismatch.ABSENT: "the record has no PatientID",
    IdMismatch.PADDING: "the IDs differ only in padding (spaces)",
    IdMismatch.CASE: "the IDs differ only in letter case (the source matches PatientID case-insensitively)",
    IdMismatch.OTHER: "the record belongs to another patient (the source does not match PatientID exactly)",
}


def id_mismatch(found: str | None, expected: str | None) -> IdMismatch | None:
    """How ``found`` differs from ``expected`` (None when equal)."""
    if (found or "") == (expected or ""):
        return None
    if not found:
        return IdMismatch.ABSENT
    if found.strip() == (expected or "").strip():
        return IdMismatch.PADDING
    if found.strip().casefold() == (expected or "").strip().casefold():
        return IdMismatch.CASE
    return IdMismatch.OTHER


def patient_id_mismatch(found: str | None, searched: str) -> str:
    """Why a record of the searched patient's search is kept out (no PatientID in the text: it is PHI)."""
    kind = id_mismatch(found, searched) or IdMismatch.OTHER
    return MISMATCH_TEXT[kind]


@dataclass(frozen=True)
class HarvestContext:
    """What every decision of one harvest shares."""

    window: HarvestWindow
    harvest_id: str = ""
    #: ``RtHarvest.UnpackMimSessions``: REG searches also look at Raw Data objects (MIM sessions), and a
    #: session that arrives is unpacked (:class:`UnpackMimSession`) instead of being judged itself.
    unpack_mim_sessions: bool = False


@dataclass(frozen=True)
class Arrival:
    """An object that reached the store: its references, the operation that asked for it (``None``
    when it arrived unasked) and whether it was retrieved only to be inspected (``candidate``: a probe
    instance of a series whose FoR the source could not report, or a reverse-search candidate)."""

    refs: ObjectRefs
    operation: Operation | None
    candidate: bool = False


@dataclass(frozen=True)
class Decision:
    """Keep (store with provenance) or discard the object, why, and what to do next.

    ``keep=False`` judges this arrival only: an inspected candidate may already be kept under another
    role (a record of another treated plan, a series of two plans), so the harvester deletes or
    quarantines an object only when no decision of the harvest keeps it.
    ``problems`` holds the object's extraction problems followed by the planner's own findings.
    """

    keep: bool
    reason: str
    operations: tuple[Operation, ...] = ()
    problems: tuple[Problem, ...] = ()
    code: ReasonCode = ReasonCode.KEPT


def start_operations(ctx: HarvestContext) -> tuple[Operation, ...]:
    """The seed queries (rule 1): one records search per listed patient, else one per calendar month of
    the window (separate jobs: each has its own timeout, retries and a small answer list); a window of more
    than :data:`MAX_CHUNKS` months is cut into that many runs of whole months."""
    if ctx.window.patient_ids:
        return tuple(FindTreatmentRecords(ctx.window, pid) for pid in ctx.window.patient_ids)
    chunks = month_chunks(ctx.window.date_from, ctx.window.date_to)
    if len(chunks) > MAX_CHUNKS:
        # A long window (years) in runs of several months: each job still holds a bounded answer list,
        # without a C-FIND per month of history.
        per = -(-len(chunks) // MAX_CHUNKS)
        chunks = [(chunks[i][0], chunks[min(i + per, len(chunks)) - 1][1]) for i in range(0, len(chunks), per)]
    if len(chunks) <= 1:
        return (FindTreatmentRecords(ctx.window, None),)
    return tuple(FindTreatmentRecords(ctx.window, None, chunk_from=lo, chunk_to=hi) for lo, hi in chunks)


#: At most this many record-search jobs for one dated window. Every job costs at least one C-FIND whatever
#: its months hold, so this is the window's fixed cost: a year runs month by month; a longer window (a
#: first harvest of a clinic's history) in twelve runs of whole months, each still with its own timeout,
#: retries and an answer list bounded by what a run of months holds.
MAX_CHUNKS = 12


def month_chunks(date_from: str | None, date_to: str | None) -> list[tuple[str, str]]:
    """``[from, to]`` cut at calendar month boundaries (inclusive ``YYYYMMDD`` pairs); ``[]`` when a bound is
    open (an open range cannot be cut)."""
    if not date_from or not date_to:
        return []
    chunks: list[tuple[str, str]] = []
    lo = date(int(date_from[:4]), int(date_from[4:6]), int(date_from[6:]))
    end = date(int(date_to[:4]), int(date_to[4:6]), int(date_to[6:]))
    while lo <= end:
        if lo.year == date.max.year and lo.month == 12:  # DA allows 9999-12: no month after it
            chunks.append((_da(lo), _da(end)))
            break
        next_month = date(lo.year + lo.month // 12, lo.month % 12 + 1, 1)
        hi = min(end, next_month - timedelta(days=1))
        chunks.append((_da(lo), _da(hi)))
        lo = next_month
    return chunks


def _da(day: date) -> str:
    # strftime("%Y") drops leading zeros of years before 1000 on glibc; DICOM DA needs all eight digits.
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def plan_arrival(arrival: Arrival, ctx: HarvestContext) -> Decision:
    """Decide on an arrived object and plan the next operations (pure; see the module docstring)."""
    if not ctx.unpack_mim_sessions:
        return _plan_rules(arrival, ctx)
    op = arrival.operation
    if op is not None and arrival.refs.sop_class_uid == SopClass.RAW_DATA.value:
        return _mim_session(arrival.refs, op)
    decision = _plan_rules(arrival, ctx)
    return _with_session_searches(decision) if decision.operations else decision


def _plan_rules(arrival: Arrival, ctx: HarvestContext) -> Decision:
    refs, op = arrival.refs, arrival.operation
    if refs.kind is ObjectKind.UNREADABLE:
        if isinstance(op, (RetrieveInstance, RetrieveSeries)):
            return _decide(refs, True, "requested object is unreadable: kept as evidence, not followed")
        return _reject(refs, ReasonCode.UNREADABLE)
    if op is None:
        return _unsolicited(refs, ctx)
    if isinstance(op, FindTreatmentRecords):
        return _seed_record(refs, ctx, op.patient_id)
    if isinstance(op, FindReferencing):
        return _referencing(refs, op)
    if isinstance(op, FindSeriesInFrameOfReference):
        return _for_series(refs, op, arrival.candidate)
    if isinstance(op, RetrieveInstance):
        return _instance(refs, op)
    if isinstance(op, UnpackMimSession):
        return _reject(refs, ReasonCode.UNPACK_RETRIEVES_NOTHING)
    return _series(refs, op)


# ---------------------------------------------------------------------------------------------------
# MIM sessions (RtHarvest.UnpackMimSessions)


def _mim_session(refs: ObjectRefs, op: Operation) -> Decision:
    """A Raw Data object reached by any operation: unpack it and judge what it carries, not the container.

    MIM keeps a session's REGs and RTSTRUCTs inside a Raw Data object, so the REG search of a FoR also
    retrieves the patient's Raw Data objects (:func:`_with_session_searches`); their embedded objects are
    judged against the REG search they stand in for. The container itself is not kept: it is a candidate
    the end-of-harvest cleanup removes (the embedded objects keep its UID in their provenance).
    """
    inner: Operation = op
    if isinstance(op, FindReferencing) and op.modality == Modality.RAW.value:
        inner = replace(op, modality=Modality.REG.value, hop=op.hop.as_registration_search())
    unpack = UnpackMimSession(refs.sop_uid, refs.patient_id, json.dumps(inner.to_dict(), sort_keys=True),
                              op.dedupe_key(), inner.role)
    return _reject(refs, ReasonCode.MIM_SESSION_UNPACKED, ops=[unpack])


def _with_session_searches(decision: Decision) -> Decision:
    """Every REG search also searches the same patient's Raw Data objects (MIM sessions carry REGs)."""
    extra: list[Operation] = [
        replace(o, modality=Modality.RAW.value, hop=o.hop.as_session_search())
        for o in decision.operations if isinstance(o, FindReferencing) and o.modality == Modality.REG.value
    ]
    if not extra:
        return decision
    return replace(decision, operations=decision.operations + tuple(extra))


# ---------------------------------------------------------------------------------------------------


def _decide(refs: ObjectRefs, keep: bool, reason: str, ops: list[Operation] | tuple[Operation, ...] = (),
            problems: list[Problem] | tuple[Problem, ...] = ()) -> Decision:
    return Decision(keep, reason, tuple(ops), refs.problems + tuple(problems))


def _reject(refs: ObjectRefs, code: ReasonCode, problems: list[Problem] | tuple[Problem, ...] = (),
            ops: list[Operation] | tuple[Operation, ...] = (), **fields: str) -> Decision:
    return Decision(False, reason_text(code, **fields), tuple(ops), refs.problems + tuple(problems), code)


def _by_uid(name: LinkName, sop_uid: str, pid: str | None, study_uid: str | None = None,
            series_uid: str | None = None, planning_fors: tuple[str, ...] = ()) -> RetrieveInstance:
    """The retrieve by UID of a forward link's target."""
    lk = link(name)
    assert lk.target is not None
    return RetrieveInstance(sop_uid, pid, study_uid, series_uid, lk.modality, lk.target, lk.hop, planning_fors)


def _series_op(name: LinkName, pid: str | None, study_uid: str | None, series_uid: str,
               planning_fors: tuple[str, ...] = ()) -> RetrieveSeries:
    """The series retrieve of a link whose target is a whole series."""
    lk = link(name)
    assert lk.target is not None
    return RetrieveSeries(pid, study_uid, series_uid, lk.target, lk.hop, planning_fors)


def _referencing_op(name: LinkName, pid: str | None, study_uid: str | None, uids: tuple[str, ...],
                    **context: Any) -> FindReferencing:
    """The reverse search of a link: candidates of its modality naming ``uids`` as its criterion says."""
    lk = link(name)
    assert lk.target is not None and lk.criterion is not None and lk.modality is not None
    return FindReferencing(lk.modality, pid, study_uid, ReferenceCriterion(lk.criterion, uids), lk.target, lk.hop,
                           **context)


def _for_op(name: LinkName, pid: str | None, for_uid: str, exclude: tuple[str, ...]) -> FindSeriesInFrameOfReference:
    """The frame-of-reference search of a link."""
    lk = link(name)
    assert lk.target is not None
    return FindSeriesInFrameOfReference(pid, for_uid, exclude, lk.target, lk.hop)


def _problem(code: ProblemCode, attribute: str, message: str) -> Problem:
    return Problem(code, attribute, message)


def _unsolicited(refs: ObjectRefs, ctx: HarvestContext) -> Decision:
    # Some R&V systems auto-forward treatment records; a pushed record in the window seeds the harvest
    # exactly like a queried one. Anything else cannot be attributed to a rule.
    if refs.kind is ObjectKind.RECORD:
        decision = _seed_record(refs, ctx, None)
        if decision.keep:
            return replace(decision, reason="unsolicited " + decision.reason)
    return _reject(refs, ReasonCode.UNSOLICITED, kind=refs.kind.value.lower())


def _seed_record(refs: ObjectRefs, ctx: HarvestContext, patient_id: str | None) -> Decision:
    if refs.kind is not ObjectKind.RECORD or refs.record is None:
        return _reject(refs, ReasonCode.NOT_A_RECORD, kind=refs.kind.value)
    if patient_id is not None and refs.patient_id != patient_id:
        return _reject(refs, ReasonCode.PATIENT_ID_MISMATCH, how=patient_id_mismatch(refs.patient_id, patient_id))
    if not ctx.window.includes_patient(refs.patient_id):
        return _reject(refs, ReasonCode.PATIENT_NOT_IN_WINDOW)
    date = refs.record.treatment_date
    if not ctx.window.includes(refs.patient_id, date):
        # Sources that ignore TreatmentDate matching (most non-relational ones) return every record.
        return _reject(refs, ReasonCode.OUT_OF_WINDOW if date else ReasonCode.UNDATED_RECORD)
    plans = names(LinkName.RECORD_PLAN, refs)
    if not plans:
        return _decide(refs, True, "seed record without a plan reference (nothing to follow)")
    ops: list[Operation] = [_by_uid(LinkName.RECORD_PLAN, uid, refs.patient_id) for uid in plans]
    return _decide(refs, True, "seed record treated in the window", ops)


def _instance(refs: ObjectRefs, op: RetrieveInstance) -> Decision:
    if refs.sop_uid != op.sop_uid:
        return _reject(refs, ReasonCode.NOT_THE_REQUESTED_INSTANCE, uid=op.sop_uid)
    problems: list[Problem] = []
    if op.patient_id is not None and refs.patient_id is not None and refs.patient_id != op.patient_id:
        # Kept: the reference is explicit and sources may format patient IDs differently (MIM vs ARIA).
        problems.append(_problem(ProblemCode.INCONSISTENT, "PatientID", "referenced object belongs to another "
                                 "patient than the referencing one (PatientID differs)"))
    if op.role is Role.PLAN:
        return _plan(refs, problems)
    if op.role is Role.STRUCTURE_SET:
        return _structure_set(refs, problems)
    if op.role in (Role.PLANNING_IMAGE, Role.REGISTERED_IMAGE):
        if refs.kind is not ObjectKind.IMAGE or not refs.series_uid:
            return _decide(refs, True, f"referenced {op.role.value.lower()} is not a CT/MR/PT image; "
                           "kept, not followed", (), problems)
        lk = link(LinkName.PLANNING_IMAGE_SERIES if op.role is Role.PLANNING_IMAGE
                  else LinkName.REGISTERED_IMAGE_SERIES)
        ops: list[Operation] = [_series_op(lk.name, refs.patient_id, refs.study_uid, uid, op.planning_fors)
                                for uid in names(lk.name, refs)]
        return _decide(refs, True, f"{op.role.value.lower()}: fetch its series", ops, problems)
    # Any other role asked by UID: keep, follow as an image of that role.
    return _image_followups(refs, op.role, op.planning_fors, problems)


def _plan(refs: ObjectRefs, problems: list[Problem]) -> Decision:
    if refs.kind is not ObjectKind.PLAN or refs.plan is None:
        problems.append(_problem(ProblemCode.INCONSISTENT, "SOPClassUID",
                                 f"record references {refs.sop_uid} as a plan but it is {refs.kind.value}"))
        return _reject(refs, ReasonCode.NOT_A_PLAN, problems)
    plan = refs.plan
    cls = classify_plan(plan)
    if cls is not PlanClass.VALID:
        # Rule 2: QA / non-patient plans are collected but never followed (a phantom is not research data).
        return _decide(refs, True, f"treated plan with intent {plan.intent}: {cls.value}, not followed", (),
                       problems)
    if not is_standard_intent(plan.intent):
        problems.append(_problem(ProblemCode.NONSTANDARD_VALUE, "PlanIntent",
                                 f"PlanIntent {plan.intent!r} is not a defined term; plan followed"))
    pid, uid = refs.patient_id, refs.sop_uid
    ops: list[Operation] = [
        # Rule 3 / step 4: every record of the patient naming the plan, whatever its date.
        _referencing_op(LinkName.PLAN_RECORD, pid, None, (uid,)),
    ]
    # Rule 4 / step 2.
    ops += [_by_uid(LinkName.PLAN_STRUCTURE_SET, ss, pid) for ss in names(LinkName.PLAN_STRUCTURE_SET, refs)]
    # Rule 5 / step 3: the plan's study searched for doses naming it.
    from_dose = structure_set_from_dose(refs)
    ops.append(_referencing_op(LinkName.PLAN_DOSE, pid, refs.study_uid, (uid,), plan_has_structure_set=not from_dose))
    kind = "ion plan" if plan.is_ion else "plan"
    why = f"treated {kind} ({plan.intent or 'no intent'})"
    if from_dose:
        why += "; no structure set reference (TomoTherapy-style): taken from its dose"
    # Related plans (re-plans, verified plans) are not followed: a predecessor is collected only when a
    # seed record treats it (rule 2), never through the plan-to-plan link.
    return _decide(refs, True, why, ops, problems)


def _structure_set(refs: ObjectRefs, problems: list[Problem]) -> Decision:
    if refs.kind is not ObjectKind.STRUCTURE_SET or refs.structure_set is None:
        problems.append(_problem(ProblemCode.INCONSISTENT, "SOPClassUID",
                                 f"{refs.sop_uid} referenced as a structure set is {refs.kind.value}"))
        return _reject(refs, ReasonCode.NOT_A_STRUCTURE_SET, problems)
    ss, pid = refs.structure_set, refs.patient_id
    # The study a series' first listing names: a search hint for hierarchical sources.
    study_of: dict[str, str | None] = {}
    for s in reversed(ss.referenced_series):
        study_of[s.series_uid] = s.study_uid
    ops: list[Operation] = [
        # Rule 6: the series named in RTReferencedSeriesSequence ...
        _series_op(LinkName.STRUCTURE_SET_SERIES, pid, study_of.get(series_uid), series_uid)
        for series_uid in names(LinkName.STRUCTURE_SET_SERIES, refs)
    ]
    for image_uid in names(LinkName.STRUCTURE_SET_IMAGE, refs):
        # ... and the series holding the first contour's image (steps 5-6). The image is fetched by UID
        # and its own Series/Study UIDs decide (the RTSTRUCT's listing may be incomplete or wrong); the
        # listing only serves as a search hint for hierarchical sources.
        listing = ss.series_listing(image_uid)
        ops.append(_by_uid(LinkName.STRUCTURE_SET_IMAGE, image_uid, pid, listing.study_uid if listing else None,
                           listing.series_uid if listing else None))
    if not ops:
        return _decide(refs, True, "structure set references no image series", (), problems)
    return _decide(refs, True, "structure set: fetch the planning series", ops, problems)


def leaves_kept_alone(op: Operation) -> bool:
    """True when ``op`` can neither change nor extend what its harvest already kept, so a kept object it
    offers again needs no second look (the worker then neither reads nor re-plans the stored copy).

    A reverse search that only keeps what matches, with no hop of its own, is such an operation: a plan's
    record search, and its dose search when the plan names its structure set. They offer every record or
    dose of the patient's studies again, most of them kept already (by the window's record search, or the
    search of another plan of the patient): at clinic scale about 16 records per plan, each a store look-up,
    a file read and a parse. A kept decision never changes (``Tracker.record``), so the answer is the same.
    Every other operation plans hops that depend on the role it asks for, which may differ from the role
    the object was kept under (see ``Harvester.plan_stored``).
    """
    return isinstance(op, FindReferencing) and not _referencing_follows_up(op)


def _referencing_follows_up(op: FindReferencing) -> bool:
    """Whether :func:`_referencing` may plan hops from what ``op`` finds (kept in step with it: the planner
    tests check every reverse search this says False of plans nothing)."""
    if op.modality == Modality.RAW.value:
        return True  # a MIM session is unpacked (and never kept itself)
    return op.role is Role.REGISTRATION or (op.role is Role.DOSE and not op.plan_has_structure_set)


def _referencing(refs: ObjectRefs, op: FindReferencing) -> Decision:
    expected = KIND_OF_MODALITY.get(op.modality)
    if refs.kind is not expected:
        return _reject(refs, ReasonCode.OTHER_KIND, kind=refs.kind.value, modality=op.modality)
    if not op.criterion.matches(refs):
        what = ", ".join(op.criterion.uids)
        return _reject(refs, ReasonCode.NOT_REFERENCING, modality=op.modality, criterion=op.criterion.kind.value,
                       uids=what)
    if op.role is Role.DOSE and refs.dose is not None:
        ops: list[Operation] = []
        if not op.plan_has_structure_set:
            # TomoTherapy: the plan has no ReferencedStructureSetSequence, its dose names the RTSTRUCT.
            ops = [_by_uid(LinkName.DOSE_STRUCTURE_SET, ss, refs.patient_id)
                   for ss in names(LinkName.DOSE_STRUCTURE_SET, refs)]
        return _decide(refs, True, f"dose of plan {', '.join(op.criterion.uids)}", ops)
    if op.role is Role.REGISTRATION and refs.registration is not None:
        return _registration(refs, op)
    return _decide(refs, True, f"{op.modality} referencing {', '.join(op.criterion.uids)}")


def _registration(refs: ObjectRefs, op: FindReferencing) -> Decision:
    reg = refs.registration
    assert reg is not None
    planning_fors = set(op.criterion.uids)
    pid = refs.patient_id
    fors_key = tuple(sorted(planning_fors))
    ops: list[Operation] = []
    found = registered(reg, planning_fors, set(op.exclude_series))
    # Rule 9: series referenced at series level (Common Instance Reference module), other than the
    # planning series. A series whose images sit in a planning FoR is fetched by rule 7's search already.
    ops += [_series_op(LinkName.REG_SERIES, pid, s.study_uid, s.series_uid, fors_key)
            for s, series_for in found.series if series_for is None or series_for not in planning_fors]
    # Images named only inside an item (no series-level reference): fetch one, then its series; an item
    # naming only a FoR: the registered series are that FoR's series.
    ops += [_by_uid(name, uid, pid, planning_fors=fors_key) if name is LinkName.REG_IMAGE
            else _for_op(name, pid, uid, ()) for name, uid in found.by_item]
    kind = "deformable registration" if reg.deformable else "registration"
    return _decide(refs, True, f"{kind} involving planning FoR {', '.join(sorted(planning_fors))}", ops)


def _for_series(refs: ObjectRefs, op: FindSeriesInFrameOfReference, candidate: bool) -> Decision:
    if refs.kind is not ObjectKind.IMAGE or (refs.modality or "") not in op.modalities:
        return _reject(refs, ReasonCode.OTHER_MODALITY, modality=refs.modality or refs.kind.value,
                       modalities="/".join(op.modalities))
    if refs.frame_of_reference_uid != op.for_uid:
        return _reject(refs, ReasonCode.OTHER_FRAME_OF_REFERENCE, found=refs.frame_of_reference_uid or "(none)",
                       uid=op.for_uid)
    if refs.series_uid in op.exclude_series:
        return _reject(refs, ReasonCode.SERIES_ALREADY_COLLECTED)
    if candidate and refs.series_uid:
        # A probe instance (the source does not return FrameOfReferenceUID): its series belongs.
        return _decide(refs, True, f"probe: series shares FoR {op.for_uid}",
                       [RetrieveSeries(refs.patient_id, refs.study_uid, refs.series_uid, op.role,
                                       op.hop, ())])
    return _image_followups(refs, op.role, (), [])


def _series(refs: ObjectRefs, op: RetrieveSeries) -> Decision:
    if refs.series_uid != op.series_uid:
        return _reject(refs, ReasonCode.NOT_IN_THE_REQUESTED_SERIES, uid=op.series_uid)
    return _image_followups(refs, op.role, op.planning_fors, [])


def _image_followups(refs: ObjectRefs, role: Role, planning_fors: tuple[str, ...],
                     problems: list[Problem]) -> Decision:
    """Series-level hops planned by (every) image of a series, depending on the series' role."""
    if refs.kind is not ObjectKind.IMAGE or (refs.modality or "") not in IMAGE_MODALITIES:
        return _decide(refs, True, f"{role.value.lower()}: {refs.modality or refs.kind.value} object kept, "
                       "not followed", (), problems)
    for_uid, pid = refs.frame_of_reference_uid, refs.patient_id
    if role in (Role.PLANNING_SERIES, Role.REGISTERED_SERIES) and not for_uid:
        problems.append(_problem(ProblemCode.MISSING_ATTRIBUTE, "FrameOfReferenceUID",
                                 "image without FrameOfReferenceUID: no FoR hops from its series"))
        return _decide(refs, True, f"{role.value.lower()} image without FoR", (), problems)
    ops: list[Operation] = []
    if role is Role.PLANNING_SERIES and for_uid and refs.series_uid:
        ops = [
            # Rule 7 / step 8: CT/MR/PT series sharing the planning FoR (PET/CT on the CT-sim side).
            _for_op(LinkName.PLANNING_FOR_SERIES, pid, for_uid, (refs.series_uid,)),
            # Rule 8 / step 7: REGs (rigid or deformable) involving the planning FoR.
            _referencing_op(LinkName.FOR_REG, pid, None, (for_uid,), exclude_series=(refs.series_uid,),
                            fixed_modality=refs.modality),
        ]
        return _decide(refs, True, "planning series image", ops, problems)
    if role is Role.REGISTERED_SERIES and for_uid and refs.series_uid:
        if for_uid in planning_fors:
            return _decide(refs, True, "registered series in a planning FoR (step 8 covers its FoR)", (),
                           problems)
        # Rule 10 / step 10: series sharing the registered series' FoR (PET/CT on the registered side).
        ops = [_for_op(LinkName.REGISTERED_FOR_SERIES, pid, for_uid, (refs.series_uid,))]
        return _decide(refs, True, "registered series image", ops, problems)
    return _decide(refs, True, f"{role.value.lower()} image", (), problems)

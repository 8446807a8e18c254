"""Validation and manifest: what a harvest (or the whole store) holds, plan by plan (pure, no I/O).

:func:`build_manifest` walks the references of the objects the harvester *kept* and classifies every
treated plan (a plan named by a kept seed treatment record) as ``Complete``, ``Incomplete``, ``Missing``
or ``Invalid`` following ``docs/harvest-rules.md``. It follows every link from the stored objects' own
references rather than trusting the role a harvest recorded for them: an object keeps the role under
which it *first* arrived (a series can be planning images of one plan and registered images of another),
and a manifest must describe the data as it is, not as the harvester believed it to be. What an object
names for each link, and what it promises, is the rule book's (:mod:`rtharvest.core.rulebook`): the same
entries and functions the planner plans with, so the two cannot disagree.

Everything missing is named, with a reason taken from the failed jobs (:class:`FailureInfo`): "not found
at source", "failed after N attempts: <last error>", a search that failed, a series only partly stored,
or a "dangling reference" when no job even tried (the reference was never reachable).

The caller supplies the I/O: the harvest's :class:`~rtharvest.store.tracking.ObjectRecord` rows, a function
reading one stored object's references (plans, structure sets, doses, registrations and delivery records:
images carry what is needed in their rows, and a record's row has its plan and date but not what it
delivered) and the failed jobs. ``harvest_id=None`` builds the manifest
of the whole store, the union over harvests.

The JSON form is docs/contract.md's ``{"Harvest", "Summary", "Plans"}`` plus extras (``Charts`` for the
Explorer page, ``Orphans`` and ``Failures`` for validation, a few per-plan lists the ground truth of the
synthetic clinic also reports); the CSV form has one row per plan and loads with ``pandas.read_csv``.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from ..store.jobqueue import CRASH_BUDGET_SPENT
from ..store.tracking import Decision, FailureCode, ObjectRecord
from ..web.httpapi import ApiError, HttpResponse
from .classify import INVALID_REASONS, classify_plan, registration_type
from .fractions import RecordFacts, count_fractions, fractions_planned
from .planner import IdMismatch, ReasonCode, id_mismatch
from .references import ObjectKind, ObjectRefs, PlanRefs, RegistrationRefs, extract_from_bytes
from .rulebook import (
    LinkName,
    link,
    names,
    promised_doses,
    promised_images,
    registered,
    search_what,
    structure_set_from_dose,
)
from .sopclass import Modality, SopClass, modality_of

__all__ = [
    "STATUSES",
    "FailureInfo",
    "Manifest",
    "ManifestService",
    "MissingLink",
    "PlanRow",
    "Summary",
    "build_manifest",
    "failure_from_job",
]

STATUSES = ("Complete", "Incomplete", "Missing", "Invalid")


class MissingCause(StrEnum):
    """Why a link is missing, as the code decisions read (``Missing[].Cause``); :data:`MISSING_TEXT` words it."""

    NOT_FOUND = "NOT_FOUND"  # no source holds it
    RETRIEVE_FAILED = "RETRIEVE_FAILED"  # its retrieve failed for good (errors, not absence)
    HARVESTER_FAILURE = "HARVESTER_FAILURE"  # the harvester kept dying while running the job
    SEARCH_FAILED = "SEARCH_FAILED"  # a search that could have found more failed: only the site can know
    PARTIALLY_STORED = "PARTIALLY_STORED"  # a series retrieve failed part-way: only the site can know
    PENDING = "PENDING"  # a job that would fetch it has not run yet
    DANGLING = "DANGLING"  # no job even tried: the reference was never reachable
    UNREADABLE = "UNREADABLE"  # stored, but its copy cannot be read


#: The words of each cause (``str.format`` fields); no status or decision reads them.
MISSING_TEXT: dict[MissingCause, str] = {
    MissingCause.NOT_FOUND: "not found at source",
    MissingCause.RETRIEVE_FAILED: "failed after {attempts} {plural}: {error}",
    MissingCause.HARVESTER_FAILURE: "harvester failure: {error}",
    MissingCause.SEARCH_FAILED: "search {why}",
    MissingCause.PARTIALLY_STORED: "partially stored: {why}",
    MissingCause.PENDING: "not retrieved yet (job pending)",
    MissingCause.DANGLING: "dangling reference",
    MissingCause.UNREADABLE: "stored copy could not be read",
}
#: ``What: IMAGES`` entries: several absent images of one series counted in one link.
IMAGES_TEXT = "{absent} of {listed} referenced image(s) not stored (first: {first}): {why}"

NOT_FOUND = MISSING_TEXT[MissingCause.NOT_FOUND]
DANGLING = MISSING_TEXT[MissingCause.DANGLING]
PENDING = MISSING_TEXT[MissingCause.PENDING]
UNREADABLE = MISSING_TEXT[MissingCause.UNREADABLE]
#: Causes a copy of the data can see too (an export's verification expects only these).
VISIBLE_IN_A_COPY = frozenset(set(MissingCause) - {MissingCause.SEARCH_FAILED, MissingCause.PARTIALLY_STORED})


@dataclass(frozen=True)
class Why:
    """A cause and its words."""

    cause: MissingCause
    text: str

    @classmethod
    def of(cls, cause: MissingCause, **fields: object) -> Why:
        """The cause worded by :data:`MISSING_TEXT`."""
        return cls(cause, MISSING_TEXT[cause].format(**fields))

#: Why an object of a plan's row has another PatientID than the plan (``PlanRow.patient_id_mismatches``):
#: collected all the same, as its UID links name the plan's chain (docs/harvest-rules.md, "Identity").
MISMATCH_KEPT_TEXT: dict[IdMismatch, str] = {
    IdMismatch.ABSENT: "no PatientID; collected by its UID link to the plan",
    IdMismatch.PADDING: "PatientID differs from the plan's only in padding; collected by its UID link",
    IdMismatch.CASE: "PatientID differs from the plan's only in letter case; collected by its UID link",
    IdMismatch.OTHER: "PatientID differs from the plan's; collected by its UID link to the plan",
}

#: Modalities of objects that are not image series (ImageSeries counts the others).
_NON_IMAGE_MODALITIES = frozenset(m.value for m in (Modality.RTRECORD, Modality.RTPLAN, Modality.RTSTRUCT,
                                                    Modality.RTDOSE, Modality.REG, Modality.RAW))
_IMAGE_ORDER = ("CT", "MR", "PT")
_SEARCH_KINDS = frozenset({"FindReferencing", "FindSeriesInFrameOfReference"})
#: Orphans listed at most (the count is always exact).
MAX_ORPHANS = 1000
#: Missing images of one series named one by one up to this many; beyond, one entry counts them.
MAX_IMAGES_NAMED = 3


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class FailureInfo:
    """A failed job as the manifest needs it: what it was after and why it gave up.

    ``target_uid`` is what the job looked for: the SOP Instance UID of a retrieve by UID, the series UID
    of a series retrieve, the criterion (plan UID or FoR UIDs, comma-separated) of a search.
    """

    kind: str
    target_uid: str
    role: str | None
    attempts: int
    last_error: str | None
    dimse_status: int | None = None
    job_id: int | None = None
    harvest_id: str | None = None
    #: What the failure means (the harvester's ``FailureCode``), never read from ``last_error``.
    code: FailureCode | None = None

    def targets(self) -> frozenset[str]:
        """Every UID the job was after (a search may name several)."""
        return frozenset(u.strip() for u in self.target_uid.split(",") if u.strip())

    def is_not_found(self) -> bool:
        """True when the job failed because no source holds the object (not a transient error)."""
        return self.code is FailureCode.NOT_FOUND

    def why(self) -> Why:
        """The cause and words of the ``Missing`` link this failure explains."""
        if self.is_not_found():
            return Why.of(MissingCause.NOT_FOUND)
        error = (self.last_error or "no error recorded").strip()
        if error.startswith(CRASH_BUDGET_SPENT):
            # The harvester kept dying, the source was never at fault (the queue writes this prefix itself).
            return Why.of(MissingCause.HARVESTER_FAILURE, error=error)
        if self.dimse_status is not None and f"{self.dimse_status:04X}" not in error.upper():
            error += f" (DIMSE status 0x{self.dimse_status:04X})"
        plural = "attempt" if self.attempts == 1 else "attempts"
        return Why.of(MissingCause.RETRIEVE_FAILED, attempts=self.attempts, plural=plural, error=error)

    def reason(self) -> str:
        """The ``Missing[].Reason`` this failure gives."""
        return self.why().text

    def to_json(self) -> dict[str, Any]:
        """JSON form (``Failures`` of the manifest)."""
        return {
            "Job": self.job_id,
            "Harvest": self.harvest_id,
            "Kind": self.kind,
            "Role": self.role,
            "Target": self.target_uid,
            "Attempts": self.attempts,
            "LastError": self.last_error,
            "DimseStatus": None if self.dimse_status is None else f"0x{self.dimse_status:04X}",
        }


def failure_from_job(job: Any, code: FailureCode | None = None) -> FailureInfo:
    """A :class:`FailureInfo` from a failed :class:`rtharvest.store.jobqueue.Job` (its payload is an operation) and
    the meaning of its failure (``Tracker.failure_codes``)."""
    payload: Mapping[str, Any] = job.payload or {}
    criterion = payload.get("criterion") or {}
    target = (payload.get("sop_uid") or payload.get("series_uid") or payload.get("for_uid")
              or ",".join(criterion.get("uids", [])) or payload.get("patient_id") or "")
    return FailureInfo(
        kind=str(job.kind), target_uid=str(target), role=payload.get("role"), attempts=int(job.attempts),
        last_error=job.last_error, dimse_status=job.dimse_status, job_id=int(job.id), harvest_id=job.harvest_id,
        code=code,
    )


# ---------------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class MissingLink:
    """A link a plan's references promise that the store does not hold."""

    what: str
    uid: str
    reason: str
    #: The code of ``reason`` (``None`` for entries that are not missing links: identity mismatches).
    cause: MissingCause | None = None

    @classmethod
    def because(cls, what: str, uid: str, why: Why) -> MissingLink:
        """A missing link with its cause."""
        return cls(what, uid, why.text, why.cause)

    def to_json(self, cause: bool = False) -> dict[str, str]:
        """``{"What", "UID", "Reason"}``; with ``cause``, also ``Cause`` (the :class:`MissingCause` code) when it
        has one: for readers that decide by it (an export's verification), not part of the manifest."""
        out = {"What": self.what, "UID": self.uid, "Reason": self.reason}
        if cause and self.cause is not None:
            out["Cause"] = self.cause.value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MissingLink:
        """The inverse of :meth:`to_json`; ``Reason`` may be left out (an export's verification compares
        links without the site's reasons, which a copy cannot know)."""
        cause = data.get("Cause")
        return cls(str(data["What"]), str(data["UID"]), str(data.get("Reason") or ""),
                   MissingCause(cause) if cause else None)


@dataclass
class PlanRow:
    """One treated plan of the manifest."""

    patient_id: str | None
    plan_uid: str
    plan_label: str | None = None
    plan_intent: str | None = None
    status: str = "Complete"
    #: Delivery records (RT Beams, Ion Beams, Brachy Treatment Records) of the plan.
    record_uids: list[str] = field(default_factory=list)
    #: TreatmentDate of each delivery record that has one, sorted.
    treatment_dates: list[str] = field(default_factory=list)
    structure_set_uid: str | None = None
    dose_uids: list[str] = field(default_factory=list)
    planning_series_uids: list[str] = field(default_factory=list)
    planning_for_series_uids: list[str] = field(default_factory=list)
    registration_uids: list[str] = field(default_factory=list)
    registration_types: dict[str, str] = field(default_factory=dict)
    registered_series_uids: list[str] = field(default_factory=list)
    registered_for_series_uids: list[str] = field(default_factory=list)
    missing: list[MissingLink] = field(default_factory=list)
    #: RT Treatment Summary Records of the plan: listed, never a fraction.
    summary_record_uids: list[str] = field(default_factory=list)
    #: Distinct fractions its delivery records deliver (rule: ``rtharvest.core.fractions``).
    fractions: int = 0
    #: NumberOfFractionsPlanned of the fraction group(s) delivered, from the plan (``None``: unknown).
    fractions_planned: int | None = None
    #: Why an ``Invalid`` plan is invalid (``classify.INVALID_REASONS``); None for the other statuses.
    invalid_reason: str | None = None
    #: Objects of the row whose PatientID is not the plan's: collected by their UID links (the identity rule).
    patient_id_mismatches: list[MissingLink] = field(default_factory=list)

    @property
    def treatments(self) -> int:
        """The contract's ``Treatments``: the fractions delivered (:attr:`fractions`), not records."""
        return self.fractions

    @property
    def records(self) -> int:
        """Delivery records found for the plan (summary records not included)."""
        return len(self.record_uids)

    @property
    def summary_records(self) -> int:
        """RT Treatment Summary Records found for the plan."""
        return len(self.summary_record_uids)

    @property
    def first_treatment(self) -> str | None:
        """Earliest TreatmentDate (YYYYMMDD) of its delivery records: the first fraction's date."""
        return self.treatment_dates[0] if self.treatment_dates else None

    @property
    def last_treatment(self) -> str | None:
        """Latest TreatmentDate (YYYYMMDD) of its delivery records."""
        return self.treatment_dates[-1] if self.treatment_dates else None

    def to_json(self, causes: bool = False) -> dict[str, Any]:
        """The contract's plan object. ``Treatments`` equals ``Fractions``; ``Fractions``,
        ``FractionsPlanned``, ``Records``, ``SummaryRecords``, ``RecordUIDs``, ``SummaryRecordUIDs``,
        ``PlanningForSeriesUIDs``, ``RegistrationTypes``, ``RegisteredForSeriesUIDs``, ``InvalidReason`` and
        ``PatientIDMismatches`` are extras; ``causes`` adds each missing link's ``Cause`` code
        (:meth:`MissingLink.to_json`)."""
        return {
            "PatientID": self.patient_id,
            "PlanUID": self.plan_uid,
            "PlanLabel": self.plan_label,
            "PlanIntent": self.plan_intent,
            "Status": self.status,
            "InvalidReason": self.invalid_reason,
            "Treatments": self.treatments,
            "Fractions": self.fractions,
            "FractionsPlanned": self.fractions_planned,
            "Records": self.records,
            "SummaryRecords": self.summary_records,
            "FirstTreatment": self.first_treatment,
            "LastTreatment": self.last_treatment,
            "RecordUIDs": list(self.record_uids),
            "SummaryRecordUIDs": list(self.summary_record_uids),
            "StructureSetUID": self.structure_set_uid,
            "DoseUIDs": list(self.dose_uids),
            "PlanningSeriesUIDs": list(self.planning_series_uids),
            "PlanningForSeriesUIDs": list(self.planning_for_series_uids),
            "RegistrationUIDs": list(self.registration_uids),
            "RegistrationTypes": dict(self.registration_types),
            "RegisteredSeriesUIDs": list(self.registered_series_uids),
            "RegisteredForSeriesUIDs": list(self.registered_for_series_uids),
            "Missing": [m.to_json(causes) for m in self.missing],
            "PatientIDMismatches": [m.to_json() for m in self.patient_id_mismatches],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlanRow:
        """A row from its JSON form (:meth:`to_json`). The JSON form keeps only the first and last
        TreatmentDate, so ``treatment_dates`` holds those two."""
        dates = sorted({d for d in (data.get("FirstTreatment"), data.get("LastTreatment")) if d})
        return cls(
            patient_id=data.get("PatientID"), plan_uid=str(data["PlanUID"]), plan_label=data.get("PlanLabel"),
            plan_intent=data.get("PlanIntent"), status=str(data.get("Status") or "Complete"),
            record_uids=list(data.get("RecordUIDs") or []), treatment_dates=dates,
            structure_set_uid=data.get("StructureSetUID"), dose_uids=list(data.get("DoseUIDs") or []),
            planning_series_uids=list(data.get("PlanningSeriesUIDs") or []),
            planning_for_series_uids=list(data.get("PlanningForSeriesUIDs") or []),
            registration_uids=list(data.get("RegistrationUIDs") or []),
            registration_types=dict(data.get("RegistrationTypes") or {}),
            registered_series_uids=list(data.get("RegisteredSeriesUIDs") or []),
            registered_for_series_uids=list(data.get("RegisteredForSeriesUIDs") or []),
            missing=[MissingLink.from_json(m) for m in data.get("Missing") or []],
            summary_record_uids=list(data.get("SummaryRecordUIDs") or []),
            # A manifest written before Fractions existed said Treatments for the same place.
            fractions=int(data.get("Fractions", data.get("Treatments")) or 0),
            fractions_planned=None if data.get("FractionsPlanned") is None else int(data["FractionsPlanned"]),
            invalid_reason=data.get("InvalidReason"),
            patient_id_mismatches=[MissingLink.from_json(m) for m in data.get("PatientIDMismatches") or []],
        )


@dataclass
class Summary:
    """The Table-1 counts of a manifest.

    ``PlansCollected`` counts referenced plans that are stored (every status but ``Missing``);
    ``SuccessRate`` is ``Complete / (PlansReferenced - InvalidPlans)`` rounded to 4 decimals (QA plans are
    not patient data), 0.0 when no patient plan is referenced. ``PlansByIntent`` counts stored plans by
    PlanIntent (``NONE`` when absent), QA intents included; ``Registrations`` counts each REG once, by
    the type it has for the first plan (in manifest order) it serves.
    """

    patients: int = 0
    plans_referenced: int = 0
    plans_collected: int = 0
    success_rate: float = 0.0
    plans_by_intent: dict[str, int] = field(default_factory=dict)
    plans_by_status: dict[str, int] = field(default_factory=dict)
    invalid_plans: int = 0
    image_series: dict[str, int] = field(default_factory=dict)
    planning_series: int = 0
    registrations: dict[str, int] = field(default_factory=dict)
    #: Delivery records (RT Treatment Summary Records not included).
    treatment_records: int = 0
    #: Fractions delivered, summed over the plans (each plan's distinct fractions).
    fractions: int = 0
    #: RT Treatment Summary Records.
    summary_records: int = 0
    orphans: int = 0
    failed_jobs: int = 0
    #: Records kept out because their PatientID differs from the one searched: reason -> count.
    patient_id_mismatches: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The contract's ``Summary`` (``PlansByStatus``, ``OrphanObjects`` and ``FailedJobs`` are extras)."""
        return {
            "Patients": self.patients,
            "PlansReferenced": self.plans_referenced,
            "PlansCollected": self.plans_collected,
            "SuccessRate": self.success_rate,
            "PlansByIntent": dict(self.plans_by_intent),
            "PlansByStatus": dict(self.plans_by_status),
            "InvalidPlans": self.invalid_plans,
            "ImageSeries": dict(self.image_series),
            "PlanningSeries": self.planning_series,
            "Registrations": dict(self.registrations),
            "TreatmentRecords": self.treatment_records,
            "Fractions": self.fractions,
            "SummaryRecords": self.summary_records,
            "OrphanObjects": self.orphans,
            "FailedJobs": self.failed_jobs,
            "PatientIDMismatches": {"Count": sum(self.patient_id_mismatches.values()),
                                    "Reasons": dict(self.patient_id_mismatches)},
        }


@dataclass(frozen=True)
class PeriodCount:
    """Patients and plans whose first treatment falls in one month (``YYYY-MM``) or year (``YYYY``)."""

    period: str
    patients: int
    plans: int

    def to_json(self) -> dict[str, Any]:
        """``{"Period", "Patients", "Plans"}``."""
        return {"Period": self.period, "Patients": self.patients, "Plans": self.plans}


@dataclass(frozen=True)
class Orphan:
    """A kept object that no plan row accounts for (a harvester bug, or a plan whose chain changed)."""

    sop_uid: str
    role: str
    hop: str
    modality: str | None
    series_uid: str | None

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"SOPInstanceUID": self.sop_uid, "Role": self.role, "Hop": self.hop, "Modality": self.modality,
                "SeriesInstanceUID": self.series_uid}


CSV_COLUMNS = (
    "Harvest", "PatientID", "PlanUID", "PlanLabel", "PlanIntent", "Status", "Treatments", "Fractions",
    "FractionsPlanned", "Records", "SummaryRecords", "FirstTreatment", "LastTreatment", "StructureSetUID",
    "DoseUIDs", "PlanningSeriesUIDs", "PlanningForSeriesUIDs",
    "RegistrationUIDs", "RegistrationTypes", "RegisteredSeriesUIDs", "RegisteredForSeriesUIDs",
    "MissingWhat", "MissingUIDs", "MissingReasons", "InvalidReason",
)


def _iso_date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A CSV cell that no spreadsheet evaluates: text starting like a formula gets a leading ``'``.

    DICOM text (PlanLabel, PatientID) comes from whoever wrote the object; ``=HYPERLINK(...)`` in a plan
    label must stay text when a researcher opens the manifest in a spreadsheet. Numbers are left alone.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_list(values: Iterable[str]) -> str:
    # ";" separates list items; a ";" inside an item (only free-text reasons can hold one) would split it.
    return ";".join(str(v).replace(";", ",") for v in values)


@dataclass
class Manifest:
    """A harvest's (or the store's) manifest; :meth:`to_json` and :meth:`to_csv` are the two formats."""

    harvest_id: str | None
    summary: Summary
    plans: list[PlanRow]
    monthly: list[PeriodCount] = field(default_factory=list)
    yearly: list[PeriodCount] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    failures: list[FailureInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """``{"Harvest", "Summary", "Plans"}`` of docs/contract.md, plus ``Charts``, ``Orphans``, ``Failures``.

        ``Charts.Monthly``/``Yearly`` count patients and plans (QA plans excluded) by the month/year of
        their first treatment, every period between the first and the last present (zeros included), so
        a chart can draw them as they are. ``Failures`` lists failed jobs no plan row accounts for.
        """
        return {
            "Harvest": self.harvest_id,
            "Summary": self.summary.to_json(),
            "Plans": [p.to_json() for p in self.plans],
            "Charts": {
                "Monthly": [c.to_json() for c in self.monthly],
                "Yearly": [c.to_json() for c in self.yearly],
                "PlansByIntent": dict(self.summary.plans_by_intent),
                "PlansByStatus": dict(self.summary.plans_by_status),
            },
            "Orphans": [o.to_json() for o in self.orphans[:MAX_ORPHANS]],
            "Failures": [f.to_json() for f in self.failures],
        }

    def to_csv(self) -> str:
        """One row per plan with a header row; lists joined with ``;``, dates as ``YYYY-MM-DD``.

        ISO dates (not DICOM's ``YYYYMMDD``) so that pandas and spreadsheets read them as dates rather than
        integers; ``Missing`` is split into three parallel ``;``-lists (what, UID, reason).
        """
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for p in self.plans:
            writer.writerow(csv_cell(cell) for cell in [
                self.harvest_id or "",
                p.patient_id or "",
                p.plan_uid,
                p.plan_label or "",
                p.plan_intent or "",
                p.status,
                p.treatments,
                p.fractions,
                "" if p.fractions_planned is None else p.fractions_planned,
                p.records,
                p.summary_records,
                _iso_date(p.first_treatment),
                _iso_date(p.last_treatment),
                p.structure_set_uid or "",
                _csv_list(p.dose_uids),
                _csv_list(p.planning_series_uids),
                _csv_list(p.planning_for_series_uids),
                _csv_list(p.registration_uids),
                _csv_list(p.registration_types.get(uid, "?") for uid in p.registration_uids),
                _csv_list(p.registered_series_uids),
                _csv_list(p.registered_for_series_uids),
                _csv_list(m.what for m in p.missing),
                _csv_list(m.uid for m in p.missing),
                _csv_list(m.reason for m in p.missing),
                p.invalid_reason or "",
            ])
        return out.getvalue()


# ---------------------------------------------------------------------------------------------------
# Building


@dataclass
class _Series:
    uid: str
    modality: str | None
    for_uid: str | None
    patient_id: str | None
    instances: set[str] = field(default_factory=set)
    harvests: set[str] = field(default_factory=set)


def _kind_of(obj: ObjectRecord) -> str:
    """The object's modality from its SOP class, else its Modality attribute (converters write odd classes)."""
    by_class = modality_of(obj.sop_class_uid) if obj.sop_class_uid else None
    if by_class is not None:
        return by_class.value
    return (obj.modality or "").upper()


def _what(name: LinkName) -> str:
    """``Missing[].What`` of a link's absent target."""
    return link(name).what


def _month_range(first: str, last: str) -> list[str]:
    y, m = int(first[:4]), int(first[5:7])
    out: list[str] = []
    while f"{y:04d}-{m:02d}" <= last:
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


class _Builder:
    """One manifest computation; caches every read so each stored object is read at most once."""

    def __init__(self, objects: Sequence[ObjectRecord], read_refs: Callable[[ObjectRecord], ObjectRefs | None],
                 failures: Sequence[FailureInfo], pending: Collection[str]) -> None:
        self.read_refs = read_refs
        self.failures = list(failures)
        self.pending = frozenset(pending)
        # Union over harvests: an object is kept when any harvest kept it; the first kept row represents it.
        self.kept: dict[str, ObjectRecord] = {}
        self.seeds: dict[str, ObjectRecord] = {}
        for obj in objects:
            if obj.decision is not Decision.KEPT:
                continue
            self.kept.setdefault(obj.sop_uid, obj)
            if obj.role == "RECORD":
                self.seeds.setdefault(obj.sop_uid, obj)
        self.kinds = {uid: _kind_of(obj) for uid, obj in self.kept.items()}
        # Records a source returned for a patient search whose PatientID differs (case, padding): kept out.
        mismatched: dict[str, str] = {}
        for obj in objects:
            if obj.decision is Decision.REJECTED and obj.reason_code == ReasonCode.PATIENT_ID_MISMATCH.value \
                    and obj.sop_uid not in self.kept:
                mismatched.setdefault(obj.sop_uid, obj.reason)
        self.patient_id_mismatches = dict(sorted(Counter(mismatched.values()).items()))
        self.series: dict[str, _Series] = {}
        self.series_of_for: dict[str, list[str]] = {}
        for obj in objects:
            if obj.decision is not Decision.KEPT or not obj.series_uid:
                continue
            if self.kinds.get(obj.sop_uid, "") in _NON_IMAGE_MODALITIES:
                continue
            s = self.series.get(obj.series_uid)
            if s is None:
                s = self.series[obj.series_uid] = _Series(obj.series_uid, obj.modality, obj.frame_of_reference_uid,
                                                          obj.patient_id)
                if obj.frame_of_reference_uid:
                    self.series_of_for.setdefault(obj.frame_of_reference_uid, []).append(obj.series_uid)
            s.instances.add(obj.sop_uid)
            s.harvests.add(obj.harvest_id)
        # Rule 3: a record's row holds the plans it names (ingest and an export's verification store the
        # book's PLAN_RECORD names).
        self.records_of_plan: dict[str, list[ObjectRecord]] = {}
        for uid, obj in self.kept.items():
            if self.kinds[uid] == Modality.RTRECORD.value:
                for plan_uid in dict.fromkeys(obj.plan_uids):
                    self.records_of_plan.setdefault(plan_uid, []).append(obj)
        self._refs: dict[str, ObjectRefs | None] = {}
        self.doses_of_plan: dict[str, list[str]] = {}
        self.registrations: dict[str, RegistrationRefs] = {}
        #: Rule 8's keys of each REG: the FoRs it involves.
        self.registration_fors: dict[str, frozenset[str]] = {}
        for uid in self.kept:
            kind = self.kinds[uid]
            if kind == Modality.RTDOSE.value:
                refs = self.refs(uid)
                if refs is not None and refs.dose is not None:
                    for plan_uid in dict.fromkeys(names(LinkName.PLAN_DOSE, refs)):
                        self.doses_of_plan.setdefault(plan_uid, []).append(uid)
            elif kind == Modality.REG.value:
                refs = self.refs(uid)
                if refs is not None and refs.registration is not None:
                    self.registrations[uid] = refs.registration
                    self.registration_fors[uid] = frozenset(names(LinkName.FOR_REG, refs))
        self.failures_by_target: dict[str, list[FailureInfo]] = {}
        for f in self.failures:
            for target in f.targets():
                self.failures_by_target.setdefault(target, []).append(f)
        self.used_failures: set[int] = set()

    # -- helpers -----------------------------------------------------------------------------------

    def refs(self, uid: str) -> ObjectRefs | None:
        if uid not in self._refs:
            try:
                refs = self.read_refs(self.kept[uid])
            except ApiError:
                raise  # the reader refuses the whole request (e.g. 503 while the store is not ready)
            except Exception:  # one object failing to read must not take the manifest down: it is reported
                refs = None
            if refs is not None and refs.kind is ObjectKind.UNREADABLE:
                refs = None
            self._refs[uid] = refs
        return self._refs[uid]

    def _failure_for(self, uid: str, kinds: Collection[str], use: bool = True) -> FailureInfo | None:
        """The failure explaining why ``uid`` is absent (marked as attributed when ``use``)."""
        found = [f for f in self.failures_by_target.get(uid, ()) if f.kind in kinds]
        if not found:
            return None
        if use:
            self.used_failures.update(id(f) for f in found)
        # A definite "not found" beats a transient error; otherwise the most persistent failure speaks.
        return next((f for f in found if f.is_not_found()), max(found, key=lambda f: f.attempts))

    def absent_reason(self, uid: str) -> Why:
        """Why an object a reference names is not stored."""
        failure = self._failure_for(uid, ("RetrieveInstance", "RetrieveSeries"))
        if failure is not None:
            return failure.why()
        if uid in self.pending:
            return Why.of(MissingCause.PENDING)
        return Why.of(MissingCause.DANGLING)

    # -- one plan ------------------------------------------------------------------------------------

    def row(self, plan_uid: str, seeds: list[ObjectRecord]) -> PlanRow:
        row = PlanRow(patient_id=seeds[0].patient_id, plan_uid=plan_uid)
        plan_obj = self.kept.get(plan_uid)
        plan_refs = self.refs(plan_uid) if plan_obj is not None else None
        plan = plan_refs.plan if plan_refs is not None else None
        if plan_obj is None:
            row.status = "Missing"
            row.missing.append(MissingLink.because(_what(LinkName.RECORD_PLAN), plan_uid,
                                                   self.absent_reason(plan_uid)))
        elif plan_refs is None or plan is None:
            # Stored, but not readable as a plan: nothing can be followed or checked.
            row.status = "Incomplete"
            row.missing.append(MissingLink.because(_what(LinkName.RECORD_PLAN), plan_uid,
                                                   Why.of(MissingCause.UNREADABLE)))
        else:
            row.plan_label, row.plan_intent = plan.label, plan.intent
            plan_class = classify_plan(plan)
            if plan_class in INVALID_REASONS:
                row.status = "Invalid"
                row.invalid_reason = INVALID_REASONS[plan_class]
            else:
                self._follow(row, plan_refs, plan)
                row.status = "Incomplete" if row.missing else "Complete"
        records = sorted(self.records_of_plan.get(plan_uid, seeds),
                         key=lambda r: (r.treatment_date or "99999999", r.sop_uid))
        if row.status in ("Missing", "Invalid"):
            # Nothing was followed from the plan (rule 2): only its seed records belong to the row.
            seed_uids = {s.sop_uid for s in seeds}
            records = [r for r in records if r.sop_uid in seed_uids] or seeds
        self._treatments(row, records, plan)
        row.patient_id_mismatches = self._mismatches(row, plan_obj.patient_id if plan_obj else row.patient_id)
        return row

    def _treatments(self, row: PlanRow, records: Sequence[ObjectRecord], plan: PlanRefs | None) -> None:
        """The plan's delivery and summary records, fractions and dates (rule: ``rtharvest.core.fractions``).

        A record's delivery facts come from its stored copy (``read_refs``); one that cannot be read is
        a delivery record without fraction number (counted by its date)."""
        facts: list[RecordFacts] = []
        for r in records:
            summary = r.sop_class_uid == SopClass.RT_TREATMENT_SUMMARY_RECORD.value
            refs = None if summary else self.refs(r.sop_uid)
            delivery = refs.record.delivery if refs is not None and refs.record is not None else None
            facts.append(RecordFacts(r.sop_uid, summary, r.treatment_date, delivery))
            (row.summary_record_uids if summary else row.record_uids).append(r.sop_uid)
        groups = plan.fraction_groups if plan is not None else ()
        count = count_fractions(facts, groups[0][0] if len(groups) == 1 else None)
        row.fractions = count.fractions
        row.fractions_planned = fractions_planned(groups, count.groups) if groups else None
        row.treatment_dates = sorted(f.treatment_date for f in facts if f.treatment_date and not f.summary)

    def _mismatches(self, row: PlanRow, plan_pid: str | None) -> list[MissingLink]:
        """Every object of the row (a series once) whose PatientID is not the plan's, and how it differs."""
        out: list[MissingLink] = []
        objects = [("RTRECORD", u) for u in (*row.record_uids, *row.summary_record_uids)]
        if row.structure_set_uid:
            objects.append(("RTSTRUCT", row.structure_set_uid))
        objects += [("RTDOSE", u) for u in row.dose_uids] + [("REG", u) for u in row.registration_uids]
        for what, uid in objects:
            obj = self.kept.get(uid)
            kind = id_mismatch(obj.patient_id, plan_pid) if obj is not None else None
            if kind is not None:
                out.append(MissingLink(what, uid, MISMATCH_KEPT_TEXT[kind]))
        for uid in dict.fromkeys((*row.planning_series_uids, *row.planning_for_series_uids,
                                  *row.registered_series_uids, *row.registered_for_series_uids)):
            kind = id_mismatch(self.series[uid].patient_id, plan_pid)
            if kind is not None:
                out.append(MissingLink("SERIES", uid, MISMATCH_KEPT_TEXT[kind]))
        return out

    def _search_failures(self, row: PlanRow, uids: Iterable[str]) -> None:
        for uid in uids:
            for f in self.failures_by_target.get(uid, ()):
                if f.kind in _SEARCH_KINDS:
                    self.used_failures.add(id(f))
                    what = search_what(f.role)
                    link = MissingLink.because(what, uid, Why.of(MissingCause.SEARCH_FAILED, why=f.reason()))
                    if link not in row.missing:
                        row.missing.append(link)

    def _follow(self, row: PlanRow, plan_refs: ObjectRefs, plan: PlanRefs) -> None:
        """Rules 3-10 for a followed plan, from the stored objects' own references (the rule book's
        :func:`~rtharvest.core.rulebook.names` of each link)."""
        row.dose_uids = sorted(self.doses_of_plan.get(row.plan_uid, []))
        self._search_failures(row, [row.plan_uid])
        for dose_uid in promised_doses(plan):
            if dose_uid not in self.kept:
                row.missing.append(MissingLink.because(_what(LinkName.PLAN_DOSE), dose_uid,
                                                       self.absent_reason(dose_uid)))
        # Rule 4: the plan's structure set, or (TomoTherapy) the one its dose names.
        named = names(LinkName.PLAN_STRUCTURE_SET, plan_refs)
        ss_uid = named[0] if named else None
        if structure_set_from_dose(plan_refs):
            for dose_uid in row.dose_uids:
                dose_refs = self.refs(dose_uid)
                from_dose = names(LinkName.DOSE_STRUCTURE_SET, dose_refs) if dose_refs is not None else ()
                if from_dose:
                    ss_uid = from_dose[0]
                    break
        row.structure_set_uid = ss_uid
        if ss_uid is None:
            return
        ss_what = _what(LinkName.PLAN_STRUCTURE_SET)
        if ss_uid not in self.kept:
            row.missing.append(MissingLink.because(ss_what, ss_uid, self.absent_reason(ss_uid)))
            return
        ss_refs = self.refs(ss_uid)
        ss = ss_refs.structure_set if ss_refs is not None else None
        if ss_refs is None or ss is None:
            row.missing.append(MissingLink.because(ss_what, ss_uid, Why.of(MissingCause.UNREADABLE)))
            return
        planning = self._planning_series(row, ss_refs)
        row.planning_series_uids = sorted(planning)
        self._promised_images(row, promised_images(ss))
        planning_fors = {f for f in (self.series[u].for_uid for u in planning) if f}
        # Step 8: series sharing a planning FoR.
        row.planning_for_series_uids = sorted(
            u for f in planning_fors for u in self.series_of_for.get(f, []) if u not in planning)
        self._search_failures(row, sorted(planning_fors))
        # Step 7: REGs involving a planning FoR; step 9: the series they register.
        regs = sorted(uid for uid, fors in self.registration_fors.items() if fors & planning_fors)
        row.registration_uids = regs
        registered: list[str] = []
        for uid in regs:
            reg = self.registrations[uid]
            moving = self._registered_series(row, reg, planning, planning_fors)
            self._promised_images(row, promised_images(reg))
            for s in moving:
                if s not in registered:
                    registered.append(s)
            involved = self.registration_fors[uid]
            fixed = next((self.series[u] for u in sorted(planning) if self.series[u].for_uid in involved), None)
            row.registration_types[uid] = registration_type(
                fixed.modality if fixed else None, self.series[moving[0]].modality if moving else None)
        row.registered_series_uids = sorted(registered)
        # Step 10: series sharing a FoR with a registered series.
        registered_fors = sorted({f for f in (self.series[u].for_uid for u in registered) if f})
        taken = set(planning) | set(row.planning_for_series_uids) | set(registered)
        row.registered_for_series_uids = sorted(
            {u for f in registered_fors for u in self.series_of_for.get(f, []) if u not in taken})
        self._search_failures(row, registered_fors)
        # A series retrieve that failed part-way leaves a series that is present but short of instances.
        for uid in (*row.planning_series_uids, *row.planning_for_series_uids, *row.registered_series_uids,
                    *row.registered_for_series_uids):
            failure = self._failure_for(uid, ("RetrieveSeries",), use=False)
            harvests = self.series[uid].harvests
            if failure is not None and (failure.harvest_id is None or harvests == {failure.harvest_id}):
                self._failure_for(uid, ("RetrieveSeries",))
                row.missing.append(MissingLink.because("SERIES", uid, Why.of(MissingCause.PARTIALLY_STORED,
                                                                             why=failure.reason())))

    def _promised_images(self, row: PlanRow, promised: Mapping[str, str | None]) -> None:
        """Name the images an object promises that the store lacks (rule: ``rulebook.promised_images``).

        Grouped per series (the promising object's listing, else the series of the image's stored
        neighbours is unknown: one group): up to :data:`MAX_IMAGES_NAMED` are named one by one, more
        become one entry counting them with the first few UIDs. Images of a series already reported
        missing as a whole are not repeated.
        """
        reported = {m.uid for m in row.missing}
        by_series: dict[str, list[str]] = {}
        for uid, series_uid in promised.items():
            if uid in self.kept or uid in reported or (series_uid is not None and series_uid in reported):
                continue
            by_series.setdefault(series_uid or "", []).append(uid)
        for series_uid, absent in by_series.items():
            if len(absent) <= MAX_IMAGES_NAMED:
                row.missing.extend(MissingLink.because("IMAGE", uid, self._image_reason(uid, series_uid))
                                   for uid in absent)
                continue
            listed = sum(1 for s in promised.values() if s == series_uid) if series_uid else len(promised)
            first = ", ".join(absent[:MAX_IMAGES_NAMED])
            why = self._image_reason(absent[0], series_uid)
            row.missing.append(MissingLink(
                "IMAGES", series_uid or absent[0],
                IMAGES_TEXT.format(absent=len(absent), listed=listed, first=first, why=why.text), why.cause))

    def _image_reason(self, uid: str, series_uid: str) -> Why:
        """Why a promised image is absent: its own failed retrieve, else its series' (a series retrieve
        that failed part-way explains it better than "dangling"), else :meth:`absent_reason`."""
        direct = self._failure_for(uid, ("RetrieveInstance", "RetrieveSeries"), use=False)
        series_failure = self._failure_for(series_uid, ("RetrieveSeries",), use=False) if series_uid else None
        if direct is None and series_failure is not None:
            return series_failure.why()
        return self.absent_reason(uid)

    def _planning_series(self, row: PlanRow, ss_refs: ObjectRefs) -> list[str]:
        """Rule 6: the series the structure set names, then the first contour image's series."""
        planning: list[str] = []
        ss = ss_refs.structure_set
        assert ss is not None

        def add(series_uid: str) -> None:
            if series_uid in planning or any(m.uid == series_uid for m in row.missing):
                return
            if series_uid in self.series:
                planning.append(series_uid)
            else:
                row.missing.append(MissingLink.because(_what(LinkName.STRUCTURE_SET_SERIES), series_uid,
                                                       self.absent_reason(series_uid)))

        for series_uid in names(LinkName.STRUCTURE_SET_SERIES, ss_refs):
            add(series_uid)
        for image_uid in names(LinkName.STRUCTURE_SET_IMAGE, ss_refs):
            stored = self.kept.get(image_uid)
            if stored is not None and stored.series_uid:
                add(stored.series_uid)
            else:
                # Not stored: the listing naming it tells which series is missing, else the image is.
                listing = ss.series_listing(image_uid)
                if listing is not None:
                    add(listing.series_uid)
                else:
                    row.missing.append(MissingLink.because(_what(LinkName.STRUCTURE_SET_IMAGE), image_uid,
                                                           self.absent_reason(image_uid)))
        return planning

    def _registered_series(self, row: PlanRow, reg: RegistrationRefs, planning: list[str],
                           planning_fors: set[str]) -> list[str]:
        """Rule 9 for one REG (:func:`~rtharvest.core.rulebook.registered`): its listed series other than the
        planning ones, in reference order, then the series of FoR-only items (anatomical modality first).
        A listed series in a planning FoR is listed here too (the planner fetches it by rule 7's search)."""
        moving: list[str] = []
        found = registered(reg, planning_fors, set(planning))

        def add(series_uid: str) -> None:
            if series_uid in moving:
                return
            if series_uid in self.series:
                moving.append(series_uid)
            elif not any(m.uid == series_uid for m in row.missing):
                row.missing.append(MissingLink.because(_what(LinkName.REG_SERIES), series_uid,
                                                       self.absent_reason(series_uid)))

        for ref, _series_for in found.series:
            add(ref.series_uid)
        by_for: list[str] = []
        for name, uid in found.by_item:
            if name is LinkName.REG_IMAGE:
                stored = self.kept.get(uid)
                if stored is not None and stored.series_uid:
                    if stored.series_uid not in planning:
                        add(stored.series_uid)
                elif not any(m.uid == uid for m in row.missing):
                    row.missing.append(MissingLink.because(_what(LinkName.REG_IMAGE), uid, self.absent_reason(uid)))
            else:
                by_for += [u for u in self.series_of_for.get(uid, []) if u not in planning]
        order = {m: i for i, m in enumerate(_IMAGE_ORDER)}
        for uid in sorted(by_for, key=lambda u: (order.get(self.series[u].modality or "", 99), u)):
            if uid not in moving:
                moving.append(uid)
        return moving

    # -- whole manifest -------------------------------------------------------------------------------

    def rows(self) -> list[PlanRow]:
        seeds_of_plan: dict[str, list[ObjectRecord]] = {}
        for seed in sorted(self.seeds.values(),
                           key=lambda r: (r.patient_id or "", r.treatment_date or "", r.sop_uid)):
            for plan_uid in dict.fromkeys(seed.plan_uids):
                seeds_of_plan.setdefault(plan_uid, []).append(seed)
        rows = [self.row(uid, seeds) for uid, seeds in seeds_of_plan.items()]
        rows.sort(key=lambda r: (r.patient_id or "", r.first_treatment or "", r.plan_uid))
        return rows

    def orphans(self, rows: Sequence[PlanRow]) -> list[Orphan]:
        accounted: set[str] = set(self.seeds)
        for r in rows:
            accounted.update(r.record_uids)
            accounted.update(r.summary_record_uids)
            accounted.add(r.plan_uid)
            if r.structure_set_uid:
                accounted.add(r.structure_set_uid)
            accounted.update(r.dose_uids)
            accounted.update(r.registration_uids)
            for s in (*r.planning_series_uids, *r.planning_for_series_uids, *r.registered_series_uids,
                      *r.registered_for_series_uids):
                accounted.update(self.series[s].instances)
        return [Orphan(uid, obj.role, obj.hop, obj.modality, obj.series_uid)
                for uid, obj in self.kept.items() if uid not in accounted]

    def summary(self, rows: Sequence[PlanRow], orphans: int) -> Summary:
        # The plan counts as for any selection of rows; the whole harvest's patients (every seed), image
        # series (every stored series, orphans' too) and records (every kept record) on top.
        return replace(
            summarize_plans(rows, {}),
            patients=len({s.patient_id for s in self.seeds.values()}),
            image_series=count_by_modality(s.modality for s in self.series.values()),
            treatment_records=sum(1 for uid in self.kept if self.kinds[uid] == Modality.RTRECORD.value
                                  and self.kept[uid].sop_class_uid != SopClass.RT_TREATMENT_SUMMARY_RECORD.value),
            summary_records=sum(1 for obj in self.kept.values()
                                if obj.sop_class_uid == SopClass.RT_TREATMENT_SUMMARY_RECORD.value),
            orphans=orphans,
            failed_jobs=len(self.failures),
            patient_id_mismatches=self.all_mismatches(rows),
        )

    def all_mismatches(self, rows: Sequence[PlanRow]) -> dict[str, int]:
        """Records kept out (a PatientIDs search) and objects collected by UID whose PatientID is not their
        plan's (each object or series once, whatever number of plans it serves): reason → count."""
        counts = Counter(self.patient_id_mismatches)
        seen: set[str] = set()
        for r in rows:
            for m in r.patient_id_mismatches:
                if m.uid not in seen:
                    seen.add(m.uid)
                    counts[m.reason] += 1
        return dict(sorted(counts.items()))


def count_by_modality(modalities: Iterable[str | None]) -> dict[str, int]:
    """Image series by modality (``?`` when unknown), CT, MR, PT first."""
    images = Counter(m or "?" for m in modalities)
    order = {m: i for i, m in enumerate(_IMAGE_ORDER)}
    return {m: images[m] for m in sorted(images, key=lambda m: (order.get(m, 99), m))}


def summarize_plans(rows: Sequence[PlanRow], modality_of_series: Mapping[str, str | None]) -> Summary:
    """The Table-1 counts that a selection of plan rows shows by itself (:class:`Summary`'s rules): its
    patients, plans, intents, statuses, registrations, planning series, delivery and summary records
    (distinct record UIDs), fractions (each row's, summed) and image series (the distinct series its rows
    name, by ``modality_of_series``, ``?`` when unknown). Orphans, failed jobs and PatientID mismatches
    belong to a whole harvest: 0 here.
    """
    status = Counter(r.status for r in rows)
    intents = Counter(r.plan_intent or "NONE" for r in rows if r.status != "Missing")
    reg_types: dict[str, str] = {}
    for r in rows:
        for uid in r.registration_uids:
            reg_types.setdefault(uid, r.registration_types.get(uid, "?"))
    series = {u for r in rows for u in (*r.planning_series_uids, *r.planning_for_series_uids,
                                         *r.registered_series_uids, *r.registered_for_series_uids)}
    denominator = len(rows) - status["Invalid"]
    return Summary(
        patients=len({r.patient_id for r in rows}),
        plans_referenced=len(rows),
        plans_collected=len(rows) - status["Missing"],
        success_rate=round(status["Complete"] / denominator, 4) if denominator else 0.0,
        plans_by_intent=dict(sorted(intents.items())),
        plans_by_status={s: status[s] for s in STATUSES if status[s]},
        invalid_plans=status["Invalid"],
        image_series=count_by_modality(modality_of_series.get(u) for u in series),
        planning_series=len({u for r in rows for u in r.planning_series_uids}),
        registrations=dict(sorted(Counter(reg_types.values()).items())),
        treatment_records=len({u for r in rows for u in r.record_uids}),
        fractions=sum(r.fractions for r in rows),
        summary_records=len({u for r in rows for u in r.summary_record_uids}),
    )


def _timeline(rows: Sequence[PlanRow]) -> tuple[list[PeriodCount], list[PeriodCount]]:
    """Patients and plans by month/year of first treatment, QA plans excluded (a phantom is no patient)."""
    plan_month: dict[str, str] = {}
    patient_month: dict[str, str] = {}
    for r in rows:
        if r.status == "Invalid" or not r.first_treatment or len(r.first_treatment) < 6:
            continue
        month = f"{r.first_treatment[:4]}-{r.first_treatment[4:6]}"
        plan_month[r.plan_uid] = month
        key = r.patient_id or ""
        if key not in patient_month or month < patient_month[key]:
            patient_month[key] = month
    if not plan_month:
        return [], []
    plans_m, patients_m = Counter(plan_month.values()), Counter(patient_month.values())
    months = _month_range(min(plan_month.values()), max(plan_month.values()))
    monthly = [PeriodCount(m, patients_m[m], plans_m[m]) for m in months]
    plans_y = Counter(m[:4] for m in plan_month.values())
    patients_y = Counter(m[:4] for m in patient_month.values())
    years = [str(y) for y in range(int(months[0][:4]), int(months[-1][:4]) + 1)]
    yearly = [PeriodCount(y, patients_y[y], plans_y[y]) for y in years]
    return monthly, yearly


def build_manifest(
    harvest_id: str | None,
    objects: Sequence[ObjectRecord],
    read_refs: Callable[[ObjectRecord], ObjectRefs | None],
    failures: Sequence[FailureInfo] = (),
    *,
    pending: Collection[str] = (),
) -> Manifest:
    """The manifest of one harvest (``objects`` of that harvest) or of the store (``harvest_id=None``:
    the objects of every harvest, merged).

    Args:
        harvest_id: put in ``Harvest``; ``None`` for the whole store.
        objects: the harvest's decisions (``Tracker.objects``); rejected ones are ignored.
        read_refs: reads a *kept* object's references (called for plans, structure sets, doses,
            registrations and delivery records only, at most once each); ``None`` or an unreadable
            result when it cannot.
        failures: failed jobs of the harvest(s), for the reasons of missing links.
        pending: target UIDs of jobs still pending (a missing link then says "not retrieved yet").
    """
    builder = _Builder(objects, read_refs, failures, pending)
    rows = builder.rows()
    orphans = builder.orphans(rows)
    summary = builder.summary(rows, len(orphans))
    monthly, yearly = _timeline(rows)
    unattributed = [f for f in builder.failures if id(f) not in builder.used_failures]
    return Manifest(harvest_id, summary, rows, monthly, yearly, orphans, unattributed)


# ---------------------------------------------------------------------------------------------------
# Serving (the I/O around build_manifest, for the REST route)


class ManifestService:
    """``manifest(harvest_id, fmt) -> HttpResponse`` for :func:`rtharvest.web.rest.build_routes`.

    ``tracker`` and ``queue`` are the plugin's :class:`~rtharvest.store.tracking.Tracker` and
    :class:`~rtharvest.store.jobqueue.JobQueue`; ``read_file(orthanc_id)`` returns a stored instance's bytes
    (the harvester's local store), raising when it cannot. References are cached by Orthanc ID: a stored
    instance never changes, and a harvest's manifest is asked for again and again while it runs (the
    Explorer page refreshes it), so each object is downloaded and parsed once per plugin lifetime.
    """

    def __init__(self, tracker: Any, queue: Any, read_file: Callable[[str], bytes],
                 cache_size: int = 200_000) -> None:
        self.tracker = tracker
        self.queue = queue
        self.read_file = read_file
        self.cache_size = cache_size
        self._cache: dict[str, ObjectRefs] = {}
        self._mismatches: dict[str, tuple[tuple[int, int, int], dict[str, int]]] = {}

    def read_refs(self, obj: ObjectRecord) -> ObjectRefs | None:
        """References of a stored object (``None`` when it was deleted or cannot be read)."""
        if not obj.orthanc_id:
            return None
        cached = self._cache.get(obj.orthanc_id)
        if cached is not None:
            return cached
        refs = extract_from_bytes(self.read_file(obj.orthanc_id))
        if refs.kind is not ObjectKind.UNREADABLE:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()  # crude, but bounded: a rebuild only costs re-reading
            self._cache[obj.orthanc_id] = refs
        return refs

    def build(self, harvest_id: str | None) -> Manifest:
        """The manifest of one harvest, or of every harvest (``None``)."""
        objects = self.tracker.objects(harvest_id)
        failed = self.queue.list_jobs(harvest_id=harvest_id, state="failed", limit=1_000_000)
        codes = self.tracker.failure_codes(int(j.id) for j in failed)
        pending: set[str] = set()
        for state in ("pending", "waiting", "leased"):
            for job in self.queue.list_jobs(harvest_id=harvest_id, state=state, limit=1_000_000):
                pending |= failure_from_job(job).targets()
        return build_manifest(harvest_id, objects, self.read_refs,
                              [failure_from_job(j, codes.get(int(j.id))) for j in failed],
                              pending=pending)

    def patient_id_mismatches(self, harvest_id: str) -> dict[str, int]:
        """``Summary.PatientIDMismatches.Reasons`` of a harvest's manifest, kept while the harvest's decisions
        and failed jobs stay the same (the harvest document asks for it on every refresh)."""
        counts = self.tracker.decision_counts(harvest_id)
        failed = len(self.queue.list_jobs(harvest_id=harvest_id, state="failed", limit=1_000_000))
        key = (counts.kept, counts.rejected, failed)
        cached = self._mismatches.get(harvest_id)
        if cached is None or cached[0] != key:
            cached = (key, self.build(harvest_id).summary.patient_id_mismatches)
            self._mismatches[harvest_id] = cached
        return dict(cached[1])

    def __call__(self, harvest_id: str | None, fmt: str) -> HttpResponse:
        manifest = self.build(harvest_id)
        if fmt == "csv":
            return HttpResponse.text(manifest.to_csv(), "text/csv; charset=utf-8")
        return HttpResponse.json(manifest.to_json())

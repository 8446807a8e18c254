"""What to export from RayStation, and the arguments of ``case.ScriptableDicomExport``: plain functions.

RayStation has no DICOM Q/R for planning data: a script running inside RayStation exports the treated plans
to the auxiliary PACS the harvest lists in ``LookupSources``. Everything that decides *what* is exported
lives here, as functions of RayStation's scripting objects (duck-typed: the tests drive them with fakes),
so the script itself (:mod:`.export_script`) only wires them to ``connect.get_current``.

Rules (docs/converters-raystation.md; RayStation scripting documentation and the open ``ray_scripts``):

* A beam set is exported when it is **approved** (``Review.ApprovalStatus == 'Approved'``, on the beam set
  or, in versions that review plans, on its plan) and, when a treated-plan list is given, when its plan's
  DICOM UID (``beam_set.ModificationInfo.DicomUID``: RayStation does not know whether a plan was treated)
  is in that list. A beam set never exported has no DicomUID and cannot be matched against a list.
* The treated-plan list comes from the harvester's manifest (JSON ``Plans[].PlanUID`` or CSV column
  ``PlanUID``: every row, ``Missing`` ones included, since those are what the archive lacks), from the
  MOSAIQ converter's report (``Records[].PlanUID``) or from a text file with one UID per line.
* Exported per case: the beam sets (``'<plan name>:<beam set label>'``), their structure sets
  (``RtStructureSetsReferencedFromBeamSets``), their planning examinations, the physical beam-set and
  per-beam doses, and the registrations that involve a planning examination: rigid ones as
  ``'<from exam>:<to exam>'`` (``case.Registrations`` by frame of reference), deformable ones as
  ``'<group>:<from exam>:<to exam>'`` (``case.PatientModel.StructureRegistrationGroups``).
* Precondition warnings raise: call with ``IgnorePreConditionWarnings=False``, log the warnings the
  exception carries (JSON ``{"Comment", "Warnings"}``), then call again with ``True``. An exception that
  carries no such JSON is a blocking error: the case is reported failed and the batch goes on.
* The patient is saved (``patient.Save()``) before its export: RayStation exports only saved data.
* A listed patient is looked up exactly: ``QueryPatientInfo`` filters are regular expressions, so the
  filter is ``^`` + the escaped ID + ``$``, and of its answers exactly one must have that very PatientID
  (none, or several, is a per-patient error and nothing is loaded).

Compatibility: this module runs inside RayStation's CPython (3.6 or later) interpreter, so it imports only
the standard library, uses no dataclasses and writes its annotations as strings.
"""

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

log = logging.getLogger("rtharvest.raystation")


class TreatedPlan(NamedTuple):
    """A plan the record-and-verify system treated (PatientID may be empty when the source lacks it)."""

    patient_id: str
    plan_uid: str


class BeamSetChoice(NamedTuple):
    """One beam set to export, and the planning examination it was planned on."""

    identifier: str  # '<plan name>:<beam set label>', as ScriptableDicomExport names beam sets
    plan_uid: str
    examination: str


class Skipped(NamedTuple):
    """A beam set left out, with a stable reason (``not-approved``, ``not-treated``, ``never-exported``)."""

    identifier: str
    reason: str


class Destination(NamedTuple):
    """Where the export goes: a folder, a DICOM node configured in RayStation (``title``), or a node given by
    host, port and AE titles."""

    folder: str = ""
    title: str = ""
    host: str = ""
    port: int = 0
    called_ae: str = ""
    calling_ae: str = "RAYSTATION"


class ExportFailed(RuntimeError):
    """ScriptableDicomExport failed with a blocking error (no precondition warnings to override)."""


# --- the treated-plan list ------------------------------------------------------------------------------


def _plans_from_json(data: Any) -> "list[TreatedPlan]":
    rows: Any
    if isinstance(data, dict):
        rows = data.get("Plans") or data.get("Records") or []
    else:
        rows = data
    plans = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("PlanUID"):
            plans.append(TreatedPlan(str(row.get("PatientID") or ""), str(row["PlanUID"]).strip()))
        elif isinstance(row, str) and row.strip():
            plans.append(TreatedPlan("", row.strip()))
    return plans


def parse_treated_plans(text: str) -> "list[TreatedPlan]":
    """Treated plans from a manifest (JSON or CSV), a MOSAIQ converter report, or one UID per line.

    Duplicates (a plan with many records) are listed once, in first-seen order.
    """
    stripped = text.lstrip("\ufeff").strip()
    first_line = stripped.splitlines()[0] if stripped else ""
    plans: list[TreatedPlan]
    if stripped.startswith(("{", "[")):
        plans = _plans_from_json(json.loads(stripped))
    elif "PlanUID" in first_line:
        reader = csv.DictReader(io.StringIO(stripped))
        plans = [TreatedPlan((row.get("PatientID") or "").strip(), (row.get("PlanUID") or "").strip())
                 for row in reader if (row.get("PlanUID") or "").strip()]
    else:
        plans = [TreatedPlan("", line.strip()) for line in stripped.splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    seen: set[str] = set()
    unique = []
    for plan in plans:
        if plan.plan_uid not in seen:
            seen.add(plan.plan_uid)
            unique.append(plan)
    return unique


def load_treated_plans(path: str) -> "list[TreatedPlan]":
    """:func:`parse_treated_plans` of a file."""
    with open(path, encoding="utf-8") as handle:
        return parse_treated_plans(handle.read())


# --- selection ---------------------------------------------------------------------------------------------


def _approval(obj: Any) -> str:
    review = getattr(obj, "Review", None)
    return str(getattr(review, "ApprovalStatus", "") or "") if review is not None else ""


def is_approved(plan: Any, beam_set: Any) -> bool:
    """Approved on the beam set, or (versions that review whole plans) on its plan."""
    return "Approved" in (_approval(beam_set), _approval(plan))


def plan_uid(beam_set: Any) -> str:
    """The DICOM SOP Instance UID RayStation exports the beam set's plan with ('' before the first export)."""
    info = getattr(beam_set, "ModificationInfo", None)
    return str(getattr(info, "DicomUID", "") or "") if info is not None else ""


def beam_set_identifier(plan: Any, beam_set: Any) -> str:
    """``'<plan name>:<beam set label>'``."""
    return f"{plan.Name}:{beam_set.DicomPlanLabel}"


def planning_examination(plan: Any, beam_set: Any) -> str:
    """Name of the examination the beam set was planned on."""
    getter = getattr(beam_set, "GetPlanningExamination", None)
    exam = getter() if callable(getter) else None
    if exam is None:
        exam = plan.GetTotalDoseStructureSet().OnExamination
    return str(exam.Name)


def select_beam_sets(case: Any, treated: "Iterable[str] | None" = None
                     ) -> "tuple[list[BeamSetChoice], list[Skipped]]":
    """Approved beam sets of ``case`` (whose plan UID is in ``treated`` when given), and what was left out."""
    wanted = None if treated is None else set(treated)
    chosen: list[BeamSetChoice] = []
    skipped: list[Skipped] = []
    for plan in case.TreatmentPlans:
        for beam_set in plan.BeamSets:
            identifier = beam_set_identifier(plan, beam_set)
            if not is_approved(plan, beam_set):
                skipped.append(Skipped(identifier, "not-approved"))
                continue
            uid = plan_uid(beam_set)
            if wanted is not None and not uid:
                skipped.append(Skipped(identifier, "never-exported"))
                continue
            if wanted is not None and uid not in wanted:
                skipped.append(Skipped(identifier, "not-treated"))
                continue
            chosen.append(BeamSetChoice(identifier, uid, planning_examination(plan, beam_set)))
    return chosen, skipped


def _exams_in(case: Any, frame_of_reference: str) -> "list[str]":
    return [str(e.Name) for e in case.Examinations if str(e.EquipmentInfo.FrameOfReference) == frame_of_reference]


def registration_pairs(case: Any, examinations: "Iterable[str]") -> "list[str]":
    """Rigid registrations involving one of ``examinations``, as ``'<from>:<to>'`` (first examination of each
    frame of reference: one pair exports the registration of the two frames)."""
    names = set(examinations)
    fors = {str(e.EquipmentInfo.FrameOfReference) for e in case.Examinations if str(e.Name) in names}
    pairs: list[str] = []
    for registration in getattr(case, "Registrations", None) or []:
        if not list(getattr(registration, "StructureRegistrations", None) or []):
            continue  # an empty registration object: nothing to export
        to_for, from_for = str(registration.ToFrameOfReference), str(registration.FromFrameOfReference)
        if to_for not in fors and from_for not in fors:
            continue
        to_exams, from_exams = _exams_in(case, to_for), _exams_in(case, from_for)
        if to_exams and from_exams:
            pair = f"{from_exams[0]}:{to_exams[0]}"
            if pair not in pairs:
                pairs.append(pair)
    return pairs


def deformable_pairs(case: Any, examinations: "Iterable[str]") -> "list[str]":
    """Deformable registrations involving one of ``examinations``, as ``'<group>:<from>:<to>'``."""
    names = set(examinations)
    model = getattr(case, "PatientModel", None)
    triples: list[str] = []
    for group in getattr(model, "StructureRegistrationGroups", None) or []:
        for registration in getattr(group, "DeformableStructureRegistrations", None) or []:
            source, target = str(registration.FromExamination.Name), str(registration.ToExamination.Name)
            if source in names or target in names:
                triple = f"{group.Name}:{source}:{target}"
                if triple not in triples:
                    triples.append(triple)
    return triples


def destination_arguments(destination: Destination) -> "dict[str, Any]":
    """``ExportFolderPath`` or ``Connection`` for ScriptableDicomExport."""
    if destination.folder:
        return {"ExportFolderPath": destination.folder}
    if destination.title:
        return {"Connection": {"Title": destination.title}}
    if destination.host and destination.port and destination.called_ae:
        return {"Connection": {"Node": destination.host, "Port": destination.port,
                               "CallingAE": destination.calling_ae, "CalledAE": destination.called_ae}}
    raise ValueError("destination needs a folder, a configured node title, or host, port and called AE")


def export_arguments(case: Any, choices: "list[BeamSetChoice]", destination: Destination,
                     ignore_warnings: bool = False) -> "dict[str, Any]":
    """The keyword arguments of ``case.ScriptableDicomExport`` exporting ``choices`` of ``case``."""
    beam_sets = [c.identifier for c in choices]
    examinations: list[str] = []
    for choice in choices:
        if choice.examination not in examinations:
            examinations.append(choice.examination)
    args = destination_arguments(destination)
    args.update({
        "Examinations": examinations,
        "RtStructureSetsReferencedFromBeamSets": beam_sets,
        "BeamSets": beam_sets,
        "PhysicalBeamSetDoseForBeamSets": beam_sets,
        "PhysicalBeamDosesForBeamSets": beam_sets,
        "SpatialRegistrationForExaminations": registration_pairs(case, examinations),
        "DeformableSpatialRegistrationsForExaminations": deformable_pairs(case, examinations),
        "IgnorePreConditionWarnings": ignore_warnings,
    })
    return args


# --- running the export ------------------------------------------------------------------------------------


def precondition_warnings(error: BaseException) -> "list[str] | None":
    """The warnings of a precondition exception (its message is JSON with ``Warnings``); None otherwise."""
    try:
        data = json.loads(str(error))
    except ValueError:
        return None
    if not isinstance(data, dict) or "Warnings" not in data:
        return None
    return [str(w) for w in data.get("Warnings") or []]


def export_case(case: Any, choices: "list[BeamSetChoice]", destination: Destination,
                logger: "logging.Logger | None" = None) -> "dict[str, Any]":
    """Export ``choices`` of ``case``: first without ignoring precondition warnings, then, after logging them,
    ignoring them. Returns the parsed result (``Comment``, ``Warnings``, ``Notifications``, and
    ``PreconditionWarnings``). Raises :class:`ExportFailed` on a blocking error."""
    out = logger or log
    overridden: list[str] = []
    try:
        result = case.ScriptableDicomExport(**export_arguments(case, choices, destination, False))
    except Exception as error:  # RayStation raises System.InvalidOperationException: no common base here
        warnings = precondition_warnings(error)
        if warnings is None:
            raise ExportFailed(str(error)) from None
        for warning in warnings:
            out.warning("precondition warning overridden: %s", warning)
        overridden = warnings
        try:
            result = case.ScriptableDicomExport(**export_arguments(case, choices, destination, True))
        except Exception as again:
            raise ExportFailed(str(again)) from None
    try:
        parsed = json.loads(str(result)) if result else {}
    except ValueError:
        parsed = {"Comment": str(result)}
    if not isinstance(parsed, dict):
        parsed = {"Comment": str(parsed)}
    for note in parsed.get("Warnings") or []:
        out.warning("export warning: %s", note)
    for note in parsed.get("Notifications") or []:
        out.info("export notification: %s", note)
    parsed["PreconditionWarnings"] = overridden
    return parsed


class PatientOutcome(NamedTuple):
    """What happened to one patient (the JSON summary names the patient; the log does not)."""

    patient_id: str
    exported: "list[str]"
    skipped: "list[Skipped]"
    error: str


def export_patient(patient: Any, treated: "Iterable[str] | None", destination: Destination,
                   patient_id: str = "", logger: "logging.Logger | None" = None) -> PatientOutcome:
    """Select and export every case of a loaded patient; saved first, once, if anything is to be exported."""
    out = logger or log
    wanted = None if treated is None else set(treated)
    exported: list[str] = []
    skipped: list[Skipped] = []
    selections = []
    for case in patient.Cases:
        chosen, left = select_beam_sets(case, wanted)
        skipped.extend(left)
        if chosen:
            selections.append((case, chosen))
    if not selections:
        return PatientOutcome(patient_id, exported, skipped, "")
    patient.Save()  # RayStation exports saved data only
    errors = []
    for case, chosen in selections:
        try:
            export_case(case, chosen, destination, out)
        except ExportFailed as exc:
            errors.append("{}: {}".format(getattr(case, "CaseName", "case"), exc))
            continue
        exported.extend(c.plan_uid or c.identifier for c in chosen)
    return PatientOutcome(patient_id, exported, skipped, "; ".join(errors))


class PatientLookupFailed(LookupError):
    """No patient, or more than one, in RayStation's database has exactly the requested PatientID."""


def patient_filter(patient_id: str) -> "dict[str, str]":
    """``QueryPatientInfo``'s filter for exactly ``patient_id``.

    RayStation matches filter values as regular expressions: ``"123"`` also finds ``"1234"``, and an ID with
    regex characters (``$00002785``, ``A+B``) matches nothing or something else. The value is anchored and
    escaped (``re.escape`` escapes only punctuation, which .NET and Python regular expressions both read as
    the literal character).
    """
    return {"PatientID": "^" + re.escape(patient_id) + "$"}


def find_patient_info(patient_db: Any, patient_id: str) -> Any:
    """The one ``QueryPatientInfo`` answer whose PatientID equals ``patient_id`` exactly.

    The answers are checked, not trusted: whatever the filter matched, only infos whose ``PatientID`` is
    the requested one count, and there must be exactly one. :class:`PatientLookupFailed` says which case
    failed (the message names no patient: the caller's log names patients by position).
    """
    infos = list(patient_db.QueryPatientInfo(Filter=patient_filter(patient_id)))
    exact = [info for info in infos if str(_info_id(info)) == patient_id]
    if not exact:
        extra = f" ({len(infos)} other patient(s) matched the filter)" if infos else ""
        raise PatientLookupFailed("not in the RayStation database" + extra)
    if len(exact) > 1:
        raise PatientLookupFailed(f"{len(exact)} patients in the RayStation database have this PatientID: "
                                  "none is loaded")
    return exact[0]


def _info_id(info: Any) -> Any:
    """``PatientID`` of a QueryPatientInfo answer (a dictionary in RayStation; an attribute is accepted)."""
    if isinstance(info, dict):
        return info.get("PatientID", "")
    try:
        return info["PatientID"]
    except (TypeError, KeyError, IndexError):
        return getattr(info, "PatientID", "")


def export_patients(patient_db: Any, patient_ids: "list[str]", treated: "Iterable[str] | None",
                    destination: Destination, logger: "logging.Logger | None" = None,
                    load: "Callable[[Any], Any] | None" = None) -> "list[PatientOutcome]":
    """Export every listed patient found in RayStation's database; one failure never stops the batch.

    The log names patients by their position in the batch and plans by UID, never by PatientID or name.
    """
    out = logger or log
    outcomes: list[PatientOutcome] = []
    total = len(patient_ids)
    for index, patient_id in enumerate(patient_ids, 1):
        label = f"patient {index}/{total}"
        try:
            try:
                info = find_patient_info(patient_db, patient_id)
            except PatientLookupFailed as exc:
                outcomes.append(PatientOutcome(patient_id, [], [], str(exc)))
                out.warning("%s: %s", label, exc)
                continue
            patient = load(info) if load is not None else patient_db.LoadPatient(PatientInfo=info,
                                                                                 AllowPatientUpgrade=False)
            outcome = export_patient(patient, treated, destination, patient_id, out)
        except Exception as exc:  # a damaged patient must not stop the batch
            outcome = PatientOutcome(patient_id, [], [], f"{type(exc).__name__}: {exc}")
        outcomes.append(outcome)
        if outcome.error:
            out.error("%s: export failed: %s", label, outcome.error)
        else:
            out.info("%s: %d beam set(s) exported (%s), %d left out", label, len(outcome.exported),
                     ", ".join(outcome.exported) or "none", len(outcome.skipped))
    return outcomes


def summary_json(outcomes: "list[PatientOutcome]") -> "dict[str, Any]":
    """A JSON-ready summary of a batch (names patients: it is a file the operator asked for, not a log)."""
    return {
        "Patients": len(outcomes),
        "Exported": sum(len(o.exported) for o in outcomes),
        "Failed": sum(1 for o in outcomes if o.error),
        "PerPatient": [{"PatientID": o.patient_id, "ExportedPlans": list(o.exported), "Error": o.error,
                        "Skipped": [{"BeamSet": s.identifier, "Reason": s.reason} for s in o.skipped]}
                       for o in outcomes],
    }

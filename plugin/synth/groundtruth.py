"""Ground truth of a synthetic clinic: what exists at the source and what a perfect harvest collects.

The JSON file ``ground_truth.json`` written by :func:`rtharvest.synth.generator.generate` has this shape
(keys exactly as below; readers must tolerate extra keys)::

    {"Generator": {"Version", "Seed", "Options"},
     "Objects": {"<SOPInstanceUID>": {"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID",
                 "Modality", "FrameOfReferenceUID", "Path", "Bytes", "Role", "Traps"}},
     "Traps": [{"Kind", "PatientID", "UIDs", "Description"}],
     "DanglingReferences": [{"UID", "ReferencedBy", "Trap"}],
     "Windows": [{"Name", "From", "To", "PatientIDs", "Expected", "Forbidden", "Plans", "Summary"}]}

``Expected`` and ``Forbidden`` partition the SOP Instance UIDs of ``Objects``. Each ``Plans`` row is
one plan referenced by a seed record of the window (see ``docs/harvest-rules.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = frozenset(
    {
        "record",
        "plan",
        "structure_set",
        "dose",
        "planning_image",
        "planning_for_image",
        "registration",
        "registered_image",
        "registered_for_image",
        "trial",
        "unrelated",
        "qa",
        "other",
    }
)
STATUSES = ("Complete", "Incomplete", "Missing", "Invalid")


@dataclass(frozen=True)
class ObjectInfo:
    """One DICOM object written to the source (key: its SOPInstanceUID)."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str
    for_uid: str | None
    path: str
    size: int
    role: str
    traps: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "PatientID": self.patient_id,
            "StudyInstanceUID": self.study_uid,
            "SeriesInstanceUID": self.series_uid,
            "SOPClassUID": self.sop_class_uid,
            "Modality": self.modality,
            "FrameOfReferenceUID": self.for_uid,
            "Path": self.path,
            "Bytes": self.size,
            "Role": self.role,
            "Traps": list(self.traps),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            patient_id=data["PatientID"],
            study_uid=data["StudyInstanceUID"],
            series_uid=data["SeriesInstanceUID"],
            sop_class_uid=data["SOPClassUID"],
            modality=data["Modality"],
            for_uid=data.get("FrameOfReferenceUID"),
            path=data["Path"],
            size=int(data["Bytes"]),
            role=data["Role"],
            traps=tuple(data.get("Traps", ())),
        )


@dataclass(frozen=True)
class Trap:
    """A deliberate difficulty in the clinic, with the UIDs it concerns."""

    kind: str
    patient_id: str
    uids: tuple[str, ...]
    description: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "Kind": self.kind,
            "PatientID": self.patient_id,
            "UIDs": list(self.uids),
            "Description": self.description,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trap:
        """Inverse of :meth:`to_dict`."""
        return cls(data["Kind"], data["PatientID"], tuple(data["UIDs"]), data["Description"])


@dataclass(frozen=True)
class DanglingReference:
    """A UID referenced by an object at the source but absent from it, on purpose."""

    uid: str
    referenced_by: str
    trap: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"UID": self.uid, "ReferencedBy": self.referenced_by, "Trap": self.trap}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DanglingReference:
        """Inverse of :meth:`to_dict`."""
        return cls(data["UID"], data["ReferencedBy"], data["Trap"])


@dataclass(frozen=True)
class MissingItem:
    """Something a plan's references promise that no source holds."""

    what: str
    uid: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"What": self.what, "UID": self.uid, "Reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MissingItem:
        """Inverse of :meth:`to_dict`."""
        return cls(data["What"], data["UID"], data["Reason"])


@dataclass
class PlanTruth:
    """Expected manifest row of one treated (record-referenced) plan."""

    patient_id: str
    plan_uid: str
    plan_label: str | None
    plan_intent: str | None
    status: str
    treatments: int
    first_treatment: str | None
    last_treatment: str | None
    record_uids: list[str]
    structure_set_uid: str | None
    dose_uids: list[str]
    planning_series_uids: list[str]
    planning_for_series_uids: list[str]
    registration_uids: list[str]
    registration_types: dict[str, str]
    registered_series_uids: list[str]
    registered_for_series_uids: list[str]
    missing: list[MissingItem] = field(default_factory=list)
    traps: list[str] = field(default_factory=list)
    #: Distinct fractions delivered (``treatments`` equals it), delivery and summary records, and the
    #: plan's NumberOfFractionsPlanned (``None`` when the plan is absent).
    fractions: int = 0
    records: int = 0
    summary_records: int = 0
    fractions_planned: int | None = None
    summary_record_uids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``PlanningForSeriesUIDs``, ``RegisteredForSeriesUIDs``, ``RegistrationTypes`` and the
        fraction counts are extras beyond the required schema)."""
        return {
            "PatientID": self.patient_id,
            "PlanUID": self.plan_uid,
            "PlanLabel": self.plan_label,
            "PlanIntent": self.plan_intent,
            "Status": self.status,
            "Treatments": self.treatments,
            "Fractions": self.fractions,
            "FractionsPlanned": self.fractions_planned,
            "Records": self.records,
            "SummaryRecords": self.summary_records,
            "FirstTreatment": self.first_treatment,
            "LastTreatment": self.last_treatment,
            "RecordUIDs": self.record_uids,
            "SummaryRecordUIDs": self.summary_record_uids,
            "StructureSetUID": self.structure_set_uid,
            "DoseUIDs": self.dose_uids,
            "PlanningSeriesUIDs": self.planning_series_uids,
            "PlanningForSeriesUIDs": self.planning_for_series_uids,
            "RegistrationUIDs": self.registration_uids,
            "RegistrationTypes": self.registration_types,
            "RegisteredSeriesUIDs": self.registered_series_uids,
            "RegisteredForSeriesUIDs": self.registered_for_series_uids,
            "Missing": [m.to_dict() for m in self.missing],
            "Traps": self.traps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanTruth:
        """Inverse of :meth:`to_dict`."""
        return cls(
            patient_id=data["PatientID"],
            plan_uid=data["PlanUID"],
            plan_label=data.get("PlanLabel"),
            plan_intent=data.get("PlanIntent"),
            status=data["Status"],
            treatments=int(data["Treatments"]),
            first_treatment=data.get("FirstTreatment"),
            last_treatment=data.get("LastTreatment"),
            record_uids=list(data["RecordUIDs"]),
            structure_set_uid=data.get("StructureSetUID"),
            dose_uids=list(data["DoseUIDs"]),
            planning_series_uids=list(data["PlanningSeriesUIDs"]),
            planning_for_series_uids=list(data.get("PlanningForSeriesUIDs", [])),
            registration_uids=list(data["RegistrationUIDs"]),
            registration_types=dict(data.get("RegistrationTypes", {})),
            registered_series_uids=list(data["RegisteredSeriesUIDs"]),
            registered_for_series_uids=list(data.get("RegisteredForSeriesUIDs", [])),
            missing=[MissingItem.from_dict(m) for m in data.get("Missing", [])],
            traps=list(data.get("Traps", [])),
            fractions=int(data.get("Fractions", data["Treatments"])),
            records=int(data.get("Records", len(data["RecordUIDs"]))),
            summary_records=int(data.get("SummaryRecords", 0)),
            fractions_planned=None if data.get("FractionsPlanned") is None else int(data["FractionsPlanned"]),
            summary_record_uids=list(data.get("SummaryRecordUIDs", [])),
        )


@dataclass
class Summary:
    """Counts a harvest report of the window should show.

    ``PlansCollected`` counts referenced plans found at the source (every status but ``Missing``);
    ``SuccessRate`` is ``Complete / (PlansReferenced - InvalidPlans)`` (QA plans are not patient data),
    rounded to 4 decimals, 0.0 when nothing is referenced.
    """

    patients: int
    plans_referenced: int
    plans_collected: int
    success_rate: float
    plans_by_intent: dict[str, int]
    invalid_plans: int
    image_series: dict[str, int]
    planning_series: int
    registrations: dict[str, int]
    treatment_records: int
    plans_by_status: dict[str, int] = field(default_factory=dict)
    #: Fractions delivered, summed over the plans; RT Treatment Summary Records collected.
    fractions: int = 0
    summary_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``PlansByStatus`` is an extra)."""
        return {
            "Patients": self.patients,
            "PlansReferenced": self.plans_referenced,
            "PlansCollected": self.plans_collected,
            "SuccessRate": self.success_rate,
            "PlansByIntent": self.plans_by_intent,
            "PlansByStatus": self.plans_by_status,
            "InvalidPlans": self.invalid_plans,
            "ImageSeries": self.image_series,
            "PlanningSeries": self.planning_series,
            "Registrations": self.registrations,
            "TreatmentRecords": self.treatment_records,
            "Fractions": self.fractions,
            "SummaryRecords": self.summary_records,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """Inverse of :meth:`to_dict`."""
        return cls(
            patients=int(data["Patients"]),
            plans_referenced=int(data["PlansReferenced"]),
            plans_collected=int(data["PlansCollected"]),
            success_rate=float(data["SuccessRate"]),
            plans_by_intent=dict(data["PlansByIntent"]),
            invalid_plans=int(data["InvalidPlans"]),
            image_series=dict(data["ImageSeries"]),
            planning_series=int(data["PlanningSeries"]),
            registrations=dict(data["Registrations"]),
            treatment_records=int(data["TreatmentRecords"]),
            plans_by_status=dict(data.get("PlansByStatus", {})),
            fractions=int(data.get("Fractions", 0)),
            summary_records=int(data.get("SummaryRecords", 0)),
        )


@dataclass
class Window:
    """One harvest window and its expected outcome."""

    name: str
    date_from: str | None
    date_to: str | None
    patient_ids: list[str] | None
    expected: list[str]
    forbidden: list[str]
    plans: list[PlanTruth]
    summary: Summary

    def plan(self, plan_uid: str) -> PlanTruth:
        """The row of ``plan_uid`` (KeyError when the window does not reference it)."""
        for row in self.plans:
            if row.plan_uid == plan_uid:
                return row
        raise KeyError(plan_uid)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "Name": self.name,
            "From": self.date_from,
            "To": self.date_to,
            "PatientIDs": self.patient_ids,
            "Expected": self.expected,
            "Forbidden": self.forbidden,
            "Plans": [p.to_dict() for p in self.plans],
            "Summary": self.summary.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Window:
        """Inverse of :meth:`to_dict`."""
        ids = data.get("PatientIDs")
        return cls(
            name=data["Name"],
            date_from=data.get("From"),
            date_to=data.get("To"),
            patient_ids=list(ids) if ids is not None else None,
            expected=list(data["Expected"]),
            forbidden=list(data["Forbidden"]),
            plans=[PlanTruth.from_dict(p) for p in data["Plans"]],
            summary=Summary.from_dict(data["Summary"]),
        )


@dataclass
class GroundTruth:
    """Everything the generator knows about the clinic it wrote."""

    generator: dict[str, Any]
    objects: dict[str, ObjectInfo]
    traps: list[Trap]
    windows: list[Window]
    dangling: list[DanglingReference] = field(default_factory=list)

    def window(self, name: str) -> Window:
        """The window called ``name`` (KeyError if absent)."""
        for w in self.windows:
            if w.name == name:
                return w
        raise KeyError(name)

    def traps_of(self, kind: str) -> list[Trap]:
        """Every trap of one kind."""
        return [t for t in self.traps if t.kind == kind]

    def paths(self, root: Path) -> list[Path]:
        """Absolute paths of every object file, given the output directory ``root``."""
        return [root / info.path for info in self.objects.values()]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "Generator": self.generator,
            "Objects": {uid: info.to_dict() for uid, info in self.objects.items()},
            "Traps": [t.to_dict() for t in self.traps],
            "DanglingReferences": [d.to_dict() for d in self.dangling],
            "Windows": [w.to_dict() for w in self.windows],
        }

    def to_json(self) -> str:
        """Deterministic JSON text (stable key order, trailing newline)."""
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroundTruth:
        """Inverse of :meth:`to_dict`."""
        return cls(
            generator=dict(data["Generator"]),
            objects={uid: ObjectInfo.from_dict(v) for uid, v in data["Objects"].items()},
            traps=[Trap.from_dict(t) for t in data["Traps"]],
            windows=[Window.from_dict(w) for w in data["Windows"]],
            dangling=[DanglingReference.from_dict(d) for d in data.get("DanglingReferences", [])],
        )


def load(path: Path | str) -> GroundTruth:
    """Read ``ground_truth.json`` (or the directory that holds it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "ground_truth.json"
    return GroundTruth.from_dict(json.loads(p.read_text(encoding="utf-8")))

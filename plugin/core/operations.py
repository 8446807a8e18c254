"""The next DICOM operations of a harvest, as frozen values (what to find or retrieve, and why).

The planner returns these; the job queue stores them as JSON (:meth:`to_dict` / :func:`operation_from_dict`)
and deduplicates them with :meth:`dedupe_key`; a backend executes them following
:func:`rtharvest.core.strategies.search_steps`. An operation carries the *role* its results will play and
whatever context the decision on their arrival needs, so that :func:`rtharvest.core.planner.plan_arrival`
stays a pure function of (arrived object, operation). The hops, roles and reverse-link criteria they carry
are the rule book's (:mod:`rtharvest.core.rulebook`, imported here under their old names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from enum import Enum, StrEnum
from typing import Any, ClassVar

from .classify import HarvestWindow
from .references import ObjectKind, ObjectRefs
from .rulebook import CriterionKind, Hop, Role, reverse_keys


class OperationKind(StrEnum):
    """Discriminator of the operation classes (stored in JSON as ``kind``)."""

    FIND_TREATMENT_RECORDS = "FindTreatmentRecords"
    RETRIEVE_INSTANCE = "RetrieveInstance"
    RETRIEVE_SERIES = "RetrieveSeries"
    FIND_REFERENCING = "FindReferencing"
    FIND_SERIES_IN_FOR = "FindSeriesInFrameOfReference"
    UNPACK_MIM_SESSION = "UnpackMimSession"


@dataclass(frozen=True)
class ReferenceCriterion:
    """The reverse-link test of a :class:`FindReferencing` search."""

    kind: CriterionKind
    uids: tuple[str, ...]

    def matches(self, refs: ObjectRefs) -> bool:
        """True when the object's stored references satisfy the criterion."""
        return not reverse_keys(self.kind, refs).isdisjoint(self.uids)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind.value, "uids": list(self.uids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceCriterion:
        """Inverse of :meth:`to_dict`."""
        return cls(CriterionKind(data["kind"]), tuple(data["uids"]))


#: The object kind a reverse search for a modality accepts.
KIND_OF_MODALITY: dict[str, ObjectKind] = {
    "RTDOSE": ObjectKind.DOSE,
    "RTRECORD": ObjectKind.RECORD,
    "REG": ObjectKind.REGISTRATION,
    "RTPLAN": ObjectKind.PLAN,
    "RTSTRUCT": ObjectKind.STRUCTURE_SET,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (HarvestWindow, ReferenceCriterion)):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


class _OperationBase:
    """Shared serialisation; subclasses are frozen dataclasses with ``role`` and ``hop`` fields."""

    kind: ClassVar[OperationKind]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"kind": ..., <field>: ...}`` (tuples become lists, enums their values)."""
        out: dict[str, Any] = {"kind": self.kind.value}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


def _t(value: Any) -> tuple[str, ...]:
    return tuple(value or ())


@dataclass(frozen=True)
class FindTreatmentRecords(_OperationBase):
    """Rule 1: find (and retrieve) the treatment records of the window, for one patient or all."""

    window: HarvestWindow
    patient_id: str | None = None
    role: Role = Role.RECORD
    hop: Hop = Hop.WINDOW_RECORD
    #: The part of the window's dates this job searches (``YYYYMMDD``, inclusive); None: the whole window.
    #: A long window is searched month by month, as separate jobs, so each answer list stays small.
    chunk_from: str | None = None
    chunk_to: str | None = None
    kind: ClassVar[OperationKind] = OperationKind.FIND_TREATMENT_RECORDS

    def dedupe_key(self) -> str:
        """Same window, patient and chunk → same key."""
        w = self.window
        parts = [self.kind.value, w.date_from or "", w.date_to or "", self.patient_id or "*"]
        if self.chunk_from or self.chunk_to:
            parts.append(f"{self.chunk_from or ''}-{self.chunk_to or ''}")
        return "|".join(parts)

    def search_range(self) -> tuple[str | None, str | None]:
        """The dates this job searches: its chunk, else the window's."""
        if self.chunk_from or self.chunk_to:
            return self.chunk_from, self.chunk_to
        return self.window.date_from, self.window.date_to

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FindTreatmentRecords:
        """Inverse of :meth:`to_dict`."""
        return cls(HarvestWindow.from_dict(d["window"]), d.get("patient_id"), Role(d["role"]), Hop(d["hop"]),
                   d.get("chunk_from"), d.get("chunk_to"))


@dataclass(frozen=True)
class RetrieveInstance(_OperationBase):
    """Retrieve one instance named by a reference (SOP UID); study/series when known (hierarchical
    sources need them, relational ones find it by SOP UID alone)."""

    sop_uid: str
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    modality: str | None
    role: Role
    hop: Hop
    #: Planning FoRs of the plan this object serves (registered images: series in them are step 8's).
    planning_fors: tuple[str, ...] = ()
    kind: ClassVar[OperationKind] = OperationKind.RETRIEVE_INSTANCE

    def dedupe_key(self) -> str:
        """The instance and the role it is wanted in (hints and hop do not matter)."""
        return "|".join((self.kind.value, self.role.value, self.sop_uid))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrieveInstance:
        """Inverse of :meth:`to_dict`."""
        return cls(d["sop_uid"], d.get("patient_id"), d.get("study_uid"), d.get("series_uid"),
                   d.get("modality"), Role(d["role"]), Hop(d["hop"]), _t(d.get("planning_fors")))


@dataclass(frozen=True)
class RetrieveSeries(_OperationBase):
    """Retrieve a whole image series."""

    patient_id: str | None
    study_uid: str | None
    series_uid: str
    role: Role
    hop: Hop
    #: Planning FoRs of the plan (a registered series in one of them needs no step-10 search).
    planning_fors: tuple[str, ...] = ()
    kind: ClassVar[OperationKind] = OperationKind.RETRIEVE_SERIES

    def dedupe_key(self) -> str:
        """The series and the role it is wanted in."""
        return "|".join((self.kind.value, self.role.value, self.series_uid))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrieveSeries:
        """Inverse of :meth:`to_dict`."""
        return cls(d.get("patient_id"), d.get("study_uid"), d["series_uid"], Role(d["role"]), Hop(d["hop"]),
                   _t(d.get("planning_fors")))


@dataclass(frozen=True)
class FindReferencing(_OperationBase):
    """Reverse search: objects of ``modality`` of the patient (in ``study_uid`` when set) whose
    references satisfy ``criterion`` (doses and records naming a plan, REGs involving a FoR)."""

    modality: str
    patient_id: str | None
    study_uid: str | None
    criterion: ReferenceCriterion
    role: Role
    hop: Hop
    #: Dose search: did the plan name its own structure set? If not (TomoTherapy), the dose's
    #: ReferencedStructureSetSequence is followed (rule 4).
    plan_has_structure_set: bool = True
    #: REG search: the planning series, not to be fetched again as registered series (rule 9).
    exclude_series: tuple[str, ...] = ()
    #: REG search: modality of the planning series (fixed side of the REG type).
    fixed_modality: str | None = None
    kind: ClassVar[OperationKind] = OperationKind.FIND_REFERENCING

    def dedupe_key(self) -> str:
        """What is searched, where, and for which role (context fields do not matter)."""
        return "|".join((self.kind.value, self.role.value, self.modality, self.patient_id or "",
                         self.study_uid or "*", self.criterion.kind.value, ",".join(sorted(self.criterion.uids))))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FindReferencing:
        """Inverse of :meth:`to_dict`."""
        return cls(d["modality"], d.get("patient_id"), d.get("study_uid"),
                   ReferenceCriterion.from_dict(d["criterion"]), Role(d["role"]), Hop(d["hop"]),
                   bool(d.get("plan_has_structure_set", True)), _t(d.get("exclude_series")),
                   d.get("fixed_modality"))


@dataclass(frozen=True)
class FindSeriesInFrameOfReference(_OperationBase):
    """Steps 8 and 10: every series of the patient, of the given modalities, whose images carry
    ``for_uid`` (FoR is an image-level attribute: no standard series-level key matches it)."""

    patient_id: str | None
    for_uid: str
    exclude_series: tuple[str, ...]
    role: Role
    hop: Hop
    modalities: tuple[str, ...] = ("CT", "MR", "PT")
    kind: ClassVar[OperationKind] = OperationKind.FIND_SERIES_IN_FOR

    def dedupe_key(self) -> str:
        """Patient, FoR and role (the excluded series are an optimisation, not part of identity)."""
        return "|".join((self.kind.value, self.role.value, self.patient_id or "", self.for_uid))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FindSeriesInFrameOfReference:
        """Inverse of :meth:`to_dict`."""
        return cls(d.get("patient_id"), d["for_uid"], _t(d.get("exclude_series")), Role(d["role"]),
                   Hop(d["hop"]), _t(d.get("modalities")) or ("CT", "MR", "PT"))


@dataclass(frozen=True)
class UnpackMimSession(_OperationBase):
    """Unpack the MIM session (a Raw Data object, ``sop_uid``) the harvester stores, and judge the RTSTRUCT
    and REG objects it carries as if ``operation`` (JSON of the operation the session stands in for, e.g.
    the REG search of a frame of reference) had retrieved them. Local work: no source is asked."""

    sop_uid: str
    patient_id: str | None
    #: :meth:`to_dict` of the operation the embedded objects are judged against (JSON text: hashable).
    operation: str
    #: Dedupe key of the operation that brought the session in (its rejection is forgotten when the session
    #: carried something the harvest keeps, so that a later harvest inspects it again).
    arrived_under: str
    role: Role
    hop: Hop = Hop.RAW_UNPACK
    kind: ClassVar[OperationKind] = OperationKind.UNPACK_MIM_SESSION

    def dedupe_key(self) -> str:
        """The session and the operation that brought it."""
        return "|".join((self.kind.value, self.sop_uid, self.arrived_under))

    def inner(self) -> Operation:
        """The operation the embedded objects are judged against."""
        return operation_from_dict(json.loads(self.operation))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnpackMimSession:
        """Inverse of :meth:`to_dict`."""
        return cls(d["sop_uid"], d.get("patient_id"), d["operation"], d["arrived_under"], Role(d["role"]),
                   Hop(d.get("hop", Hop.RAW_UNPACK)))


Operation = (
    FindTreatmentRecords | RetrieveInstance | RetrieveSeries | FindReferencing | FindSeriesInFrameOfReference
    | UnpackMimSession
)

_CLASSES: dict[str, type[Any]] = {
    c.kind.value: c
    for c in (FindTreatmentRecords, RetrieveInstance, RetrieveSeries, FindReferencing,
              FindSeriesInFrameOfReference, UnpackMimSession)
}


def operation_from_dict(data: dict[str, Any]) -> Operation:
    """Rebuild any operation from its :meth:`to_dict` form; raises ``ValueError`` on an unknown kind."""
    cls = _CLASSES.get(str(data.get("kind")))
    if cls is None:
        raise ValueError(f"unknown operation kind {data.get('kind')!r}")
    op: Operation = cls.from_dict(data)
    return op

"""An in-memory Q/R source and a harvest run to a fixpoint over it (tests and benchmarks, no network).

:class:`FakeSource` answers C-FIND and C-MOVE over a set of pydicom datasets the way a real SCP of the
given :class:`~rtharvest.core.strategies.SourceCapability` would — and only that way: a strict hierarchical
source rejects queries without the unique keys of the levels above (so nothing is found by SOP UID
alone) and keys of other levels; a source without sequence return keys returns no sequences; a source
without instance return keys returns no FrameOfReferenceUID / TreatmentDate and matches neither.
:func:`simulate_harvest` then runs :func:`~rtharvest.core.planner.start_operations` and
:func:`~rtharvest.core.planner.plan_arrival` until no new operation appears. Everything is indexed by
dictionaries, so a run is O(objects + answers) and scales to the 6,000-patient benchmark.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ..core.classify import HarvestWindow
from ..core.operations import Operation
from ..core.planner import Arrival, Decision, HarvestContext, plan_arrival, start_operations
from ..core.references import ObjectRefs, extract
from ..core.strategies import QueryLevel, SourceCapability, execute


class QueryRejected(Exception):
    """The fake SCP refuses a request (a real one answers 0xA900 / 0xC000)."""


_PATIENT_KEYS = frozenset({"PatientID", "PatientName", "PatientBirthDate", "PatientSex"})
_STUDY_KEYS = frozenset({"StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                         "StudyDescription", "ModalitiesInStudy"})
_SERIES_KEYS = frozenset({"SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate"})
_IMAGE_KEYS = frozenset({"SOPInstanceUID", "SOPClassUID", "InstanceNumber"})
#: Keys a strict hierarchical SCP accepts at each level (its own, plus the unique keys above it).
_ALLOWED = {
    QueryLevel.PATIENT: _PATIENT_KEYS,
    QueryLevel.STUDY: _PATIENT_KEYS | _STUDY_KEYS,
    QueryLevel.SERIES: _SERIES_KEYS | {"StudyInstanceUID"},
    QueryLevel.IMAGE: _IMAGE_KEYS | {"StudyInstanceUID", "SeriesInstanceUID"},
}
_ALL_LEVEL_KEYS = _PATIENT_KEYS | _STUDY_KEYS | _SERIES_KEYS | _IMAGE_KEYS
_REQUIRED = {
    QueryLevel.PATIENT: (),
    QueryLevel.STUDY: (),
    QueryLevel.SERIES: ("StudyInstanceUID",),
    QueryLevel.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID"),
}
#: Instance attributes that SCPs typically do not index: returned/matched only with instance keys.
_INSTANCE_ONLY = frozenset({"FrameOfReferenceUID", "TreatmentDate"})


@dataclass
class _Instance:
    uid: str
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    ds: Dataset


def _text(ds: Dataset, kw: str) -> str:
    try:
        value = ds.get(kw)
    except Exception:
        return ""
    return "" if value is None else str(value)


def _match(value: str, wanted: str) -> bool:
    if "-" in wanted and len(wanted) <= 17 and wanted.replace("-", "").isdigit():
        lo, _, hi = wanted.partition("-")  # DICOM date range matching
        return bool(value) and (not lo or value >= lo) and (not hi or value <= hi)
    if "\\" in wanted:  # list of UID matching
        return value in wanted.split("\\")
    return value == wanted


class FakeSource:
    """An in-memory Q/R SCP over ``datasets`` with the behaviour of ``capability``."""

    def __init__(self, datasets: Iterable[Dataset], capability: SourceCapability) -> None:
        self.capability = capability
        self.instances: dict[str, _Instance] = {}
        self._series: dict[str, list[str]] = {}
        self._series_study: dict[str, str] = {}
        self._study_series: dict[str, list[str]] = {}
        self._study_patient: dict[str, str] = {}
        self._patient_studies: dict[str, list[str]] = {}
        self._by_modality: dict[str, list[str]] = {}
        self._refs: dict[str, ObjectRefs] = {}
        self.finds = 0
        self.moves = 0
        self.instances_moved = 0
        for ds in datasets:
            self.add(ds)

    def add(self, ds: Dataset) -> None:
        """Store one dataset (indexed by patient, study, series and modality)."""
        inst = _Instance(_text(ds, "SOPInstanceUID"), _text(ds, "PatientID"), _text(ds, "StudyInstanceUID"),
                         _text(ds, "SeriesInstanceUID"), _text(ds, "Modality"), ds)
        if not inst.uid or inst.uid in self.instances:
            return
        self.instances[inst.uid] = inst
        if inst.series_uid not in self._series:
            self._series[inst.series_uid] = []
            self._series_study[inst.series_uid] = inst.study_uid
            self._study_series.setdefault(inst.study_uid, []).append(inst.series_uid)
            self._by_modality.setdefault(inst.modality, [])
        self._series[inst.series_uid].append(inst.uid)
        self._by_modality.setdefault(inst.modality, []).append(inst.uid)
        if inst.study_uid not in self._study_patient:
            self._study_patient[inst.study_uid] = inst.patient_id
            self._patient_studies.setdefault(inst.patient_id, []).append(inst.study_uid)

    def refs(self, uid: str) -> ObjectRefs:
        """References of a stored instance (extracted once)."""
        refs = self._refs.get(uid)
        if refs is None:
            refs = self._refs[uid] = extract(self.instances[uid].ds)
        return refs

    # -- C-FIND ---------------------------------------------------------------------------------

    def _validate(self, level: QueryLevel, ident: Mapping[str, Any]) -> None:
        if self.capability.relational:
            return
        for kw in _REQUIRED[level]:
            value = ident.get(kw)
            if not value or "\\" in str(value):
                raise QueryRejected(f"{level.value} query without a single {kw} (strict hierarchical)")
        for kw, value in ident.items():
            if kw in _ALLOWED[level]:
                continue
            if kw in _ALL_LEVEL_KEYS:
                raise QueryRejected(f"{kw} is not a {level.value}-level key (strict hierarchical)")
            if value not in ("", None) and not (isinstance(value, Sequence) and len(value) == 0):
                raise QueryRejected(f"matching on non-key attribute {kw} (strict hierarchical)")

    def _candidates(self, level: QueryLevel, ident: Mapping[str, Any]) -> list[str]:
        def given(kw: str) -> str:
            v = ident.get(kw)
            return v if isinstance(v, str) and v and "\\" not in v else ""

        sop, series, study, patient = (given("SOPInstanceUID"), given("SeriesInstanceUID"),
                                       given("StudyInstanceUID"), given("PatientID"))
        if level is QueryLevel.IMAGE:
            if sop:
                return [sop] if sop in self.instances else []
            if series:
                return list(self._series.get(series, ()))
            if study:
                return [u for s in self._study_series.get(study, ()) for u in self._series[s]]
            if patient:
                return [u for st in self._patient_studies.get(patient, ())
                        for s in self._study_series[st] for u in self._series[s]]
            modality = given("Modality")
            if modality:
                return list(self._by_modality.get(modality, ()))
            return list(self.instances)
        # Higher levels: one representative instance (the first stored) per entity.
        if level is QueryLevel.SERIES:
            if series:
                uids = [series] if series in self._series else []
            elif study:
                uids = list(self._study_series.get(study, ()))
            elif patient:
                uids = [s for st in self._patient_studies.get(patient, ()) for s in self._study_series[st]]
            else:
                uids = list(self._series)
            return [self._series[s][0] for s in uids]
        if level is QueryLevel.STUDY:
            if study:
                studies = [study] if study in self._study_series else []
            elif patient:
                studies = list(self._patient_studies.get(patient, ()))
            else:
                studies = list(self._study_series)
            return [self._series[self._study_series[st][0]][0] for st in studies]
        patients = [patient] if patient in self._patient_studies else [] if patient else list(self._patient_studies)
        return [self._series[self._study_series[self._patient_studies[p][0]][0]][0] for p in patients]

    def _value(self, inst: _Instance, kw: str) -> Any:
        if kw == "SOPInstanceUID":
            return inst.uid
        if kw == "SeriesInstanceUID":
            return inst.series_uid
        if kw == "StudyInstanceUID":
            return inst.study_uid
        if kw == "PatientID":
            return inst.patient_id
        if kw == "Modality":
            return inst.modality
        try:
            return inst.ds.get(kw)
        except Exception:
            return None

    def find(self, level: QueryLevel, ident: Mapping[str, Any]) -> list[dict[str, Any]]:
        """C-FIND: answers (keyword → value) for the identifier; raises :class:`QueryRejected`."""
        self.finds += 1
        self._validate(level, ident)
        cap = self.capability
        matching: list[tuple[str, str]] = []
        for kw, value in ident.items():
            if not isinstance(value, str) or not value:
                continue
            if kw in _INSTANCE_ONLY and not cap.instance_return_keys:
                continue  # the SCP ignores what it does not index
            matching.append((kw, value))
        answers: list[dict[str, Any]] = []
        unique = {QueryLevel.PATIENT: ("PatientID",), QueryLevel.STUDY: ("StudyInstanceUID",),
                  QueryLevel.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
                  QueryLevel.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}[level]
        for uid in self._candidates(level, ident):
            inst = self.instances[uid]
            if not all(_match(str(self._value(inst, kw) or ""), v) for kw, v in matching):
                continue
            answer: dict[str, Any] = {kw: self._value(inst, kw) for kw in unique}
            for kw in ident:
                if kw in answer:
                    continue
                if kw in _INSTANCE_ONLY and not cap.instance_return_keys:
                    continue
                value = self._value(inst, kw)
                if isinstance(value, Sequence) and not cap.sequence_return_keys:
                    continue  # most SCPs return no sequence attributes
                answer[kw] = value if value is not None else ""
            answers.append(answer)
        return answers

    # -- C-MOVE ---------------------------------------------------------------------------------

    def retrieve(self, level: QueryLevel, ident: Mapping[str, Any]) -> list[str]:
        """C-MOVE: the SOP UIDs sent (empty when nothing matches, like dcmqrscp's "success, 0 sent")."""
        self.moves += 1
        study = str(ident.get("StudyInstanceUID") or "")
        series = str(ident.get("SeriesInstanceUID") or "")
        sop = str(ident.get("SOPInstanceUID") or "")
        hierarchical = not self.capability.relational
        if level is QueryLevel.IMAGE:
            if not sop or (hierarchical and not (study and series)):
                raise QueryRejected("IMAGE-level move without the full UID hierarchy")
            inst = self.instances.get(sop)
            if inst is None or (series and inst.series_uid != series) or (study and inst.study_uid != study):
                return []
            out = [sop]
        elif level is QueryLevel.SERIES:
            if not series or (hierarchical and not study):
                raise QueryRejected("SERIES-level move without Study/Series UIDs")
            if series not in self._series or (study and self._series_study[series] != study):
                return []
            out = list(self._series[series])
        else:
            raise QueryRejected(f"{level.value}-level moves are not used by the harvester")
        self.instances_moved += len(out)
        return out


@dataclass(frozen=True)
class SimDecision:
    """One arrival during a simulated harvest."""

    sop_uid: str
    operation: Operation
    decision: Decision


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of :func:`simulate_harvest`."""

    collected: frozenset[str]
    #: Arrived (retrieved to be inspected) but never kept: the harvester deletes or quarantines them.
    rejected: frozenset[str]
    operations: tuple[Operation, ...]
    #: Operations that moved nothing (missing objects, empty searches).
    empty_operations: tuple[Operation, ...]
    decisions: tuple[SimDecision, ...] = field(default=())
    finds: int = 0
    moves: int = 0
    instances_moved: int = 0


def simulate_harvest(
    datasets: Iterable[Dataset] | FakeSource,
    window: HarvestWindow,
    capability: SourceCapability,
    *,
    record_decisions: bool = True,
) -> SimulationResult:
    """Run a harvest of ``window`` over ``datasets`` (or a prepared :class:`FakeSource`) to a fixpoint.

    Operations are deduplicated by :meth:`dedupe_key` exactly as the job queue does; every arrival is
    decided by :func:`plan_arrival`, even when the object was already collected under another role.
    """
    source = datasets if isinstance(datasets, FakeSource) else FakeSource(datasets, capability)
    if source.capability != capability:
        raise ValueError("the FakeSource was built for another capability")
    ctx = HarvestContext(window)
    queue: deque[Operation] = deque()
    seen: set[str] = set()

    def push(ops: Iterable[Operation]) -> None:
        for op in ops:
            key = op.dedupe_key()
            if key not in seen:
                seen.add(key)
                queue.append(op)

    push(start_operations(ctx))
    collected: set[str] = set()
    arrived: set[str] = set()
    executed: list[Operation] = []
    empty: list[Operation] = []
    decisions: list[SimDecision] = []
    finds0, moves0, moved0 = source.finds, source.moves, source.instances_moved
    while queue:
        op = queue.popleft()
        arrivals: list[tuple[str, bool]] = []

        def retrieve(level: QueryLevel, ident: dict[str, Any], candidate: bool,
                     _arrivals: list[tuple[str, bool]] = arrivals) -> None:
            _arrivals.extend((uid, candidate) for uid in source.retrieve(level, ident))

        execute(op, capability, source.find, retrieve)
        executed.append(op)
        if not arrivals:
            empty.append(op)
        for uid, candidate in arrivals:
            decision = plan_arrival(Arrival(source.refs(uid), op, candidate), ctx)
            arrived.add(uid)
            if decision.keep:
                collected.add(uid)
            if record_decisions:
                decisions.append(SimDecision(uid, op, decision))
            push(decision.operations)
    return SimulationResult(
        collected=frozenset(collected),
        rejected=frozenset(arrived - collected),
        operations=tuple(executed),
        empty_operations=tuple(empty),
        decisions=tuple(decisions),
        finds=source.finds - finds0,
        moves=source.moves - moves0,
        instances_moved=source.instances_moved - moved0,
    )

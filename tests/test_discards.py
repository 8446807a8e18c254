"""Nothing dropped in silence: every answer a search rule discards is counted by reason, selections are not,
and the tracker adds the arrivals a rule rejected (kept by no other rule) to the harvest's count."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import (
    CriterionKind,
    FindReferencing,
    FindSeriesInFrameOfReference,
    FindTreatmentRecords,
    Hop,
    ReferenceCriterion,
    RetrieveInstance,
    Role,
)
from rtharvest.core.planner import ReasonCode
from rtharvest.core.strategies import DiscardReason, QueryLevel, SourceCapability, execute, search_steps
from rtharvest.store.db import Database
from rtharvest.store.tracking import Decision, ObjectRecord, Tracker

RELATIONAL = SourceCapability(relational=True, sequence_return_keys=False, instance_return_keys=True)


def test_a_dose_of_another_patientid_in_the_plans_study_is_retrieved_not_dropped() -> None:
    """The dose search matches no PatientID: a source answering with the dose's own PatientID (dcmqrscp, which
    ignores the key below STUDY level) no longer loses it."""
    op = FindReferencing("RTDOSE", "P1", "st-1", ReferenceCriterion(CriterionKind.PLAN, ("plan",)), Role.DOSE,
                         Hop.PLAN_DOSE)
    moved: list[dict[str, str]] = []
    discarded: Counter[DiscardReason] = Counter()

    def find(level: QueryLevel, ident: dict[str, str]) -> list[dict[str, str]]:
        if level is QueryLevel.SERIES:
            return [{"StudyInstanceUID": "st-1", "SeriesInstanceUID": "se-1", "Modality": "RTDOSE",
                     "PatientID": "P1-RE"}]
        return [{"StudyInstanceUID": "st-1", "SeriesInstanceUID": "se-1", "SOPInstanceUID": "dose-1",
                 "PatientID": "P1-RE"}]

    execute(op, RELATIONAL, find, lambda level, ident, candidate: moved.append(ident), discarded)
    assert [m["SOPInstanceUID"] for m in moved] == ["dose-1"] and not discarded


def test_discarded_answers_are_counted_by_reason_and_selections_are_not() -> None:
    # The studies of a patient: another patient's study carries no UID link and is dropped, counted.
    records = FindTreatmentRecords(HarvestWindow("20200101", "20200131", ("P1",)), "P1")
    studies = {"P1": "st-1", "P2": "st-2"}
    discarded: Counter[DiscardReason] = Counter()

    def find_records(level: QueryLevel, ident: dict[str, str]) -> list[dict[str, str]]:
        if level is QueryLevel.STUDY:
            return [{"PatientID": p, "StudyInstanceUID": s, "ModalitiesInStudy": "RTRECORD"}
                    for p, s in studies.items()]
        if level is QueryLevel.SERIES:
            return [{"StudyInstanceUID": ident["StudyInstanceUID"], "SeriesInstanceUID": "se", "Modality": "CT"}]
        return []

    execute(records, RELATIONAL, find_records, lambda *a: None, discarded)
    assert discarded == Counter({DiscardReason.OTHER_PATIENT: 1, DiscardReason.OTHER_MODALITY: 1})
    # A FoR search: other modalities and other FoRs are discarded; one image per series is a selection.
    op = FindSeriesInFrameOfReference("P1", "for-1", ("se-0",), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR)
    assert [s.level for s in search_steps(op, RELATIONAL)][:2] == [QueryLevel.STUDY, QueryLevel.SERIES]
    discarded.clear()

    def find_for(level: QueryLevel, ident: dict[str, str]) -> list[dict[str, str]]:
        if level is QueryLevel.STUDY:
            return [{"PatientID": "P1", "StudyInstanceUID": "st-1"}]
        if level is QueryLevel.SERIES:
            return [{"StudyInstanceUID": "st-1", "SeriesInstanceUID": s, "Modality": m}
                    for s, m in (("se-0", "CT"), ("se-1", "RTPLAN"), ("se-2", "MR"), ("se-3", "CT"))]
        fors = {"se-2": "for-1", "se-3": "for-9"}
        return [{"StudyInstanceUID": "st-1", "SeriesInstanceUID": ident["SeriesInstanceUID"], "SOPInstanceUID": f"{i}",
                 "FrameOfReferenceUID": fors[ident["SeriesInstanceUID"]]} for i in range(3)]

    moved: list[dict[str, str]] = []
    execute(op, RELATIONAL, find_for, lambda level, ident, candidate: moved.append(ident), discarded)
    assert [m["SeriesInstanceUID"] for m in moved] == ["se-2"]
    assert discarded == Counter({DiscardReason.EXCLUDED_SERIES: 1, DiscardReason.OTHER_MODALITY: 1,
                                 DiscardReason.OTHER_FRAME_OF_REFERENCE: 3})
    # The image a reference names, picked out of its series' listing: the others are not discarded.
    named = RetrieveInstance("img-2", "P1", "st-1", "se-1", None, Role.PLANNING_IMAGE, Hop.STRUCTURE_SET_IMAGE)
    discarded.clear()
    execute(named, RELATIONAL, lambda level, ident: [{"StudyInstanceUID": "st-1", "SeriesInstanceUID": "se-1",
                                                       "SOPInstanceUID": f"img-{i}"} for i in range(5)],
            lambda *a: None, discarded)
    assert not discarded


def test_tracker_counts_discards_per_harvest_and_reason(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "q.sqlite"))
    db.migrate()
    tracker = Tracker(db)
    with db.transaction():
        tracker.add_discards("h1", {DiscardReason.OTHER_MODALITY.value: 3})
        tracker.add_discards("h1", {DiscardReason.OTHER_MODALITY.value: 2, DiscardReason.OTHER_PATIENT.value: 0})
        tracker.add_discards("h2", {DiscardReason.OTHER_MODALITY.value: 7})

        def row(uid: str, decision: Decision, code: ReasonCode) -> ObjectRecord:
            return ObjectRecord("h1", uid, None, decision, "words", "DOSE", Hop.PLAN_DOSE, "SRC", 1, True,
                                reason_code=code.value)

        tracker.record(row("a", Decision.REJECTED, ReasonCode.NOT_REFERENCING))
        tracker.record(row("b", Decision.REJECTED, ReasonCode.NOT_REFERENCING))
        tracker.record(row("c", Decision.REJECTED, ReasonCode.OTHER_FRAME_OF_REFERENCE))
        tracker.record(row("c", Decision.KEPT, ReasonCode.KEPT))  # another rule keeps it: not discarded
    assert tracker.discards("h1") == {"ANSWER_OTHER_MODALITY": 5, "NOT_REFERENCING": 2}
    assert tracker.discards("h2") == {"ANSWER_OTHER_MODALITY": 7}
    db.close()

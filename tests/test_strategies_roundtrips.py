"""Search chains that save round trips (rtharvest.core.strategies): pure, no source needed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
from rtharvest.core.strategies import (
    AnswerFilter,
    QueryLevel,
    SourceCapability,
    StepAction,
    execute,
    fallback_steps,
    search_steps,
)

RELATIONAL = SourceCapability(relational=True, sequence_return_keys=False, instance_return_keys=True)
UPPER = SourceCapability(relational=True, sequence_return_keys=False, instance_return_keys=True,
                         upper_level_keys=True)
HIERARCHICAL = SourceCapability(relational=False, sequence_return_keys=False, instance_return_keys=True)
WINDOW = HarvestWindow("20200101", "20201231")


def test_records_in_one_image_level_find_where_the_source_matches_upper_level_keys() -> None:
    op = FindTreatmentRecords(WINDOW, None, chunk_from="20200101", chunk_to="20200131")
    steps = search_steps(op, UPPER)
    assert [(s.action, s.level) for s in steps] == [(StepAction.FIND, QueryLevel.IMAGE),
                                                    (StepAction.RETRIEVE, QueryLevel.IMAGE)]
    keys = dict(steps[0].keys)
    assert keys["Modality"] == "RTRECORD"
    assert keys["StudyDate"].endswith("-20200131") and keys["StudyDate"] < "2020"  # first chunk looks back
    assert AnswerFilter.WINDOW in steps[0].filters
    # A later chunk does not look back.
    later = search_steps(FindTreatmentRecords(WINDOW, None, chunk_from="20200201", chunk_to="20200229"), UPPER)
    assert dict(later[0].keys)["StudyDate"] == "20200201-20200229"
    # A listed patient: by PatientID, no date key needed.
    by_patient = dict(search_steps(FindTreatmentRecords(HarvestWindow(None, None, ("P1",)), "P1"), UPPER)[0].keys)
    assert by_patient["PatientID"] == "P1" and "StudyDate" not in by_patient
    # Without the capability (dcmqrscp ignores series keys at IMAGE level): studies, series, records.
    assert [s.level for s in search_steps(op, RELATIONAL)][:3] == [QueryLevel.STUDY, QueryLevel.SERIES,
                                                                   QueryLevel.IMAGE]


def test_reverse_search_in_one_image_level_find_of_the_patients_studies() -> None:
    op = FindReferencing("RTRECORD", "P1", None, ReferenceCriterion(CriterionKind.PLAN, ("1.2",)),
                         Role.PLAN_RECORD, Hop.PLAN_RECORD)
    steps = search_steps(op, UPPER)
    # The patient bounds the studies; below them UIDs do: no step but the first matches PatientID, so a
    # candidate naming the plan is found whatever PatientID it carries (docs/harvest-rules.md, "Identity").
    assert [s.level for s in steps] == [QueryLevel.STUDY, QueryLevel.IMAGE, QueryLevel.IMAGE]
    assert dict(steps[0].keys)["PatientID"] == "P1" and dict(steps[1].keys)["Modality"] == "RTRECORD"
    assert all("PatientID" not in dict(s.keys) for s in steps[1:])
    # One C-FIND names all the patient's studies (list of UID matching), not one per study.
    asked: list[dict[str, Any]] = []

    def find(level: QueryLevel, ident: dict[str, Any]) -> list[dict[str, str]]:
        asked.append(ident)
        if level is QueryLevel.STUDY:
            return [{"StudyInstanceUID": s} for s in ("st-1", "st-2", "st-1")]
        return [{"StudyInstanceUID": "st-2", "SeriesInstanceUID": "se", "SOPInstanceUID": "rec"}]

    moved: list[dict[str, Any]] = []
    execute(op, UPPER, find, lambda level, ident, candidate: moved.append(ident))
    assert [a["StudyInstanceUID"] for a in asked] == ["", "st-1\\st-2"] and len(moved) == 1
    relational = search_steps(op, RELATIONAL)
    assert [s.level for s in relational] == [QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE, QueryLevel.IMAGE]
    assert all("PatientID" not in dict(s.keys) for s in relational[1:])
    # A dose search is bounded by the plan's study alone.
    dose = FindReferencing("RTDOSE", "P1", "st-1", ReferenceCriterion(CriterionKind.PLAN, ("1.2",)),
                           Role.DOSE, Hop.PLAN_DOSE)
    for cap in (UPPER, RELATIONAL, HIERARCHICAL):
        steps = search_steps(dose, cap)
        assert dict(steps[0].keys)["StudyInstanceUID"] == "st-1"
        assert all("PatientID" not in dict(s.keys) for s in steps), cap


def test_frame_of_reference_asked_at_series_level_only_where_instance_keys_are_returned() -> None:
    op = FindSeriesInFrameOfReference("P1", "9.9", (), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR)
    steps = search_steps(op, RELATIONAL)
    assert dict(steps[0].keys)["PatientID"] == "P1" and "FrameOfReferenceUID" in dict(steps[1].keys)
    assert "PatientID" not in dict(steps[1].keys)
    no_inst = SourceCapability(relational=True, sequence_return_keys=False, instance_return_keys=False)
    assert "FrameOfReferenceUID" not in dict(search_steps(op, no_inst)[1].keys)


def _hinted() -> RetrieveInstance:
    return RetrieveInstance("sop-1", "P1", "study-1", "series-1", None, Role.PLANNING_IMAGE, Hop.STRUCTURE_SET_IMAGE)


def test_hinted_image_is_found_in_its_series_listing() -> None:
    for cap in (RELATIONAL, HIERARCHICAL):
        steps = search_steps(_hinted(), cap)
        assert dict(steps[0].keys) == {"StudyInstanceUID": "study-1", "SeriesInstanceUID": "series-1",
                                       "SOPInstanceUID": ""}
        assert steps[0].filters == (AnswerFilter.NAMED_INSTANCE,)
        # Its fallback ignores the hint.
        fallback = fallback_steps(_hinted(), cap)
        assert fallback and "series-1" not in str(fallback[0].keys)
    unhinted = RetrieveInstance("sop-1", "P1", None, None, "RTPLAN", Role.PLAN, Hop.RECORD_PLAN)
    assert fallback_steps(unhinted, RELATIONAL) == ()


def _run(answers: Mapping[tuple[str, str], list[dict[str, str]]], cap: SourceCapability) -> tuple[list[Any], list[Any]]:
    asked: list[Any] = []
    moved: list[Any] = []

    def find(level: QueryLevel, ident: dict[str, Any]) -> list[dict[str, str]]:
        asked.append((level, ident))
        return answers.get((level.value, str(ident.get("SeriesInstanceUID"))), [])

    def retrieve(level: QueryLevel, ident: dict[str, Any], candidate: bool) -> None:
        moved.append(ident)

    execute(_hinted(), cap, find, retrieve)
    return asked, moved


def test_listing_of_the_hinted_series_moves_only_the_named_image() -> None:
    listing = [{"StudyInstanceUID": "study-1", "SeriesInstanceUID": "series-1", "SOPInstanceUID": s}
               for s in ("sop-0", "sop-1", "sop-2")]
    asked, moved = _run({("IMAGE", "series-1"): listing}, RELATIONAL)
    assert len(asked) == 1
    assert moved == [{"StudyInstanceUID": "study-1", "SeriesInstanceUID": "series-1", "SOPInstanceUID": "sop-1"}]


def test_wrong_hint_falls_back_to_the_uid() -> None:
    """The structure set names the wrong series: its listing lacks the image, which is then found by UID."""
    elsewhere = [{"StudyInstanceUID": "study-2", "SeriesInstanceUID": "series-2", "SOPInstanceUID": "sop-1"}]
    asked, moved = _run({("IMAGE", "series-1"): [{"StudyInstanceUID": "study-1", "SeriesInstanceUID": "series-1",
                                                  "SOPInstanceUID": "sop-9"}],
                         ("IMAGE", ""): elsewhere}, RELATIONAL)
    assert len(asked) == 2 and asked[1][1]["SOPInstanceUID"] == "sop-1"
    assert moved == [{"StudyInstanceUID": "study-2", "SeriesInstanceUID": "series-2", "SOPInstanceUID": "sop-1"}]


def _walk_cost(cap: SourceCapability) -> tuple[dict[str, int], list[Any]]:
    """A window's records search at a source holding two record studies dated in the window's look-back: one
    of a course treated in the window, one of a course that ended before it (3 record series each). The
    source matches TreatmentDate (Orthanc), so the earlier course's series list no record. Returns the
    C-FINDs per study (or "window" for a query naming no study) and the retrieves."""
    window = HarvestWindow("20200301", "20200331")
    dates = {"in": "20200302", "old": "20200120"}
    finds: dict[str, int] = {}
    moved: list[Any] = []

    def record(study: str, series: int) -> dict[str, str]:
        return {"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.{series}",
                "SOPInstanceUID": f"{study}.{series}.1", "TreatmentDate": dates[study]}

    def find(level: QueryLevel, ident: dict[str, Any]) -> list[dict[str, str]]:
        study = str(ident.get("StudyInstanceUID") or "window")
        finds[study] = finds.get(study, 0) + 1
        if level is QueryLevel.STUDY:
            return [{"StudyInstanceUID": s, "ModalitiesInStudy": "RTRECORD"} for s in dates]
        if level is QueryLevel.SERIES:
            return [{"StudyInstanceUID": study, "SeriesInstanceUID": f"{study}.{n}"} for n in (1, 2, 3)]
        wanted = str(ident["TreatmentDate"]).split("-")
        matches = [record(s, n) for s in dates for n in (1, 2, 3) if wanted[0] <= dates[s] <= wanted[1]]
        return [a for a in matches if study == "window" or (a["StudyInstanceUID"] == study
                                                            and a["SeriesInstanceUID"] == ident["SeriesInstanceUID"])]

    def retrieve(level: QueryLevel, ident: dict[str, Any], candidate: bool) -> None:
        moved.append(ident["SOPInstanceUID"])

    execute(FindTreatmentRecords(window, None), cap, find, retrieve)
    return finds, moved


def test_without_upper_level_keys_each_record_study_in_the_look_back_is_walked() -> None:
    """What history near a window costs a StudyDate search (benchmarks/README.md, "Discovery at clinic scale"):
    without UpperLevelKeys a record study dated in the look-back costs one SERIES-level C-FIND plus one
    IMAGE-level C-FIND per record series even when none of its records is in the window; with them, the
    window's records come in one C-FIND whatever the look-back holds. Either way only in-window records move."""
    walked, moved = _walk_cost(RELATIONAL)
    assert walked == {"window": 1, "in": 4, "old": 4}
    assert sorted(moved) == ["in.1.1", "in.2.1", "in.3.1"]
    one, moved_upper = _walk_cost(UPPER)
    assert one == {"window": 1}
    assert sorted(moved_upper) == sorted(moved)

"""Hop planner: one test per step and per trap on hand-built objects, plus operations, search
strategies and the fake source (no servers)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydicom.dataset import Dataset

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import (
    CriterionKind,
    FindReferencing,
    FindSeriesInFrameOfReference,
    FindTreatmentRecords,
    Hop,
    Operation,
    ReferenceCriterion,
    RetrieveInstance,
    RetrieveSeries,
    Role,
    operation_from_dict,
)
from rtharvest.core.planner import (
    MAX_CHUNKS,
    Arrival,
    Decision,
    HarvestContext,
    leaves_kept_alone,
    plan_arrival,
    start_operations,
)
from rtharvest.core.references import ObjectKind, ObjectRefs, extract
from rtharvest.core.strategies import (
    AnswerFilter,
    QueryLevel,
    SourceCapability,
    StepAction,
    filter_answers,
    search_steps,
)
from rtharvest.synth.simulation import FakeSource, QueryRejected, simulate_harvest

from .planner_fixtures import MiniClinic, dose, image_series, plan, record, registration, structure_set, uid

CTX = HarvestContext(HarvestWindow("20200101", "20201231"))
P = "P1"
STUDY = uid("study")
FOR = uid("for")
CAPABILITIES = [SourceCapability(r, s, i) for r in (True, False) for s in (True, False) for i in (True, False)]


def decide(ds: Dataset, op: Operation | None, candidate: bool = False, ctx: HarvestContext = CTX) -> Decision:
    return plan_arrival(Arrival(extract(ds), op, candidate), ctx)


def only(ops: tuple[Operation, ...], cls: type[Any]) -> list[Any]:
    return [o for o in ops if isinstance(o, cls)]


def chunk_span(op: Operation) -> tuple[str, str]:
    """The dates a month-chunked records search covers."""
    assert isinstance(op, FindTreatmentRecords) and op.chunk_from is not None and op.chunk_to is not None, op
    return op.chunk_from, op.chunk_to


def plan_op(uid_: str) -> RetrieveInstance:
    return RetrieveInstance(uid_, P, None, None, "RTPLAN", Role.PLAN, Hop.RECORD_PLAN)


# -- rule 1: seed records --------------------------------------------------------------------------


def test_start_operations() -> None:
    # A dated window is searched month by month, as separate jobs.
    chunks = start_operations(CTX)
    assert [chunk_span(o) for o in chunks] == [
        (f"2020{m:02d}01", f"2020{m:02d}{d}") for m, d in zip(range(1, 13), (31, 29, 31, 30, 31, 30, 31, 31, 30,
                                                                              31, 30, 31), strict=True)]
    assert all(isinstance(o, FindTreatmentRecords) and o.window == CTX.window for o in chunks)
    assert len({o.dedupe_key() for o in chunks}) == 12
    short = HarvestContext(HarvestWindow("20200305", "20200320"))
    assert start_operations(short) == (FindTreatmentRecords(short.window, None),)
    decade = start_operations(HarvestContext(HarvestWindow("20120115", "20220710")))
    spans = [chunk_span(o) for o in decade if isinstance(o, FindTreatmentRecords)]
    assert len(spans) <= MAX_CHUNKS and spans[0][0] == "20120115" and spans[-1][1] == "20220710"
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous, no overlap
    open_ended = HarvestContext(HarvestWindow("20200305", None))
    assert start_operations(open_ended) == (FindTreatmentRecords(open_ended.window, None),)
    ctx = HarvestContext(HarvestWindow(None, None, ("A", "B")))
    assert [o.patient_id for o in start_operations(ctx)] == ["A", "B"]


def test_seed_record_in_window_plans_its_plan() -> None:
    d = decide(record("r", P, "1.2.5", "20200615"), FindTreatmentRecords(CTX.window))
    assert d.keep
    assert d.operations == (plan_op("1.2.5"),)


@pytest.mark.parametrize("date", ["20191231", "20210101"])
def test_seed_record_outside_window_is_rejected(date: str) -> None:
    # Sources that ignore TreatmentDate matching return every record: the planner filters.
    d = decide(record("r", P, "1.2.5", date), FindTreatmentRecords(CTX.window))
    assert not d.keep and "outside the window" in d.reason and d.operations == ()


def test_seed_record_of_another_patient_is_rejected() -> None:
    ctx = HarvestContext(HarvestWindow(None, None, ("P2",)))
    assert not decide(record("r", P, "1.2.5", "20200615"), FindTreatmentRecords(ctx.window, "P2"), ctx=ctx).keep
    assert not decide(record("r", P, "1.2.5", "20200615"), FindTreatmentRecords(ctx.window), ctx=ctx).keep


def test_unsolicited_objects() -> None:
    pushed = decide(record("r", P, "1.2.5", "20200615"), None)
    assert pushed.keep and pushed.operations == (plan_op("1.2.5"),)
    assert not decide(record("r", P, "1.2.5", "20190615"), None).keep
    assert not decide(image_series("ct", P, STUDY, FOR)[0], None).keep


def test_records_search_returning_a_non_record() -> None:
    assert not decide(dose("d", P, STUDY, "1.2.5"), FindTreatmentRecords(CTX.window)).keep


# -- rule 2: plans ---------------------------------------------------------------------------------


def test_valid_plan_plans_records_structure_set_and_doses() -> None:
    p = plan("plan", P, STUDY, "1.2.10")
    d = decide(p, plan_op(p.SOPInstanceUID))
    assert d.keep
    records = only(d.operations, FindReferencing)
    assert {(o.modality, o.study_uid, o.role) for o in records} == {
        ("RTRECORD", None, Role.PLAN_RECORD), ("RTDOSE", STUDY, Role.DOSE)}
    for o in records:
        assert o.criterion == ReferenceCriterion(CriterionKind.PLAN, (p.SOPInstanceUID,))
    dose_search = next(o for o in records if o.modality == "RTDOSE")
    assert dose_search.plan_has_structure_set
    [ss] = only(d.operations, RetrieveInstance)
    assert (ss.sop_uid, ss.role, ss.hop) == ("1.2.10", Role.STRUCTURE_SET, Hop.PLAN_STRUCTURE_SET)


@pytest.mark.parametrize("intent", ["VERIFICATION", "MACHINE_QA", "SERVICE"])
def test_qa_plan_is_kept_and_not_followed(intent: str) -> None:
    p = plan("qa", "QA_PHANTOM", STUDY, "1.2.10", intent=intent, related=[("1.2.77", "VERIFIED_PLAN")])
    d = decide(p, plan_op(p.SOPInstanceUID))
    assert d.keep and d.operations == ()
    assert intent in d.reason


def test_plan_without_intent_and_nonstandard_intent_are_followed() -> None:
    for intent in (None, "HOUSE_TERM"):
        p = plan("p", P, STUDY, "1.2.10", intent=intent)
        d = decide(p, plan_op(p.SOPInstanceUID))
        assert d.keep and d.operations
    assert any(pr.attribute == "PlanIntent" for pr in d.problems)


def test_ion_plan_is_followed_like_a_photon_plan() -> None:
    p = plan("ion", P, STUDY, "1.2.10", ion=True)
    d = decide(p, plan_op(p.SOPInstanceUID))
    assert d.keep and len(d.operations) == 3 and "ion plan" in d.reason


def test_replan_link_is_not_followed() -> None:
    # A re-plan names its predecessor; the predecessor is collected only if a seed record treats it.
    p = plan("replan", P, STUDY, "1.2.10", related=[("1.2.66", "PREDECESSOR")])
    d = decide(p, plan_op(p.SOPInstanceUID))
    assert all("1.2.66" not in json.dumps(o.to_dict()) for o in d.operations)


def test_wrong_object_for_a_plan_request() -> None:
    ss = structure_set("ss", P, STUDY, [image_series("ct", P, STUDY, FOR)])
    assert not decide(ss, plan_op(ss.SOPInstanceUID)).keep
    p = plan("p", P, STUDY, "1.2.10")
    assert not decide(p, plan_op("1.2.999")).keep  # not the requested instance


def test_plan_of_another_patient_id_is_kept_with_a_problem() -> None:
    p = plan("p", "P1-MIM", STUDY, "1.2.10")
    d = decide(p, plan_op(p.SOPInstanceUID))
    assert d.keep and any(pr.attribute == "PatientID" for pr in d.problems)


# -- rule 3 / step 4 and rule 5 / step 3: reverse searches -----------------------------------------


def test_plan_records_whatever_their_date() -> None:
    op = FindReferencing("RTRECORD", P, None, ReferenceCriterion(CriterionKind.PLAN, ("1.2.5",)),
                         Role.PLAN_RECORD, Hop.PLAN_RECORD)
    assert decide(record("old", P, "1.2.5", "20150101"), op).keep
    assert decide(record("old", P, "1.2.5", "20150101"), op).operations == ()
    other = decide(record("other", P, "1.2.6", "20200601"), op, candidate=True)
    assert not other.keep and "does not reference" in other.reason


def test_dose_of_the_plan_kept_trial_dose_rejected() -> None:
    op = FindReferencing("RTDOSE", P, STUDY, ReferenceCriterion(CriterionKind.PLAN, ("1.2.5",)), Role.DOSE,
                         Hop.PLAN_DOSE)
    kept = decide(dose("d", P, STUDY, "1.2.5", ss_uid="1.2.10"), op)
    assert kept.keep and kept.operations == ()  # plan had its own structure set: the dose's is ignored
    trial = decide(dose("trial", P, STUDY, "1.2.99"), op, candidate=True)
    assert not trial.keep
    wrong_kind = decide(record("r", P, "1.2.5", "20200101"), op, candidate=True)
    assert not wrong_kind.keep


def test_tomotherapy_dose_names_the_structure_set() -> None:
    p = plan("tomo", P, STUDY, None)
    d = decide(p, plan_op(p.SOPInstanceUID))
    dose_search = next(o for o in only(d.operations, FindReferencing) if o.modality == "RTDOSE")
    assert not dose_search.plan_has_structure_set
    assert not only(d.operations, RetrieveInstance)
    arrived = decide(dose("td", P, STUDY, p.SOPInstanceUID, ss_uid="1.2.10"), dose_search)
    assert arrived.keep
    [ss] = arrived.operations
    assert isinstance(ss, RetrieveInstance)
    assert (ss.sop_uid, ss.role, ss.hop) == ("1.2.10", Role.STRUCTURE_SET, Hop.DOSE_STRUCTURE_SET)


def test_searches_that_leave_kept_objects_alone_plan_nothing() -> None:
    # The worker neither reads nor re-plans an object its harvest kept when leaves_kept_alone(op) says so
    # (harvest/harvester.py, _prepare): whatever such a search offers must plan no operation, while the
    # reverse searches it says False of do plan from some object.
    plan_uid = "1.2.5"
    ct = image_series("ct", P, STUDY, FOR, "CT")
    mr = image_series("mr", P, uid("mr-study"), uid("for-mr"), "MR")
    objects = [record("r", P, plan_uid, "20200601"), record("r-old", P, plan_uid, "20150101"),
               dose("d", P, STUDY, plan_uid, ss_uid="1.2.10"), dose("d-other", P, STUDY, "1.2.99"),
               registration("reg", P, STUDY, ct, mr), plan("p", P, STUDY, "1.2.10"), ct[0], mr[0]]
    by_plan = ReferenceCriterion(CriterionKind.PLAN, (plan_uid,))
    searches = [
        FindReferencing("RTRECORD", P, None, by_plan, Role.PLAN_RECORD, Hop.PLAN_RECORD),
        FindReferencing("RTDOSE", P, STUDY, by_plan, Role.DOSE, Hop.PLAN_DOSE),
        FindReferencing("RTDOSE", P, STUDY, by_plan, Role.DOSE, Hop.PLAN_DOSE, plan_has_structure_set=False),
        reg_op(FOR),
    ]
    for op in searches:
        planned = [decide(o, op, candidate).operations for o in objects for candidate in (False, True)]
        if leaves_kept_alone(op):
            assert not any(planned), op
        else:
            assert any(planned), op
    assert [leaves_kept_alone(op) for op in searches] == [True, True, False, False]
    assert not any(leaves_kept_alone(op) for op in (plan_op(plan_uid), ss_op("1.2.10"), for_op(FOR)))


# -- rule 6: planning series -----------------------------------------------------------------------


def ss_op(uid_: str) -> RetrieveInstance:
    return RetrieveInstance(uid_, P, None, None, "RTSTRUCT", Role.STRUCTURE_SET, Hop.PLAN_STRUCTURE_SET)


def test_structure_set_plans_referenced_series_and_first_contour_image() -> None:
    ct = image_series("ct", P, STUDY, FOR, "CT", 4)
    ss = structure_set("ss", P, STUDY, [ct], empty_first_roi=True)
    d = decide(ss, ss_op(ss.SOPInstanceUID))
    assert d.keep
    [series] = only(d.operations, RetrieveSeries)
    assert (series.series_uid, series.study_uid, series.role) == (ct[0].SeriesInstanceUID, STUDY,
                                                                  Role.PLANNING_SERIES)
    [img] = only(d.operations, RetrieveInstance)
    # The empty first ROI is skipped: the first contour of ROI 2 is on image 1 (fixture order).
    assert img.sop_uid == ct[1].SOPInstanceUID and img.role is Role.PLANNING_IMAGE
    assert img.series_uid == ct[0].SeriesInstanceUID  # hint for hierarchical sources


def test_first_contour_image_outside_the_listed_series() -> None:
    listed = image_series("ct", P, STUDY, FOR, "CT", 2)
    contoured = image_series("ct2", P, STUDY, FOR, "CT", 2)
    ss = structure_set("ss", P, STUDY, [listed], contour_series=contoured)
    d = decide(ss, ss_op(ss.SOPInstanceUID))
    [img] = only(d.operations, RetrieveInstance)
    assert img.series_uid is None and img.study_uid is None  # unknown: searched by UID
    # Its arrival plans its own series.
    arrived = decide(contoured[1], img)
    assert arrived.keep
    [series] = arrived.operations
    assert isinstance(series, RetrieveSeries) and series.series_uid == contoured[0].SeriesInstanceUID
    assert series.role is Role.PLANNING_SERIES


def test_planning_series_image_plans_for_search_and_reg_search() -> None:
    ct = image_series("ct", P, STUDY, FOR, "MR", 2)  # planning MR: the fixed side is MR
    op = RetrieveSeries(P, STUDY, ct[0].SeriesInstanceUID, Role.PLANNING_SERIES, Hop.STRUCTURE_SET_SERIES)
    d = decide(ct[0], op)
    [for_search] = only(d.operations, FindSeriesInFrameOfReference)
    assert (for_search.for_uid, for_search.role, for_search.exclude_series) == (
        FOR, Role.PLANNING_FOR_SERIES, (ct[0].SeriesInstanceUID,))
    [reg_search] = only(d.operations, FindReferencing)
    assert reg_search.modality == "REG" and reg_search.criterion.kind is CriterionKind.FRAME_OF_REFERENCE
    assert reg_search.fixed_modality == "MR"
    # Every image of the series plans the same operations (same dedupe keys).
    d2 = decide(ct[1], op)
    assert [o.dedupe_key() for o in d.operations] == [o.dedupe_key() for o in d2.operations]
    assert not decide(image_series("x", P, STUDY, FOR)[0], op).keep  # not in the series


def test_planning_image_without_for() -> None:
    ct = image_series("ct", P, STUDY, None)
    op = RetrieveSeries(P, STUDY, ct[0].SeriesInstanceUID, Role.PLANNING_SERIES, Hop.STRUCTURE_SET_SERIES)
    d = decide(ct[0], op)
    assert d.keep and d.operations == () and any(p.attribute == "FrameOfReferenceUID" for p in d.problems)


# -- rules 7-10: FoR series and registrations ------------------------------------------------------


def for_op(for_uid: str, role: Role = Role.PLANNING_FOR_SERIES) -> FindSeriesInFrameOfReference:
    return FindSeriesInFrameOfReference(P, for_uid, (uid("ct", "series"),), role, Hop.SERIES_FOR)


def test_for_series_arrivals() -> None:
    pet = image_series("pet", P, STUDY, FOR, "PT")
    assert decide(pet[0], for_op(FOR)).keep
    assert decide(pet[0], for_op(FOR)).operations == ()  # step 8 series: nothing further
    assert not decide(image_series("other", P, STUDY, uid("other-for"))[0], for_op(FOR), candidate=True).keep
    probe = decide(pet[0], for_op(FOR), candidate=True)
    assert probe.keep
    [series] = probe.operations
    assert isinstance(series, RetrieveSeries) and series.role is Role.PLANNING_FOR_SERIES
    rtdose = dose("d", P, STUDY, "1.2.5")
    assert not decide(rtdose, for_op(FOR), candidate=True).keep


def reg_op(for_uid: str, exclude: tuple[str, ...] = ()) -> FindReferencing:
    return FindReferencing("REG", P, None, ReferenceCriterion(CriterionKind.FRAME_OF_REFERENCE, (for_uid,)),
                           Role.REGISTRATION, Hop.FOR_REG, exclude_series=exclude, fixed_modality="CT")


def test_rigid_registration_plans_the_registered_series() -> None:
    ct = image_series("ct", P, STUDY, FOR, "CT")
    mr = image_series("mr", P, uid("mr-study"), uid("for-mr"), "MR")
    reg = registration("reg", P, STUDY, ct, mr)
    d = decide(reg, reg_op(FOR, (ct[0].SeriesInstanceUID,)))
    assert d.keep
    [series] = d.operations
    assert isinstance(series, RetrieveSeries)
    assert (series.series_uid, series.study_uid, series.role) == (mr[0].SeriesInstanceUID, uid("mr-study"),
                                                                  Role.REGISTERED_SERIES)
    assert series.planning_fors == (FOR,)


def test_registration_where_the_planning_ct_is_the_moving_side() -> None:
    # The REG's own FoR is the diagnostic MR's; the planning FoR appears only in an item.
    ct = image_series("ct", P, STUDY, FOR, "CT")
    mr = image_series("mr", P, uid("mr-study"), uid("for-mr"), "MR")
    reg = registration("reg", P, STUDY, mr, ct)
    d = decide(reg, reg_op(FOR, (ct[0].SeriesInstanceUID,)))
    assert d.keep
    assert [o.series_uid for o in only(d.operations, RetrieveSeries)] == [mr[0].SeriesInstanceUID]


def test_deformable_registration() -> None:
    ct = image_series("ct", P, STUDY, FOR, "CT")
    cbct = image_series("cbct", P, uid("s2"), uid("for-cbct"), "CT")
    reg = registration("def", P, STUDY, ct, cbct, deformable=True)
    d = decide(reg, reg_op(FOR, (ct[0].SeriesInstanceUID,)))
    assert d.keep and [o.series_uid for o in only(d.operations, RetrieveSeries)] == [cbct[0].SeriesInstanceUID]
    # Matched through the item's SourceFrameOfReferenceUID too.
    assert decide(reg, reg_op(uid("for-cbct"))).keep


def test_registration_of_another_for_is_rejected() -> None:
    a = image_series("a", P, STUDY, uid("for-a"), "CT")
    b = image_series("b", P, STUDY, uid("for-b"), "MR")
    d = decide(registration("reg", P, STUDY, a, b), reg_op(FOR), candidate=True)
    assert not d.keep and d.operations == ()


def test_registration_item_naming_only_a_for() -> None:
    ct = image_series("ct", P, STUDY, FOR, "CT")
    reg = registration("reg", P, STUDY, ct, None, for_only=uid("for-x"))
    d = decide(reg, reg_op(FOR, (ct[0].SeriesInstanceUID,)))
    [search] = d.operations
    assert isinstance(search, FindSeriesInFrameOfReference)
    assert (search.for_uid, search.role) == (uid("for-x"), Role.REGISTERED_FOR_SERIES)


def test_registration_with_image_references_only() -> None:
    ct = image_series("ct", P, STUDY, FOR, "CT")
    mr = image_series("mr", P, uid("mr-study"), uid("for-mr"), "MR")
    reg = registration("reg", P, STUDY, ct, mr, series_level=False)
    d = decide(reg, reg_op(FOR))
    [img] = d.operations
    assert isinstance(img, RetrieveInstance) and img.role is Role.REGISTERED_IMAGE
    arrived = decide(mr[0], img)
    [series] = arrived.operations
    assert isinstance(series, RetrieveSeries) and series.role is Role.REGISTERED_SERIES


def test_registered_series_plans_step_10() -> None:
    ct = image_series("petct-ct", P, STUDY, uid("for-petct"), "CT")
    op = RetrieveSeries(P, STUDY, ct[0].SeriesInstanceUID, Role.REGISTERED_SERIES, Hop.REG_SERIES, (FOR,))
    [search] = decide(ct[0], op).operations
    assert isinstance(search, FindSeriesInFrameOfReference)
    assert (search.for_uid, search.role) == (uid("for-petct"), Role.REGISTERED_FOR_SERIES)
    # A registered series that sits in a planning FoR: step 8 already covers that FoR.
    in_planning = image_series("x", P, STUDY, FOR, "CT")
    op2 = RetrieveSeries(P, STUDY, in_planning[0].SeriesInstanceUID, Role.REGISTERED_SERIES, Hop.REG_SERIES, (FOR,))
    assert decide(in_planning[0], op2).operations == ()


def test_unreadable_arrivals() -> None:
    unreadable = ObjectRefs("1.2.3", "", None, None, None, None, None, ObjectKind.UNREADABLE)
    assert plan_arrival(Arrival(unreadable, ss_op("1.2.3")), CTX).keep
    assert not plan_arrival(Arrival(unreadable, for_op(FOR), True), CTX).keep


# -- operations as values --------------------------------------------------------------------------


ALL_OPS: list[Operation] = [
    FindTreatmentRecords(HarvestWindow("20200101", "20201231", ("P1",)), "P1"),
    RetrieveInstance("1.2.3", P, STUDY, None, "RTPLAN", Role.PLAN, Hop.RECORD_PLAN, (FOR,)),
    RetrieveSeries(P, None, "1.2.4", Role.REGISTERED_SERIES, Hop.REG_SERIES, (FOR,)),
    FindReferencing("RTDOSE", P, STUDY, ReferenceCriterion(CriterionKind.PLAN, ("1.2.5",)), Role.DOSE,
                    Hop.PLAN_DOSE, plan_has_structure_set=False),
    reg_op(FOR, ("1.2.6",)),
    FindSeriesInFrameOfReference(P, FOR, ("1.2.7",), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR, ("CT", "PT")),
]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.kind.value)
def test_operation_round_trip(op: Operation) -> None:
    data = json.loads(json.dumps(op.to_dict()))
    assert data["kind"] == op.kind.value
    back = operation_from_dict(data)
    assert back == op and back.dedupe_key() == op.dedupe_key()


def test_unknown_operation_kind() -> None:
    with pytest.raises(ValueError):
        operation_from_dict({"kind": "Nope"})


def test_dedupe_keys() -> None:
    a = RetrieveSeries(P, STUDY, "1.2.4", Role.PLANNING_SERIES, Hop.STRUCTURE_SET_SERIES)
    b = RetrieveSeries(P, STUDY, "1.2.4", Role.PLANNING_SERIES, Hop.IMAGE_SERIES)
    c = RetrieveSeries(P, STUDY, "1.2.4", Role.REGISTERED_SERIES, Hop.REG_SERIES)
    assert a.dedupe_key() == b.dedupe_key() != c.dedupe_key()  # the hop does not matter, the role does
    f1 = FindSeriesInFrameOfReference(P, FOR, ("x",), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR)
    f2 = FindSeriesInFrameOfReference(P, FOR, ("y",), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR)
    assert f1.dedupe_key() == f2.dedupe_key()
    assert len({o.dedupe_key() for o in ALL_OPS}) == len(ALL_OPS)


# -- search strategies ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda o: o.kind.value)
def test_hierarchical_steps_never_skip_a_level(op: Operation) -> None:
    for cap in CAPABILITIES:
        steps = search_steps(op, cap)
        assert steps[-1].action is StepAction.RETRIEVE
        if cap.relational:
            continue
        for step in steps:
            ident = step.identifier({"StudyInstanceUID": "s", "SeriesInstanceUID": "x", "SOPInstanceUID": "i",
                                     "PatientID": "p"})
            if step.level is QueryLevel.IMAGE:
                assert ident.get("StudyInstanceUID") and ident.get("SeriesInstanceUID"), step
            if step.level is QueryLevel.SERIES and step.action is StepAction.FIND:
                assert ident.get("StudyInstanceUID"), step


def test_relational_finds_by_sop_uid_alone() -> None:
    op = RetrieveInstance("1.2.3", P, None, None, "RTPLAN", Role.PLAN, Hop.RECORD_PLAN)
    find, move = search_steps(op, SourceCapability(True, False))
    assert find.level is QueryLevel.IMAGE and dict(find.keys)["SOPInstanceUID"] == "1.2.3"
    assert move.action is StepAction.RETRIEVE
    walk = search_steps(op, SourceCapability(False, False))
    assert [s.level for s in walk] == [QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE, QueryLevel.IMAGE]
    assert dict(walk[1].keys)["Modality"] == "RTPLAN"


def test_sequence_return_keys_filter_instead_of_retrieving() -> None:
    op = ALL_OPS[3]
    with_seq = search_steps(op, SourceCapability(True, True))
    # Relational: the series of the plan's study first (the listing every search of the study shares; the dose
    # series selected by Modality), then their instances with the sequence.
    assert with_seq[0].level is QueryLevel.SERIES and AnswerFilter.MODALITY in with_seq[0].filters
    assert "ReferencedRTPlanSequence" in dict(with_seq[-2].keys)
    assert AnswerFilter.CRITERION in with_seq[-2].filters and not with_seq[-1].candidate
    without = search_steps(op, SourceCapability(True, False))
    assert "ReferencedRTPlanSequence" not in dict(without[-2].keys) and without[-1].candidate


def test_for_search_probes_when_the_source_does_not_return_for() -> None:
    op = ALL_OPS[5]
    assert search_steps(op, SourceCapability(True, True))[-1].level is QueryLevel.SERIES
    probe = search_steps(op, SourceCapability(True, True, instance_return_keys=False))[-1]
    assert probe.level is QueryLevel.IMAGE and probe.candidate


def test_criterion_filter_on_answers() -> None:
    op = ALL_OPS[3]
    assert isinstance(op, FindReferencing)
    step = search_steps(op, SourceCapability(True, True))[-2]
    mine = dose("d", P, STUDY, "1.2.5")
    trial = dose("t", P, STUDY, "1.2.99")
    answers = [{"SOPInstanceUID": d.SOPInstanceUID, "Modality": "RTDOSE",
                "ReferencedRTPlanSequence": d.ReferencedRTPlanSequence} for d in (mine, trial)]
    # An answer without the sequence (the SCP did not return it) is undecidable: passed on.
    answers.append({"SOPInstanceUID": "1.2.8", "Modality": "RTDOSE"})
    kept = filter_answers(step, op, answers)
    assert [a["SOPInstanceUID"] for a in kept] == [mine.SOPInstanceUID, "1.2.8"]


# -- the fake source answers only what a real SCP of its kind could --------------------------------


def test_strict_hierarchical_source_rejects_shortcuts() -> None:
    ct = image_series("ct", P, STUDY, FOR)
    src = FakeSource(ct, SourceCapability(False, False))
    with pytest.raises(QueryRejected):
        src.find(QueryLevel.IMAGE, {"SOPInstanceUID": ct[0].SOPInstanceUID})
    with pytest.raises(QueryRejected):
        src.find(QueryLevel.SERIES, {"PatientID": P, "StudyInstanceUID": STUDY})
    with pytest.raises(QueryRejected):
        src.find(QueryLevel.IMAGE, {"StudyInstanceUID": STUDY, "SeriesInstanceUID": ct[0].SeriesInstanceUID,
                                    "FrameOfReferenceUID": FOR})
    with pytest.raises(QueryRejected):
        src.retrieve(QueryLevel.IMAGE, {"SOPInstanceUID": ct[0].SOPInstanceUID})
    answers = src.find(QueryLevel.IMAGE, {"StudyInstanceUID": STUDY, "SeriesInstanceUID": ct[0].SeriesInstanceUID,
                                          "SOPInstanceUID": "", "FrameOfReferenceUID": ""})
    assert len(answers) == 3 and answers[0]["FrameOfReferenceUID"] == FOR


def test_relational_source_and_return_keys() -> None:
    d = dose("d", P, STUDY, "1.2.5")
    ident = {"SOPInstanceUID": d.SOPInstanceUID, "ReferencedRTPlanSequence": "", "FrameOfReferenceUID": ""}
    [with_seq] = FakeSource([d], SourceCapability(True, True)).find(QueryLevel.IMAGE, ident)
    assert len(with_seq["ReferencedRTPlanSequence"]) == 1
    [without] = FakeSource([d], SourceCapability(True, False, False)).find(QueryLevel.IMAGE, ident)
    assert "ReferencedRTPlanSequence" not in without and "FrameOfReferenceUID" not in without
    src = FakeSource([d], SourceCapability(True, False))
    assert src.retrieve(QueryLevel.IMAGE, {"SOPInstanceUID": "1.2.404"}) == []  # success, 0 sent


# -- a whole harvest over the mini clinic -----------------------------------------------------------


@pytest.mark.parametrize("cap", CAPABILITIES, ids=lambda c: c.label())
def test_mini_clinic_closure(cap: SourceCapability) -> None:
    m = MiniClinic()
    src = FakeSource(m.datasets(), cap)
    res = simulate_harvest(src, HarvestWindow("20200101", "20201231"), cap)
    assert res.collected == m.expected_2020()
    trial = {m.trial.SOPInstanceUID, m.trial_dose.SOPInstanceUID}
    assert not trial & res.collected
    tomo = simulate_harvest(src, HarvestWindow("20230101", "20231231"), cap)
    assert tomo.collected == m.expected_2023()
    # Inspected-and-rejected candidates exist only where the source cannot filter for us.
    if cap.sequence_return_keys and cap.instance_return_keys:
        assert not res.rejected
    if not cap.sequence_return_keys:
        assert m.trial_dose.SOPInstanceUID in res.rejected
    # The missing plan is an operation that moved nothing.
    assert any(isinstance(o, RetrieveInstance) and o.sop_uid == m.missing_plan_uid for o in res.empty_operations)


def test_mini_clinic_roles() -> None:
    m = MiniClinic()
    cap = SourceCapability(True, True)
    res = simulate_harvest(m.datasets(), HarvestWindow("20200101", "20201231"), cap)
    roles: dict[str, set[Role]] = {}
    for d in res.decisions:
        if d.decision.keep:
            roles.setdefault(d.sop_uid, set()).add(d.operation.role)
    assert Role.PLANNING_FOR_SERIES in roles[m.pet_sim[0].SOPInstanceUID]  # step 8: PET/CT simulation
    assert Role.REGISTERED_SERIES in roles[m.petct_ct[0].SOPInstanceUID]  # step 9
    assert Role.REGISTERED_FOR_SERIES in roles[m.petct_pt[0].SOPInstanceUID]  # step 10
    assert Role.REGISTERED_SERIES in roles[m.def_ct[0].SOPInstanceUID]  # deformable REG
    assert roles[m.records[-1].SOPInstanceUID] == {Role.PLAN_RECORD}  # 2021 record via step 4
    assert roles[m.qa_plan.SOPInstanceUID] == {Role.PLAN}
    assert m.qa_dose.SOPInstanceUID not in roles and m.phantom[0].SOPInstanceUID not in roles


def test_patient_window() -> None:
    m = MiniClinic()
    cap = SourceCapability(False, False)
    res = simulate_harvest(m.datasets(), HarvestWindow(None, None, (m.patient,)), cap)
    assert res.collected == (m.expected_2020() | m.expected_2023()) - {m.qa_plan.SOPInstanceUID,
                                                                       m.qa_record.SOPInstanceUID}


def test_month_chunks_at_the_ends_of_the_calendar() -> None:
    from rtharvest.core.planner import month_chunks
    from rtharvest.core.strategies import look_back

    assert month_chunks("99991215", "99991231") == [("99991215", "99991231")]
    assert month_chunks("99991130", "99991231") == [("99991130", "99991130"), ("99991201", "99991231")]
    assert month_chunks("00010101", "00010215") == [("00010101", "00010131"), ("00010201", "00010215")]
    assert month_chunks("20241215", "20250110") == [("20241215", "20241231"), ("20250101", "20250110")]
    assert look_back("00010110", 90) == "00010101"
    assert look_back("20240301", 1) == "20240229"

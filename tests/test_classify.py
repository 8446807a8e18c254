"""Plan classification, harvest windows and REG types (pure functions the manifest reuses)."""

from __future__ import annotations

import pytest

from rtharvest.core.classify import (
    HarvestWindow,
    PlanClass,
    classify_plan,
    is_followed,
    is_invalid_intent,
    is_standard_intent,
    record_in_window,
    registration_type,
)
from rtharvest.core.references import PlanRefs


def plan_refs(intent: str | None) -> PlanRefs:
    return PlanRefs(("1.2",), (), (), intent, "L", "PATIENT", False)


@pytest.mark.parametrize(
    ("intent", "expected"),
    [
        ("CURATIVE", PlanClass.VALID),
        ("PALLIATIVE", PlanClass.VALID),
        ("PROPHYLACTIC", PlanClass.VALID),
        ("RESEARCH", PlanClass.VALID),
        (None, PlanClass.VALID),
        ("VERIFICATION", PlanClass.VERIFICATION),
        ("verification ", PlanClass.VERIFICATION),
        ("MACHINE_QA", PlanClass.MACHINE_QA),
        ("SERVICE", PlanClass.NON_PATIENT),
        ("WHATEVER", PlanClass.VALID),
    ],
)
def test_classify_by_intent(intent: str | None, expected: PlanClass) -> None:
    assert classify_plan(plan_refs(intent)) is expected
    assert is_invalid_intent(intent) is (expected not in (PlanClass.VALID,))


def test_missing_and_outside_window() -> None:
    assert classify_plan(None) is PlanClass.MISSING
    w = HarvestWindow("20200101", "20201231")
    assert classify_plan(plan_refs("CURATIVE"), w, ["20190105", "20191231"]) is PlanClass.OUTSIDE_WINDOW
    assert classify_plan(plan_refs("CURATIVE"), w, ["20190105", "20200101"]) is PlanClass.VALID
    assert classify_plan(plan_refs("MACHINE_QA"), w, ["20190105"]) is PlanClass.MACHINE_QA
    assert is_followed(PlanClass.VALID) and is_followed(PlanClass.OUTSIDE_WINDOW)
    assert not is_followed(PlanClass.VERIFICATION) and not is_followed(PlanClass.MISSING)


def test_standard_intents() -> None:
    assert is_standard_intent(None) and is_standard_intent("curative") and is_standard_intent("SERVICE")
    assert not is_standard_intent("QA")


def test_window_validation() -> None:
    HarvestWindow("20200101", "20200101")
    HarvestWindow(None, "20200101")
    HarvestWindow(patient_ids=("P1",))
    for bad in [("2020-01-01", None), ("20201301", None), ("20200230", None), ("2020010", None)]:
        with pytest.raises(ValueError):
            HarvestWindow(*bad)
    with pytest.raises(ValueError, match="after"):
        HarvestWindow("20200102", "20200101")
    with pytest.raises(ValueError, match="needs"):
        HarvestWindow()
    with pytest.raises(ValueError):
        HarvestWindow(patient_ids=("",))


def test_window_list_is_a_tuple_and_round_trips() -> None:
    w = HarvestWindow("20200101", None, ["P1", "P2"])  # type: ignore[arg-type,unused-ignore]
    assert w.patient_ids == ("P1", "P2")
    assert HarvestWindow.from_dict(w.to_dict()) == w
    assert w.date_range() == "20200101-"
    assert HarvestWindow(patient_ids=("P",)).date_range() == ""
    gt_entry = {"Name": "patient", "From": None, "To": None, "PatientIDs": ["SYN002"], "Expected": []}
    assert HarvestWindow.from_dict(gt_entry) == HarvestWindow(None, None, ("SYN002",))


def test_record_in_window_is_inclusive() -> None:
    w = HarvestWindow("20200101", "20201231")
    assert record_in_window("20200101", w) and record_in_window("20201231", w)
    assert not record_in_window("20191231", w) and not record_in_window("20210101", w)
    assert not record_in_window(None, w) and not record_in_window("garbage", w)
    open_end = HarvestWindow("20200101", None)
    assert record_in_window("20990101", open_end)
    patients_only = HarvestWindow(patient_ids=("P1",))
    assert record_in_window(None, patients_only)
    assert patients_only.includes("P1", None) and not patients_only.includes("P2", "20200101")


@pytest.mark.parametrize(
    ("fixed", "moving", "expected"),
    [("CT", "MR", "CT-MR"), ("mr", "CT", "MR-CT"), ("CT", "PET", "CT-PT"), (None, "CT", "?-CT"), ("CT", "", "CT-?")],
)
def test_registration_type(fixed: str | None, moving: str | None, expected: str) -> None:
    assert registration_type(fixed, moving) == expected

"""The rules oracle on hand-made facts: cases the generator does not build (FoR-only REG items)."""

from __future__ import annotations

from rtharvest.synth.truth import (
    KDose,
    Knowledge,
    KPlan,
    KRecord,
    KRegistration,
    KSeries,
    KStructureSet,
    evaluate,
)


def _knowledge() -> Knowledge:
    k = Knowledge()
    k.series = {
        "ct": KSeries("ct", "P", "CT", "F1", "S1", ["ct1", "ct2"]),
        "pet_sim": KSeries("pet_sim", "P", "PT", "F1", "S1", ["pt1"]),
        "mr": KSeries("mr", "P", "MR", "F2", "S2", ["mr1"]),
        "pet": KSeries("pet", "P", "PT", "F3", "S3", ["pt3"]),
        "ct3": KSeries("ct3", "P", "CT", "F3", "S3", ["ct3a"]),
        "knee": KSeries("knee", "P", "CT", "F9", "S9", ["k1"]),
    }
    k.structure_sets = {"ss": KStructureSet("ss", "P", ("ct",), "ct")}
    k.plans = {
        "plan": KPlan("plan", "P", "L", "CURATIVE", "S1", "ss"),
        "qa": KPlan("qa", "Q", "QA", "MACHINE_QA", "SQ", None),
    }
    k.doses = {"dose": KDose("dose", "P", "plan", "S1", None), "other": KDose("other", "P", "trial", "S1", None)}
    k.records = {
        "r1": KRecord("r1", "P", "plan", "20150101", "080000"),
        "r2": KRecord("r2", "P", "plan", "20150301", "080000"),
        "q1": KRecord("q1", "Q", "qa", "20150101", "070000"),
        "q2": KRecord("q2", "Q", "qa", "20160101", "070000"),
        "x1": KRecord("x1", "P", "gone", "20150102", "090000"),
    }
    k.registrations = {
        "reg_mr": KRegistration("reg_mr", "P", "F1", ("F1", "F2"), ("ct", "mr")),
        # Moving item names only a FoR: every series of F3 is registered.
        "reg_for": KRegistration("reg_for", "P", "F1", ("F1", "F3"), ("ct",), ("F3",)),
        "reg_other": KRegistration("reg_other", "P", "F2", ("F2", "F9"), ("mr", "knee")),
    }
    k.present = set(k.records) | set(k.plans) | set(k.doses) | set(k.registrations) | {"ss"}
    for s in k.series.values():
        k.present.update(s.instance_uids)
    return k


def test_followed_plan_collects_every_step() -> None:
    result = evaluate(_knowledge(), "20150101", "20150131", None)
    rows = {row.plan_uid: row for row in result.plans}
    plan = rows["plan"]
    assert plan.status == "Complete"
    assert plan.record_uids == ["r1", "r2"], "step 4 ignores the window"
    assert plan.dose_uids == ["dose"]
    assert plan.planning_series_uids == ["ct"] and plan.planning_for_series_uids == ["pet_sim"]
    assert plan.registration_uids == ["reg_for", "reg_mr"]
    assert plan.registered_series_uids == ["ct3", "mr", "pet"]
    assert plan.registration_types == {"reg_for": "CT-CT", "reg_mr": "CT-MR"}
    assert "records_outside_window" in plan.traps
    assert rows["qa"].status == "Invalid" and rows["qa"].record_uids == ["q1"]
    assert rows["gone"].status == "Missing" and rows["gone"].missing[0].what == "RTPLAN"
    assert {"other", "q2", "k1", "reg_other"}.isdisjoint(result.expected)
    assert {"r2", "pt1", "pt3", "ct3a", "mr1", "qa", "x1"} <= result.expected
    assert result.summary.success_rate == 0.5  # Complete 1 / (3 referenced - 1 invalid)
    assert result.summary.registrations == {"CT-CT": 1, "CT-MR": 1}


def test_dangling_structure_set_makes_plan_incomplete() -> None:
    k = _knowledge()
    del k.structure_sets["ss"]
    k.present.discard("ss")
    result = evaluate(k, None, None, ["P"])
    row = next(r for r in result.plans if r.plan_uid == "plan")
    assert row.status == "Incomplete"
    assert [(m.what, m.uid) for m in row.missing] == [("RTSTRUCT", "ss")]
    assert not row.planning_series_uids and "ct1" not in result.expected
    assert {r.patient_id for r in result.plans} == {"P"}


def test_fractions_are_what_the_generator_delivered() -> None:
    """Records sharing a delivered fraction (per beam, continuation) are one fraction; a summary record is
    collected and listed apart, never a fraction nor a treatment record; its date is no treatment date."""
    k = _knowledge()
    k.plans["plan"].fractions_planned = 30
    k.records = {
        "r1a": KRecord("r1a", "P", "plan", "20150101", "080000", fraction=1),
        "r1b": KRecord("r1b", "P", "plan", "20150101", "080300", fraction=1),
        "r2": KRecord("r2", "P", "plan", "20150102", "080000", fraction=2),
        "r2c": KRecord("r2c", "P", "plan", "20150102", "084000", fraction=2),
        "r3": KRecord("r3", "P", "plan", "20150105", "080000"),  # no fraction stated: its own
        "sum": KRecord("sum", "P", "plan", "20150301", "090000", summary=True),
    }
    k.present |= set(k.records)
    result = evaluate(k, "20150101", "20150131", None)
    row = next(r for r in result.plans if r.plan_uid == "plan")
    assert (row.fractions, row.treatments, row.records, row.summary_records, row.fractions_planned) == (3, 3, 5, 1, 30)
    assert row.summary_record_uids == ["sum"] and "sum" not in row.record_uids and "sum" in result.expected
    assert (row.first_treatment, row.last_treatment) == ("20150101", "20150105")
    assert (result.summary.treatment_records, result.summary.summary_records, result.summary.fractions) == (5, 1, 3)

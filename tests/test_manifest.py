"""The manifest of a perfect harvest of the synthetic clinic equals its ground truth, field by field.

Two ways to obtain "what a perfect harvest kept": straight from the ground truth (``Expected`` of each
window, seed records by the window's rule) and from the planner's simulated harvest over a fake source
(roles and hops as the harvester records them, not-found retrieves as failed jobs). Both must give the
ground truth's plan rows and summary for every window and every trap. Further tests build degraded
stores (an object dropped, a job failed) and check that every missing link is named with its reason.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.manifest import (
    DANGLING,
    NOT_FOUND,
    PENDING,
    FailureInfo,
    Manifest,
    PlanRow,
    build_manifest,
    failure_from_job,
)
from rtharvest.core.operations import RetrieveInstance, RetrieveSeries
from rtharvest.core.references import ObjectRefs, extract_from_bytes
from rtharvest.core.strategies import SourceCapability
from rtharvest.store.tracking import Decision, FailureCode, ObjectRecord
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth, PlanTruth, Window
from rtharvest.synth.simulation import FakeSource, simulate_harvest

#: (patients, seed): the default clinic, and one big enough for every feature to land on its own patient.
CLINICS = [(6, 7), (13, 1)]
RECORD_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.481."
_RECORD_CLASSES = {RECORD_SOP_PREFIX + n for n in ("4", "6", "7", "9")}


@dataclass
class Synth:
    """A generated clinic with every object's references read once (through ``extract_from_bytes``)."""

    root: Path
    truth: GroundTruth
    refs: dict[str, ObjectRefs]
    reads: list[str]

    def read_refs(self, obj: ObjectRecord) -> ObjectRefs | None:
        """What the harvester's local-store reader gives: the stored file's references."""
        self.reads.append(obj.sop_uid)
        return self.refs.get(obj.sop_uid)

    def record(self, uid: str, harvest_id: str, role: str, hop: str = "", job_id: int | None = None,
               decision: Decision = Decision.KEPT) -> ObjectRecord:
        """The tracker row the harvester would write for this object."""
        r = self.refs[uid]
        return ObjectRecord(
            harvest_id=harvest_id, sop_uid=uid, orthanc_id=f"oid-{uid[-12:]}", decision=decision, reason="",
            role=role, hop=hop or role, source="SRC", job_id=job_id, moved=True, patient_id=r.patient_id,
            study_uid=r.study_uid, series_uid=r.series_uid, modality=r.modality, sop_class_uid=r.sop_class_uid,
            frame_of_reference_uid=r.frame_of_reference_uid,
            plan_uids=r.record.plan_uids if r.record else (),
            treatment_date=r.record.treatment_date if r.record else None,
        )


@pytest.fixture(scope="module", params=CLINICS, ids=lambda c: f"{c[0]}p-seed{c[1]}")
def synth(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Synth:
    patients, seed = request.param
    root = tmp_path_factory.mktemp(f"manifest{patients}_{seed}")
    truth = generate(root, SynthOptions(patients=patients, seed=seed))
    refs = {uid: extract_from_bytes((root / info.path).read_bytes()) for uid, info in truth.objects.items()}
    return Synth(root, truth, refs, [])


def window_of(w: Window) -> HarvestWindow:
    return HarvestWindow(w.date_from, w.date_to, tuple(w.patient_ids or ()))


def perfect_harvest(synth: Synth, w: Window, harvest_id: str) -> tuple[list[ObjectRecord], list[FailureInfo]]:
    """The tracker rows of a perfect harvest of ``w`` (from ``Expected``), and its failed retrieves."""
    window = window_of(w)
    objects: list[ObjectRecord] = []
    for uid in w.expected:
        info = synth.truth.objects[uid]
        role = info.role.upper()
        if info.sop_class_uid in _RECORD_CLASSES:
            r = synth.refs[uid].record
            assert r is not None
            role = "RECORD" if window.includes(info.patient_id, r.treatment_date) else "PLAN_RECORD"
        objects.append(synth.record(uid, harvest_id, role))
    # The harvester fails a retrieve by UID of an object no source holds, without retrying.
    failures = [FailureInfo("RetrieveInstance", d.uid, "PLAN", 1, f"HOP: {d.uid} not found at SRC",
                            job_id=i, harvest_id=harvest_id, code=FailureCode.NOT_FOUND)
                for i, d in enumerate(synth.truth.dangling)]
    return objects, failures


def simulated_harvest(synth: Synth, w: Window, harvest_id: str,
                      cap: SourceCapability) -> tuple[list[ObjectRecord], list[FailureInfo]]:
    """The tracker rows the planner's decisions give (first decision stays unless a rejection is
    overturned, as in ``Tracker.record``); retrieves that moved nothing are failed jobs."""
    source = FakeSource([], cap)
    for info in synth.truth.objects.values():
        source.add(pydicom.dcmread(synth.root / info.path, stop_before_pixels=True))
    result = simulate_harvest(source, window_of(w), cap)
    rows: dict[str, ObjectRecord] = {}
    for d in result.decisions:
        existing = rows.get(d.sop_uid)
        keep = Decision.KEPT if d.decision.keep else Decision.REJECTED
        if existing is not None and not (existing.decision is Decision.REJECTED and keep is Decision.KEPT):
            continue
        rows[d.sop_uid] = synth.record(d.sop_uid, harvest_id, d.operation.role.value, d.operation.hop,
                                       decision=keep)
    failures: list[FailureInfo] = []
    for i, op in enumerate(result.empty_operations):
        if isinstance(op, RetrieveInstance | RetrieveSeries):
            uid = op.sop_uid if isinstance(op, RetrieveInstance) else op.series_uid
            failures.append(FailureInfo(op.kind.value, uid, op.role.value, 1, f"{op.hop}: {uid} not found at SRC",
                                        job_id=i, harvest_id=harvest_id, code=FailureCode.NOT_FOUND))
    return list(rows.values()), failures


def assert_rows_equal(manifest: Manifest, w: Window) -> None:
    """Every plan row, field by field, in order."""
    got = manifest.to_json()["Plans"]
    assert [p["PlanUID"] for p in got] == [t.plan_uid for t in w.plans], w.name
    for row, t in zip(got, w.plans, strict=True):
        expected = t.to_dict()
        where = (w.name, t.plan_uid, t.traps)
        for key in ("PatientID", "PlanUID", "PlanLabel", "PlanIntent", "Status", "Treatments", "Fractions",
                    "FractionsPlanned", "Records", "SummaryRecords", "FirstTreatment", "LastTreatment",
                    "StructureSetUID", "DoseUIDs", "PlanningSeriesUIDs", "PlanningForSeriesUIDs",
                    "RegistrationUIDs", "RegistrationTypes", "RegisteredSeriesUIDs", "RegisteredForSeriesUIDs",
                    "Missing"):
            assert row[key] == expected[key], (*where, key)
        assert sorted(row["RecordUIDs"]) == sorted(t.record_uids), where
        assert sorted(row["SummaryRecordUIDs"]) == sorted(t.summary_record_uids), where


def assert_summary_equal(manifest: Manifest, w: Window) -> None:
    got = manifest.to_json()["Summary"]
    for key, value in w.summary.to_dict().items():
        assert got[key] == value, (w.name, key)


def test_perfect_harvest_equals_ground_truth(synth: Synth) -> None:
    assert synth.truth.windows
    for w in synth.truth.windows:
        objects, failures = perfect_harvest(synth, w, f"h-{w.name}")
        manifest = build_manifest(f"h-{w.name}", objects, synth.read_refs, failures)
        assert_rows_equal(manifest, w)
        assert_summary_equal(manifest, w)
        doc = manifest.to_json()
        assert doc["Harvest"] == f"h-{w.name}"
        # Everything kept is accounted for by a plan row; every failure explains a missing link.
        assert doc["Orphans"] == [] and doc["Summary"]["OrphanObjects"] == 0
        dangling_used = {m["UID"] for p in doc["Plans"] for m in p["Missing"]}
        assert {f["Target"] for f in doc["Failures"]} == {d.uid for d in synth.truth.dangling} - dangling_used
        json.dumps(doc)  # serialisable as is


def test_every_trap_is_covered(synth: Synth) -> None:
    """The comparison above sees every plan-level trap the generator built, in some window."""
    seen = {trap for w in synth.truth.windows for p in w.plans for trap in p.traps}
    for trap in ("qa_machine_plan", "qa_verification_plan", "missing_plan", "replan", "tomotherapy",
                 "dangling_structure_set", "records_outside_window", "hdr_brachy_course"):
        assert trap in seen, trap
    statuses = {p.status for w in synth.truth.windows for p in w.plans}
    assert statuses == {"Complete", "Incomplete", "Missing", "Invalid"}


def test_reads_only_rt_objects_once(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    synth.reads.clear()
    build_manifest("h", objects, synth.read_refs, failures)
    kinds = {synth.truth.objects[u].modality for u in synth.reads}
    assert kinds <= {"RTPLAN", "RTSTRUCT", "RTDOSE", "REG", "RTRECORD"}, kinds
    assert len(synth.reads) == len(set(synth.reads))


@pytest.mark.parametrize("cap", [SourceCapability(True, True, True), SourceCapability(False, False, False)],
                         ids=lambda c: c.label())
def test_simulated_harvest_equals_ground_truth(synth: Synth, cap: SourceCapability) -> None:
    """Roles and hops as the planner assigns them (a series keeps its first role) change nothing."""
    for w in synth.truth.windows:
        objects, failures = simulated_harvest(synth, w, "sim", cap)
        manifest = build_manifest("sim", objects, synth.read_refs, failures)
        assert_rows_equal(manifest, w)
        assert_summary_equal(manifest, w)
        assert manifest.to_json()["Orphans"] == []


def test_whole_store_is_the_union_of_harvests(synth: Synth) -> None:
    """harvest_id None over several harvests: the 'all' window covers the others."""
    objects: list[ObjectRecord] = []
    failures: list[FailureInfo] = []
    for w in synth.truth.windows:
        o, f = perfect_harvest(synth, w, f"h-{w.name}")
        objects += o
        failures += f
    manifest = build_manifest(None, objects, synth.read_refs, failures)
    everything = synth.truth.window("all")
    assert manifest.to_json()["Harvest"] is None
    assert_rows_equal(manifest, everything)
    assert_summary_equal(manifest, everything)


def test_rejected_objects_are_ignored(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    extra = [synth.record(uid, "h", "DOSE", decision=Decision.REJECTED) for uid in w.forbidden]
    manifest = build_manifest("h", objects + extra, synth.read_refs, failures)
    assert_rows_equal(manifest, w)
    assert_summary_equal(manifest, w)


# ---------------------------------------------------------------------------------------------------
# Degraded stores: every missing link is named, with the right reason


def _complete_plan(w: Window, pred: Callable[[PlanTruth], bool] = lambda p: True) -> PlanTruth:
    return next(p for p in w.plans if p.status == "Complete" and p.planning_series_uids and pred(p))


def _without(objects: Iterable[ObjectRecord], drop: Callable[[ObjectRecord], bool]) -> list[ObjectRecord]:
    return [o for o in objects if not drop(o)]


def _row(manifest: Manifest, plan_uid: str) -> dict:
    return next(p for p in manifest.to_json()["Plans"] if p["PlanUID"] == plan_uid)


def test_missing_planning_series_reasons(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    plan = _complete_plan(w)
    series = plan.planning_series_uids[0]
    objects = _without(objects, lambda o: o.series_uid == series)
    # No job tried: a dangling reference.
    row = _row(build_manifest("h", objects, synth.read_refs, failures), plan.plan_uid)
    assert row["Status"] == "Incomplete"
    assert {"What": "SERIES", "UID": series, "Reason": DANGLING} in row["Missing"]
    # Still queued.
    row = _row(build_manifest("h", objects, synth.read_refs, failures, pending={series}), plan.plan_uid)
    assert {"What": "SERIES", "UID": series, "Reason": PENDING} in row["Missing"]
    # A retrieve that gave up: attempts, last error and DIMSE status.
    gave_up = FailureInfo("RetrieveSeries", series, "PLANNING_SERIES", 10, "RTSTRUCT->SERIES: 3 of 8 instance(s) "
                          "did not arrive from SRC (gave up after 10 attempts)", 0xA702, 77, "h")
    manifest = build_manifest("h", objects, synth.read_refs, [*failures, gave_up])
    row = _row(manifest, plan.plan_uid)
    reason = next(m["Reason"] for m in row["Missing"] if m["UID"] == series)
    assert reason.startswith("failed after 10 attempts: RTSTRUCT->SERIES: 3 of 8")
    assert reason.endswith("(DIMSE status 0xA702)")
    assert all(f["Job"] != 77 for f in manifest.to_json()["Failures"])  # attributed to the row
    # Not found at any source.
    nf = FailureInfo("RetrieveSeries", series, "PLANNING_SERIES", 1, f"RTSTRUCT->SERIES: {series} not found at SRC",
                     code=FailureCode.NOT_FOUND)
    row = _row(build_manifest("h", objects, synth.read_refs, [*failures, gave_up, nf]), plan.plan_uid)
    assert {"What": "SERIES", "UID": series, "Reason": NOT_FOUND} in row["Missing"]


def test_missing_structure_set_and_plan(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    # A plan whose structure set no other plan uses (the HDR course shares its patient's): dropping the
    # plan leaves the structure set unexplained.
    plan = _complete_plan(w, lambda p: sum(q.structure_set_uid == p.structure_set_uid for q in w.plans) == 1)
    assert plan.structure_set_uid
    dropped = _without(objects, lambda o: o.sop_uid == plan.structure_set_uid)
    row = _row(build_manifest("h", dropped, synth.read_refs, failures), plan.plan_uid)
    assert row["Status"] == "Incomplete"
    assert row["Missing"] == [{"What": "RTSTRUCT", "UID": plan.structure_set_uid, "Reason": DANGLING}]
    dropped = _without(objects, lambda o: o.sop_uid == plan.plan_uid)
    manifest = build_manifest("h", dropped, synth.read_refs, failures)
    row = _row(manifest, plan.plan_uid)
    assert row["Status"] == "Missing" and row["PlanIntent"] is None
    assert row["Missing"] == [{"What": "RTPLAN", "UID": plan.plan_uid, "Reason": DANGLING}]
    # Its doses, structure set and images are now orphans: kept, but no treated plan explains them.
    orphans = {o["SOPInstanceUID"] for o in manifest.to_json()["Orphans"]}
    assert plan.structure_set_uid in orphans and set(plan.dose_uids) <= orphans


def test_failed_search_makes_the_plan_incomplete(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    plan = _complete_plan(w)
    search = FailureInfo("FindReferencing", plan.plan_uid, "DOSE", 10, "C-FIND timed out (gave up after 10 "
                         "attempts)", None, 5, "h")
    row = _row(build_manifest("h", objects, synth.read_refs, [*failures, search]), plan.plan_uid)
    assert row["Status"] == "Incomplete"
    assert row["Missing"] == [{"What": "RTDOSE", "UID": plan.plan_uid,
                               "Reason": "search failed after 10 attempts: C-FIND timed out (gave up after 10 "
                                         "attempts)"}]


def test_partially_stored_series(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    plan = _complete_plan(w)
    series = plan.planning_series_uids[0]
    first = next(o for o in objects if o.series_uid == series)
    objects = _without(objects, lambda o: o is first)
    partial = FailureInfo("RetrieveSeries", series, "PLANNING_SERIES", 10, "1 of 8 instance(s) did not arrive",
                          None, 9, "h")
    row = _row(build_manifest("h", objects, synth.read_refs, [*failures, partial]), plan.plan_uid)
    assert row["Status"] == "Incomplete"
    why = "failed after 10 attempts: 1 of 8 instance(s) did not arrive"
    # The structure set lists the image: it is named, with the series retrieve's reason.
    assert row["Missing"] == [{"What": "IMAGE", "UID": first.sop_uid, "Reason": why},
                              {"What": "SERIES", "UID": series, "Reason": "partially stored: " + why}]


def test_unreadable_stored_objects_are_reported(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    plan = _complete_plan(w)

    def broken(obj: ObjectRecord) -> ObjectRefs | None:
        if obj.sop_uid == plan.structure_set_uid:
            raise OSError("store unreachable")
        return synth.read_refs(obj)

    row = _row(build_manifest("h", objects, broken, failures), plan.plan_uid)
    assert row["Status"] == "Incomplete"
    assert row["Missing"] == [{"What": "RTSTRUCT", "UID": plan.structure_set_uid,
                               "Reason": "stored copy could not be read"}]


def test_failure_from_job() -> None:
    from rtharvest.store.jobqueue import Job, JobState

    job = Job(3, "h1", "RetrieveInstance", "ARIA", {"sop_uid": "1.2.3", "role": "STRUCTURE_SET"}, "k", 0,
              JobState.FAILED, 1, 10, 0.0, None, None, "RTPLAN->RTSTRUCT: 1.2.3 not found at ARIA", None, 0.0, 0.0)
    f = failure_from_job(job, FailureCode.NOT_FOUND)
    assert (f.kind, f.target_uid, f.role, f.attempts, f.job_id, f.harvest_id) == (
        "RetrieveInstance", "1.2.3", "STRUCTURE_SET", 1, 3, "h1")
    assert f.reason() == NOT_FOUND
    search = replace(job, kind="FindReferencing", payload={"criterion": {"kind": "FRAME_OF_REFERENCE",
                                                                         "uids": ["1.9", "1.8"]},
                                                           "role": "REGISTRATION"},
                     attempts=10, last_error="association rejected", dimse_status=0xA700)
    f = failure_from_job(search)
    assert f.targets() == {"1.9", "1.8"}
    assert f.reason() == "failed after 10 attempts: association rejected (DIMSE status 0xA700)"


# ---------------------------------------------------------------------------------------------------
# Formats and charts


def test_csv_one_row_per_plan(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    manifest = build_manifest("h", objects, synth.read_refs, failures)
    text = manifest.to_csv()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(w.plans)
    for row, t in zip(rows, w.plans, strict=True):
        assert row["PlanUID"] == t.plan_uid and row["Status"] == t.status and row["Harvest"] == "h"
        assert int(row["Treatments"]) == t.treatments
        # Fractions and delivery records kept apart, the summary records counted on their own.
        assert (int(row["Fractions"]), int(row["Records"]), int(row["SummaryRecords"])) == (
            t.fractions, t.records, t.summary_records)
        assert row["FractionsPlanned"] == ("" if t.fractions_planned is None else str(t.fractions_planned))
        assert row["FirstTreatment"] == (f"{t.first_treatment[:4]}-{t.first_treatment[4:6]}-{t.first_treatment[6:]}"
                                         if t.first_treatment else "")
        assert (row["DoseUIDs"].split(";") if row["DoseUIDs"] else []) == t.dose_uids
        assert (row["MissingWhat"].split(";") if row["MissingWhat"] else []) == [m.what for m in t.missing]
        assert (row["MissingReasons"].split(";") if row["MissingReasons"] else []) == [m.reason for m in t.missing]
        assert len(row["RegistrationTypes"].split(";") if row["RegistrationTypes"] else []) == len(
            t.registration_uids)


def test_invalid_plans_state_why(synth: Synth) -> None:
    """Each ``Invalid`` plan carries its ``InvalidReason`` (the PlanIntent that makes it QA or service, and
    that it was not followed) in the JSON and the CSV; no other plan has one."""
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    manifest = build_manifest("h", objects, synth.read_refs, failures)
    plans = manifest.to_json()["Plans"]
    invalid = [p for p in plans if p["Status"] == "Invalid"]
    assert invalid, "the synthetic clinic has QA plans"
    for plan in plans:
        if plan["Status"] == "Invalid":
            assert plan["InvalidReason"].startswith(f"PlanIntent {plan['PlanIntent'].strip().upper()}: ")
            assert "not a patient treatment" in plan["InvalidReason"]
        else:
            assert plan["InvalidReason"] is None
    rows = list(csv.DictReader(io.StringIO(manifest.to_csv())))
    assert [r["InvalidReason"] for r in rows] == [p["InvalidReason"] or "" for p in plans]
    assert PlanRow.from_json(invalid[0]).invalid_reason == invalid[0]["InvalidReason"]


def test_csv_loads_with_pandas(synth: Synth) -> None:
    import pandas as pd  # a dev dependency: the CSV must load straight into pandas
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    frame = pd.read_csv(io.StringIO(build_manifest("h", objects, synth.read_refs, failures).to_csv()),
                        parse_dates=["FirstTreatment", "LastTreatment"])
    assert len(frame) == len(w.plans)
    assert list(frame["Status"]) == [t.status for t in w.plans]
    assert frame["Fractions"].sum() == w.summary.fractions < frame["Records"].sum()
    assert frame["SummaryRecords"].sum() == w.summary.summary_records > 0


def test_empty_manifest() -> None:
    m = build_manifest("h", [], lambda o: None)
    assert m.to_csv().splitlines()[0].startswith("Harvest,PatientID,PlanUID")
    assert len(m.to_csv().splitlines()) == 1
    doc = m.to_json()
    assert doc["Plans"] == [] and doc["Summary"]["SuccessRate"] == 0.0 and doc["Charts"]["Monthly"] == []


def test_charts_count_first_treatments(synth: Synth) -> None:
    w = synth.truth.window("all")
    objects, failures = perfect_harvest(synth, w, "h")
    charts = build_manifest("h", objects, synth.read_refs, failures).to_json()["Charts"]
    monthly, yearly = charts["Monthly"], charts["Yearly"]
    patient_plans = [p for p in w.plans if p.status != "Invalid"]
    assert sum(c["Plans"] for c in monthly) == len(patient_plans) == sum(c["Plans"] for c in yearly)
    patients = {p.patient_id for p in patient_plans}
    assert sum(c["Patients"] for c in monthly) == len(patients) == sum(c["Patients"] for c in yearly)
    # Dense: consecutive months from the first to the last first treatment.
    periods = [c["Period"] for c in monthly]
    assert periods[0] == min(f"{p.first_treatment[:4]}-{p.first_treatment[4:6]}" for p in patient_plans
                             if p.first_treatment)
    for a, b in zip(periods, periods[1:], strict=False):
        ya, ma = map(int, a.split("-"))
        assert b == (f"{ya + 1}-01" if ma == 12 else f"{ya}-{ma + 1:02d}")
    assert [c["Period"] for c in yearly] == [str(y) for y in range(int(periods[0][:4]), int(periods[-1][:4]) + 1)]
    assert charts["PlansByIntent"] == w.summary.plans_by_intent

"""Ground truth of the synthetic clinic: schema, partition, determinism, trap semantics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest
from synthclinic import Clinic

from rtharvest.core.sopclass import TREATMENT_RECORD_CLASSES, SopClass
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import ROLES, load

TRAP_KINDS = {
    "record_per_beam",
    "fraction_in_two_parts",
    "hdr_brachy_course",
    "summary_record",
    "trial_plan",
    "foreign_dose_in_study",
    "qa_verification_plan",
    "qa_machine_plan",
    "records_outside_window",
    "missing_plan",
    "replan",
    "tomotherapy",
    "unrelated_scan",
    "unrelated_patient",
    "empty_first_roi",
    "dangling_structure_set",
}
RECORD_CLASSES = {c.value for c in TREATMENT_RECORD_CLASSES}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_json_schema_keys(clinic: Clinic) -> None:
    data = json.loads((clinic.root / "ground_truth.json").read_text())
    assert {"Generator", "Objects", "Traps", "Windows"} <= data.keys()
    assert {"Version", "Seed", "Options"} <= data["Generator"].keys()
    assert data["Generator"]["Seed"] == 7
    obj_keys = {
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "Modality",
        "FrameOfReferenceUID",
        "Path",
        "Bytes",
        "Role",
        "Traps",
    }
    for entry in data["Objects"].values():
        assert obj_keys <= entry.keys()
        assert entry["Role"] in ROLES
    for trap in data["Traps"]:
        assert {"Kind", "PatientID", "UIDs", "Description"} <= trap.keys()
    plan_keys = {
        "PatientID",
        "PlanUID",
        "PlanLabel",
        "PlanIntent",
        "Status",
        "Treatments",
        "FirstTreatment",
        "LastTreatment",
        "RecordUIDs",
        "StructureSetUID",
        "DoseUIDs",
        "PlanningSeriesUIDs",
        "RegistrationUIDs",
        "RegisteredSeriesUIDs",
        "Missing",
        "Traps",
    }
    summary_keys = {
        "Patients",
        "PlansReferenced",
        "PlansCollected",
        "SuccessRate",
        "PlansByIntent",
        "InvalidPlans",
        "ImageSeries",
        "PlanningSeries",
        "Registrations",
        "TreatmentRecords",
    }
    names = set()
    for window in data["Windows"]:
        names.add(window["Name"])
        assert {"Name", "From", "To", "PatientIDs", "Expected", "Forbidden", "Plans", "Summary"} <= window.keys()
        assert summary_keys <= window["Summary"].keys()
        for row in window["Plans"]:
            assert plan_keys <= row.keys()
            for missing in row["Missing"]:
                assert {"What", "UID", "Reason"} <= missing.keys()
    assert {"all", "year", "patient"} <= names


def test_load_roundtrip(clinic: Clinic) -> None:
    assert load(clinic.root).to_dict() == clinic.truth.to_dict()
    assert load(clinic.root / "ground_truth.json").to_json() == (clinic.root / "ground_truth.json").read_text()


def test_expected_and_forbidden_partition_every_object(clinic: Clinic) -> None:
    everything = set(clinic.truth.objects)
    for window in clinic.truth.windows:
        expected, forbidden = set(window.expected), set(window.forbidden)
        assert not expected & forbidden, window.name
        assert expected | forbidden == everything, window.name
        assert window.expected == sorted(window.expected)
        assert window.forbidden == sorted(window.forbidden)


def test_objects_match_files(clinic: Clinic) -> None:
    for uid, info in clinic.truth.objects.items():
        path = clinic.root / info.path
        assert path.stat().st_size == info.size
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == uid
        assert ds.SOPClassUID == info.sop_class_uid
        assert ds.PatientID == info.patient_id
        assert ds.StudyInstanceUID == info.study_uid
        assert ds.SeriesInstanceUID == info.series_uid
        assert ds.Modality == info.modality
        assert ds.get("FrameOfReferenceUID") == info.for_uid


def test_same_seed_gives_byte_identical_output(tmp_path: Path) -> None:
    options = SynthOptions(patients=6, seed=11)
    generate(tmp_path / "a", options)
    generate(tmp_path / "b", options)
    first, second = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert first == second
    generate(tmp_path / "c", SynthOptions(patients=6, seed=12))
    assert _digest(tmp_path / "c") != first


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    options = SynthOptions(patients=1, ct_slices=2, matrix=16)
    generate(tmp_path, options)
    with pytest.raises(FileExistsError):
        generate(tmp_path, options)
    generate(tmp_path, options, overwrite=True)


def test_twenty_patients_make_twenty_two_patients(tmp_path: Path) -> None:
    # Generation speed is a benchmark figure (benchmarks/), never a timed test.
    truth = generate(tmp_path, SynthOptions(patients=20))
    assert len({o.patient_id for o in truth.objects.values()}) == 22  # + phantom + non-RT patient


def test_matrix_512_for_benchmarks(tmp_path: Path) -> None:
    truth = generate(tmp_path, SynthOptions(patients=1, ct_slices=2, matrix=512, include_traps=False))
    ct = next(uid for uid, o in truth.objects.items() if o.modality == "CT")
    ds = pydicom.dcmread(tmp_path / truth.objects[ct].path)
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert len(ds.PixelData) == 512 * 512 * 2


def test_every_trap_kind_is_present_and_documented(clinic: Clinic) -> None:
    from rtharvest.synth import generator

    kinds = {t.kind for t in clinic.truth.traps}
    assert kinds == TRAP_KINDS
    for kind in kinds:
        assert f"``{kind}``" in (generator.__doc__ or "")
    for trap in clinic.truth.traps:
        assert trap.uids
        present = [uid for uid in trap.uids if uid in clinic.truth.objects]
        for uid in present:
            assert trap.kind in clinic.truth.objects[uid].traps


def test_every_iod_kind_is_generated(clinic: Clinic) -> None:
    classes = {o.sop_class_uid for o in clinic.truth.objects.values()}
    for sop in (
        SopClass.CT_IMAGE,
        SopClass.MR_IMAGE,
        SopClass.PET_IMAGE,
        SopClass.RT_STRUCTURE_SET,
        SopClass.RT_PLAN,
        SopClass.RT_ION_PLAN,
        SopClass.RT_DOSE,
        SopClass.RT_BEAMS_TREATMENT_RECORD,
        SopClass.RT_ION_BEAMS_TREATMENT_RECORD,
        SopClass.RT_BRACHY_TREATMENT_RECORD,
        SopClass.RT_TREATMENT_SUMMARY_RECORD,
        SopClass.SPATIAL_REGISTRATION,
        SopClass.DEFORMABLE_SPATIAL_REGISTRATION,
    ):
        assert sop.value in classes, sop.name


def test_all_window_statuses_and_trap_semantics(clinic: Clinic) -> None:
    truth = clinic.truth
    window = truth.window("all")
    expected, forbidden = set(window.expected), set(window.forbidden)
    records = {uid for uid, o in truth.objects.items() if o.sop_class_uid in RECORD_CLASSES}
    assert records <= expected, "the 'all' window seeds every record"
    statuses = {row.plan_uid: row.status for row in window.plans}
    # Trial plan and its dose: never collected, no manifest row.
    for trap in truth.traps_of("trial_plan"):
        assert set(trap.uids) <= forbidden
        assert not set(trap.uids) & set(statuses)
    # Unrelated scans, unrelated patient, QA phantom images: forbidden.
    for kind in ("unrelated_scan", "unrelated_patient"):
        for trap in truth.traps_of(kind):
            assert set(trap.uids) <= forbidden
    phantom_images = {uid for uid, o in truth.objects.items() if o.patient_id == "QA_PHANTOM" and o.modality == "CT"}
    assert phantom_images and phantom_images <= forbidden
    # QA plans: collected, Invalid, nothing else hopped to.
    for kind in ("qa_verification_plan", "qa_machine_plan"):
        (trap,) = truth.traps_of(kind)
        plan_uid = trap.uids[0]
        row = window.plan(plan_uid)
        assert row.status == "Invalid"
        assert plan_uid in expected
        assert row.structure_set_uid is None and not row.dose_uids and not row.planning_series_uids
    # Missing plan: row with status Missing, records kept.
    (trap,) = truth.traps_of("missing_plan")
    row = window.plan(trap.uids[0])
    assert row.status == "Missing" and row.missing[0].what == "RTPLAN"
    assert set(row.record_uids) == set(trap.uids[1:]) and set(row.record_uids) <= expected
    assert trap.uids[0] not in truth.objects
    # Dangling structure set: Incomplete, RTSTRUCT named in Missing, plan and doses collected.
    (trap,) = truth.traps_of("dangling_structure_set")
    row = window.plan(trap.uids[0])
    assert row.status == "Incomplete"
    assert [(m.what, m.uid) for m in row.missing] == [("RTSTRUCT", trap.uids[1])]
    assert row.plan_uid in expected and set(row.dose_uids) <= expected and row.dose_uids
    # TomoTherapy: the structure set comes from the dose.
    (trap,) = truth.traps_of("tomotherapy")
    row = window.plan(trap.uids[0])
    assert row.status == "Complete" and row.structure_set_uid in expected
    ds = pydicom.dcmread(clinic.path(row.plan_uid))
    assert "ReferencedStructureSetSequence" not in ds
    # Re-plan: two treated plans with different structure sets and planning series.
    (trap,) = truth.traps_of("replan")
    first, second = window.plan(trap.uids[0]), window.plan(trap.uids[1])
    assert first.structure_set_uid != second.structure_set_uid
    assert set(first.planning_series_uids).isdisjoint(second.planning_series_uids)
    assert trap.uids[3] in first.registration_uids and trap.uids[3] in second.registration_uids
    assert window.summary.plans_by_status["Complete"] >= 5


def test_registration_types_and_roles(clinic: Clinic) -> None:
    truth = clinic.truth
    window = truth.window("all")
    types = set(window.summary.registrations)
    assert {"CT-MR", "CT-CT"} <= types
    assert any(t.startswith("MR-") for t in types), "an MR-sim patient registers its planning MR"
    assert any(t.endswith("-PT") for t in types), "a REG to a PET"
    for row in window.plans:
        for series_uid in row.registered_series_uids:
            roles = {o.role for o in truth.objects.values() if o.series_uid == series_uid}
            assert roles <= {"registered_image", "planning_image"}
        for series_uid in row.registered_for_series_uids:
            roles = {o.role for o in truth.objects.values() if o.series_uid == series_uid}
            assert roles <= {"registered_for_image", "planning_for_image", "planning_image"}
        for series_uid in row.planning_for_series_uids:
            roles = {o.role for o in truth.objects.values() if o.series_uid == series_uid}
            assert roles == {"planning_for_image"}
    role_of_expected = {truth.objects[uid].role for uid in window.expected}
    assert {"trial", "unrelated"}.isdisjoint(role_of_expected)
    assert {"registered_for_image", "planning_for_image", "registered_image"} <= role_of_expected


def test_year_window_cuts_records_but_step4_collects_them(clinic: Clinic) -> None:
    truth = clinic.truth
    window = truth.window("year")
    assert window.date_from and window.date_to and window.patient_ids is None
    (trap,) = truth.traps_of("records_outside_window")
    assert set(trap.uids) <= set(window.expected)
    cut_rows = [row for row in window.plans if "records_outside_window" in row.traps]
    assert cut_rows
    for row in cut_rows:
        if row.status in ("Complete", "Incomplete"):
            dates = [pydicom.dcmread(clinic.path(uid)).TreatmentDate for uid in row.record_uids]
            assert any(d < window.date_from or d > window.date_to for d in dates)
            assert any(window.date_from <= d <= window.date_to for d in dates)
    # Records outside the window whose plan is not referenced from inside it are forbidden.
    referenced = {row.plan_uid for row in window.plans}
    forbidden = set(window.forbidden)
    for uid, info in truth.objects.items():
        if info.sop_class_uid not in RECORD_CLASSES:
            continue
        ds = pydicom.dcmread(clinic.path(uid), stop_before_pixels=True)
        plan_uid = ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
        inside = window.date_from <= ds.TreatmentDate <= window.date_to
        if not inside and plan_uid not in referenced:
            assert uid in forbidden
        if inside:
            assert uid not in forbidden
    # Fewer things than the 'all' window.
    assert len(window.expected) < len(truth.window("all").expected)


def test_patient_window_only_collects_that_patient(clinic: Clinic) -> None:
    truth = clinic.truth
    window = truth.window("patient")
    assert window.patient_ids and len(window.patient_ids) == 1 and window.date_from is None
    (pid,) = window.patient_ids
    assert window.expected
    assert {truth.objects[uid].patient_id for uid in window.expected} == {pid}
    assert {row.patient_id for row in window.plans} == {pid}


def test_summary_is_consistent_with_rows(clinic: Clinic) -> None:
    truth = clinic.truth
    for window in truth.windows:
        s = window.summary
        expected = set(window.expected)
        assert s.plans_referenced == len(window.plans)
        assert s.invalid_plans == sum(row.status == "Invalid" for row in window.plans)
        assert s.plans_collected == sum(row.status != "Missing" for row in window.plans)
        summary_class = SopClass.RT_TREATMENT_SUMMARY_RECORD.value
        records = [uid for uid in expected if truth.objects[uid].sop_class_uid in RECORD_CLASSES]
        summaries = [uid for uid in records if truth.objects[uid].sop_class_uid == summary_class]
        assert s.treatment_records == len(records) - len(summaries)
        assert s.summary_records == len(summaries)
        assert s.fractions == sum(row.fractions for row in window.plans)
        image_series = {
            truth.objects[uid].series_uid for uid in expected if truth.objects[uid].modality in ("CT", "MR", "PT")
        }
        assert sum(s.image_series.values()) == len(image_series)
        assert s.planning_series == len({u for row in window.plans for u in row.planning_series_uids})
        assert 0.0 <= s.success_rate <= 1.0
        for row in window.plans:
            assert row.treatments == row.fractions <= row.records == len(row.record_uids)
            assert row.summary_records == len(row.summary_record_uids)
            assert set(row.record_uids) | set(row.summary_record_uids) <= expected
            if row.status != "Missing":
                assert row.plan_uid in expected


def test_without_traps(tmp_path: Path) -> None:
    truth = generate(tmp_path, SynthOptions(patients=4, include_traps=False))
    patients = {o.patient_id for o in truth.objects.values()}
    assert patients == {"SYN001", "SYN002", "SYN003", "SYN004"}
    assert {t.kind for t in truth.traps} <= {"records_outside_window"}
    window = truth.window("all")
    assert {row.status for row in window.plans} == {"Complete"}
    assert not truth.dangling
    assert not {o.role for o in truth.objects.values()} & {"trial", "qa", "unrelated"}


def test_fractions_of_the_truth_match_the_records_written(clinic: Clinic) -> None:
    """The generator's fractions (what it meant to deliver) agree with the records' content as written:
    distinct CurrentFractionNumbers of each plan's delivery records; summary records deliver none."""
    window = clinic.truth.window("all")
    summary_class = SopClass.RT_TREATMENT_SUMMARY_RECORD.value
    for row in window.plans:
        numbers: set[int] = set()
        for uid in row.record_uids:
            assert clinic.truth.objects[uid].sop_class_uid != summary_class
            ds = pydicom.dcmread(clinic.path(uid), stop_before_pixels=True)
            items = [*ds.get("TreatmentSessionBeamSequence", []), *ds.get("TreatmentSessionIonBeamSequence", []),
                     *ds.get("TreatmentSessionApplicationSetupSequence", [])]
            numbers |= {int(item.CurrentFractionNumber) for item in items}
        assert len(numbers) == row.fractions, (row.plan_label, row.traps)
        for uid in row.summary_record_uids:
            assert clinic.truth.objects[uid].sop_class_uid == summary_class
    by_trap = {t: [p for p in window.plans if t in p.traps] for t in ("hdr_brachy_course", "dangling_structure_set")}
    (hdr,) = by_trap["hdr_brachy_course"]
    assert (hdr.fractions, hdr.fractions_planned, hdr.records, hdr.summary_records) == (3, 4, 3, 1)
    (boost,) = by_trap["dangling_structure_set"]
    assert boost.records > boost.fractions == boost.fractions_planned, "one record per beam"
    (two_parts,) = clinic.truth.traps_of("fraction_in_two_parts")
    ion = next(p for p in window.plans if two_parts.uids[0] in p.record_uids)
    assert set(two_parts.uids) <= set(ion.record_uids) and ion.records == ion.fractions + 1
    # The HDR course's last fraction and its summary record lie after the window "year", collected anyway.
    year = clinic.truth.window("year")
    (hdr_year,) = [p for p in year.plans if "hdr_brachy_course" in p.traps]
    assert "records_outside_window" in hdr_year.traps and hdr_year.fractions == 3
    assert hdr_year.last_treatment is not None and year.date_to is not None and hdr_year.last_treatment > year.date_to

"""Pinnacle files as real archives hold them, next to the synthetic writer's round trips.

``fixtures/pinnacle/v16.0-fragment`` is transcribed from a public Pinnacle 16.0 patient directory (origin in
each file's header); ``fixtures/pinnacle/v7.4f-patient`` is a whole pre-9.0 patient directory in the 7.4f
layout (photon MLC plan and electron plan, per-plan points).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from rtharvest.converters.pinnacle.convert import Options, convert_patient
from rtharvest.converters.pinnacle.grammar import parse_file, parse_text
from rtharvest.converters.pinnacle.models import Poi, Version
from rtharvest.converters.pinnacle.reader import (
    read_machines,
    read_patient,
    read_plan_version,
    read_pois,
    read_rois,
    read_trial,
)
from rtharvest.converters.pinnacle.writers import applicator_type
from rtharvest.converters.report import ConversionReport
from rtharvest.converters.sink import FolderSink

FIXTURES = Path(__file__).parent / "fixtures" / "pinnacle"
V16 = FIXTURES / "v16.0-fragment"
PRE9 = FIXTURES / "v7.4f-patient" / "Patient_7"


def test_v16_machine_leaf_pairs_are_mlcleafpair_with_ycenterposition() -> None:
    (machine,) = read_machines(V16 / "plan.Pinnacle.Machines").values()
    assert machine.name == "Clinac iX" and machine.sad == 100
    assert len(machine.leaf_pairs) == 60
    # NegateLeafCoordinate = 1: the first pair (YCenterPosition −19.5) is the one Pinnacle labels "Y = 19.50 cm".
    assert machine.leaf_pairs[0].y_centre == 19.5 and machine.leaf_pairs[0].width == 1
    assert machine.leaf_pairs[10].y_centre == 9.75 and machine.leaf_pairs[10].width == 0.5
    boundaries = machine.boundaries_mm()
    assert boundaries[0] == -200 and boundaries[-1] == 200 and len(boundaries) == 61
    assert boundaries[10] == -100 and boundaries[50] == 100  # 1 cm outer, 0.5 cm inner leaves


def test_v16_control_point_leaves_come_from_mlcleafpositions_not_the_block_outline_before_them() -> None:
    root = parse_file(V16 / "plan.Trial")  # \XDR_COPY:5\ (a compensator's Thickness) parses too
    (trial,) = [read_trial(t, str(V16 / "plan.Trial")) for t in root.objs("Trial")]
    (beam,) = trial.beams
    (cp,) = beam.control_points
    assert len(cp.leaves) == 60  # not the 28 points of the ModifierList outline written before them
    assert cp.leaves[9] == (10, 10) and cp.leaves[23] == (9.9, 10) and cp.leaves[41] == (-0.3, 6)
    assert (cp.left_jaw, cp.right_jaw, cp.top_jaw, cp.bottom_jaw) == (10, 10, 11, 6)
    assert beam.modality == "PHOTON" and beam.applicator == "" and not beam.gantry_ccw
    assert beam.dose_volume == 8  # the beam's own DoseVolume, not the trial's or a control point's binary
    assert round(beam.mu_info.mu, 2) == round(126.27 / (1.10137 * 1.02155), 2)


def _convert(folder: Path, out: Path) -> tuple[ConversionReport, dict[str, list[Dataset]]]:
    report = ConversionReport("pinnacle")
    convert_patient(folder, FolderSink(out), report, Options(), folder.name)
    objects: dict[str, list[Dataset]] = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = dcmread(path)
        objects.setdefault(str(ds.Modality), []).append(ds)
    return report, objects


def test_pre9_patient_with_photon_mlc_and_electron_plans_converts_every_plan(tmp_path: Path) -> None:
    report, objects = _convert(PRE9, tmp_path / "out")
    assert report.errors == []
    assert {k: len(v) for k, v in objects.items()} == {"CT": 3, "RTSTRUCT": 2, "RTPLAN": 2, "RTDOSE": 4}
    plans = {str(ds.RTPlanLabel): ds for ds in objects["RTPLAN"]}
    photon = plans["Trial_1"].BeamSequence[0]
    assert photon.RadiationType == "PHOTON"
    (mlc,) = [d for d in photon.BeamLimitingDeviceSequence if d.RTBeamLimitingDeviceType == "MLCX"]
    assert mlc.NumberOfLeafJawPairs == 40 and float(mlc.LeafPositionBoundaries[0]) == -200
    positions = photon.ControlPointSequence[0].BeamLimitingDevicePositionSequence
    (leaves,) = [p for p in positions if p.RTBeamLimitingDeviceType == "MLCX"]
    # Pair 17 of the file (YCenterPosition −3.5, DICOM pair 17 from −Y): left 3.5 → bank A −35, right 4 → B 40.
    assert float(leaves.LeafJawPositions[17]) == -35 and float(leaves.LeafJawPositions[40 + 17]) == 40
    electron = plans["Electrons"].BeamSequence[0]
    assert electron.RadiationType == "ELECTRON"
    assert [d.RTBeamLimitingDeviceType for d in electron.BeamLimitingDeviceSequence] == ["ASYMX", "ASYMY"]
    assert electron.ApplicatorSequence[0].ApplicatorID == "10x10"
    assert electron.ApplicatorSequence[0].ApplicatorType == "ELECTRON_SQUARE"
    # plan.Points is per plan: the electron plan's structure set holds its own isocentre and calculation point.
    names = {
        str(ds.SeriesInstanceUID): sorted(str(r.ROIName) for r in ds.StructureSetROISequence)
        for ds in objects["RTSTRUCT"]
    }
    assert sorted(names.values()) == [["BODY", "calc pt", "eBoost iso", "iso"], ["BODY", "iso"]]
    (entry,) = report.extra["Patients"]
    assert entry["Written"] == {"CT": 3, "RTDOSE": 4, "RTPLAN": 2, "RTSTRUCT": 2} and entry["FailedPlans"] == []


def test_a_failing_plan_never_stops_the_patients_ct_structure_sets_or_other_plans(tmp_path: Path) -> None:
    copy = tmp_path / "Patient_7"
    shutil.copytree(PRE9, copy)
    machines = copy / "Plan_0" / "plan.Pinnacle.Machines"
    # Two machines, neither the beam's: the MLC plan's leaf geometry cannot resolve.
    text = machines.read_text(encoding="latin-1").replace('Name = "Linac6"', 'Name = "Other"')
    machines.write_text(text + 'Machine ={\n  Name = "Third";\n  SAD = 100;\n};\n', encoding="latin-1")
    report, objects = _convert(copy, tmp_path / "out")
    assert {k: len(v) for k, v in objects.items()} == {"CT": 3, "RTSTRUCT": 2, "RTPLAN": 1, "RTDOSE": 2}
    (error,) = report.errors
    assert error.scope == "plan" and error.key.endswith("Plan_0")
    assert "Plan_0/plan.Trial:" in error.detail and "'Linac6' is not in" in error.detail
    (entry,) = report.extra["Patients"]
    (failed,) = entry["FailedPlans"]
    assert failed["Plan"] == "Plan_0" and failed["Detail"] == error.detail


def test_unreadable_plan_files_keep_the_patients_ct_and_what_else_converts(tmp_path: Path) -> None:
    copy = tmp_path / "Patient_7"
    shutil.copytree(PRE9, copy)
    for plan in ("Plan_0", "Plan_1"):
        trial = copy / plan / "plan.Trial"
        trial.write_text(trial.read_text(encoding="latin-1").replace("Gantry = ", "Gantry "), encoding="latin-1")
    (copy / "Plan_1" / "plan.Points").write_text("Poi ={ Name = ;", encoding="latin-1")  # unreadable: no RTSTRUCT
    report, objects = _convert(copy, tmp_path / "out")
    # No plan converts, yet the CT (planned on by both) and Plan_0's structure set are written.
    assert {k: len(v) for k, v in objects.items()} == {"CT": 3, "RTSTRUCT": 1}
    assert sorted(e.reason for e in report.errors) == ["syntax-error", "syntax-error"]
    (entry,) = report.extra["Patients"]
    assert sorted(f["Plan"] for f in entry["FailedPlans"]) == ["Plan_0", "Plan_1"] and entry["OtherErrors"] == []
    details = {f["Plan"]: f["Detail"] for f in entry["FailedPlans"]}
    assert "Plan_0/plan.Trial:" in details["Plan_0"] and "Plan_1/plan.Points:1:" in details["Plan_1"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("10x10", "ELECTRON_SQUARE"),
        ("6 x 10", "ELECTRON_RECT"),
        ("Circle 5", "ELECTRON_CIRC"),
        ("A15", "ELECTRON_SQUARE"),
    ],
)
def test_electron_applicator_type_from_its_name(name: str, kind: str) -> None:
    assert applicator_type(name) == kind


def test_v16_patient_file_and_the_plans_own_version(tmp_path: Path) -> None:
    """The Patient file names each plan's version (PinnacleVersionDescription on its PlanList entry)."""
    folder = tmp_path / "Patient_1"
    (folder / "Plan_0").mkdir(parents=True)
    for name in ("Patient", "ImageSet_0.header", "ImageSet_0.ImageInfo"):
        shutil.copy(V16 / name, folder / name)
    for name in ("plan.Trial", "plan.Pinnacle.Machines"):
        shutil.copy(V16 / name, folder / "Plan_0" / name)
    patient = read_patient(folder)
    assert patient.mrn == "000000" and patient.version == Version(16, 2)  # Launch Pad: 16.2 wrote the file
    (plan,) = patient.plans
    assert plan.name == "BRAIN" and plan.tool_type == "Pinnacle^3" and plan.version == Version(16, 0)
    assert plan.trial_error is None and [b.name for t in plan.trials for b in t.beams] == ["02 Lao Brain"]
    assert patient.problems == []
    # Header lines indented by tabs, "key : " with no value, TablePosition written "-8.".
    image_set = patient.image_sets[0]
    assert (image_set.header.x_dim, image_set.header.z_start, image_set.header.couch_height) == (512, -8.75, 28.1)
    assert image_set.header.patient_position is not None and image_set.header.patient_position.value == "HFS"
    assert [s.table_position for s in image_set.slices] == [-8.75, -8.5, -8.25, -8.0]
    assert image_set.uid("frame_uid") == "1.2.840.113619.2.55.3.3535481354.111.3513513585.2"


def test_v16_roi_and_points_files() -> None:
    """plan.roi as Pinnacle 16 writes it (file_stamp block, UID lines, surface and mean meshes after the
    curves) and plan.Points; the roi header names the version."""
    (roi,) = read_rois(V16 / "plan.roi")
    assert (roi.name, roi.interpreted_type, roi.color) == ("bb", "ORGAN", "red")
    (curve,) = roi.curves
    assert len(curve.points) == 25 and curve.points[0] == (-1.07428, 11.914, 2.0)
    assert read_pois(V16 / "plan.Points") == [Poi("iso", (-1.20199, 1.89459, 2.0))]
    assert read_plan_version(V16) == Version(16, 0)


def test_leaves_of_a_beam_that_does_not_use_its_mlc_are_not_read() -> None:
    text = (V16 / "plan.Trial").read_text(encoding="latin-1")
    assert "UseMLC" not in text
    root = parse_text(text.replace('SetBeamType = "Step & Shoot MLC";', 'SetBeamType = "Static"; UseMLC = 0;'))
    (beam,) = read_trial(root.objs("Trial")[0], "plan.Trial").beams
    assert beam.control_points[0].leaves == ()
    electron = parse_text(text.replace('Modality = "Photons";', 'Modality = "Electrons";'))
    (beam,) = read_trial(electron.objs("Trial")[0], "plan.Trial").beams
    assert beam.modality == "ELECTRON" and beam.control_points[0].leaves == ()

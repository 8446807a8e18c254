"""Pinnacle round trips: synthetic patients written from a DICOM-space truth, converted, compared with it.

Every case of :func:`rtharvest.synth.pinnacle.all_cases` (HFS/HFP/FFS/FFP × Pinnacle 8.0 and 16.2, with and
without ImageSet_N.DICOM and ImageSet_N.img) is converted once per module; the tests compare positions, not
only arrays: CT ImagePositionPatient and a bone marker, every contour point (≤ 0.1 mm) and the slice it is
placed on, POIs, isocentres, jaws and MLC, MU, the dose grid box, GridFrameOffsetVector and dose values at
every voxel (which fails for a flipped or shifted grid).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from rtharvest.converters.pinnacle.convert import Options, convert_patient
from rtharvest.converters.pinnacle.reader import read_patient
from rtharvest.converters.report import ConversionReport
from rtharvest.converters.sink import FolderSink
from rtharvest.synth.pinnacle import DOSE_SIGMA_MM, PatientTruth, PinnacleCase, all_cases, write_institution

CASES = all_cases()
TOL = 0.1  # mm


@dataclass
class Converted:
    truth: PatientTruth
    folder: Path
    objects: dict[str, list[Dataset]]
    files: dict[str, Path]
    report: ConversionReport


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Converted]:
    base = tmp_path_factory.mktemp("pinnacle")
    truths = write_institution(base / "src", CASES)
    out: dict[str, Converted] = {}
    for truth in truths:
        target = base / "dicom" / truth.mrn
        report = ConversionReport("pinnacle")
        folder = base / "src" / "Institution_1" / "Mount_0" / truth.folder
        convert_patient(folder, FolderSink(target), report, Options(), truth.folder)
        objects: dict[str, list[Dataset]] = {}
        files: dict[str, Path] = {}
        for path in sorted(target.rglob("*.dcm")):
            ds = dcmread(path)
            objects.setdefault(str(ds.Modality), []).append(ds)
            files[str(ds.SOPInstanceUID)] = path
        out[truth.mrn] = Converted(truth, folder, objects, files, report)
    return out


def _ids(case: PinnacleCase) -> str:
    return (
        f"{case.orientation}-{case.version}-{'dicom' if case.with_dicom else 'nodicom'}-"
        f"{'img' if case.with_img else 'noimg'}"
    )


def _close(a: object, b: object, tol: float = TOL) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=tol, rtol=0))


def _slice_uid_by_z(c: Converted) -> dict[float, str]:
    """SOP Instance UID of the CT slice at each DICOM z, from the converted CT or the truth's originals."""
    cts = c.objects.get("CT", [])
    if cts:
        return {round(float(ds.ImagePositionPatient[2]), 3): str(ds.SOPInstanceUID) for ds in cts}
    return {round(p[2], 3): uid for p, uid in zip(c.truth.slice_positions, c.truth.slice_uids, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ct(converted: dict[str, Converted], case: PinnacleCase, tmp_path: Path) -> None:
    c = converted[case.mrn]
    cts = c.objects.get("CT", [])
    if case.with_dicom:
        # The original slices, byte for byte.
        originals = {p.stem: p for p in (c.folder / "ImageSet_0.DICOM").iterdir()}
        assert {str(ds.SOPInstanceUID) for ds in cts} == set(originals) == set(c.truth.slice_uids)
        for uid, path in originals.items():
            assert c.files[uid].read_bytes() == path.read_bytes()
        if case.with_img:
            # The same patient without its originals: the CT rebuilt from the .img lands on the same truth.
            copy = tmp_path / c.truth.folder
            shutil.copytree(c.folder, copy)
            shutil.rmtree(copy / "ImageSet_0.DICOM")
            report = ConversionReport("pinnacle")
            convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
            assert report.errors == [] and report.written["CT"] == len(c.truth.slice_positions)
            rebuilt = [ds for ds in map(dcmread, (tmp_path / "out").rglob("*.dcm")) if ds.Modality == "CT"]
            _check_rebuilt_ct(c.truth, rebuilt)
        return
    if not case.with_img:
        assert cts == []
        return
    _check_rebuilt_ct(c.truth, cts)


def _check_rebuilt_ct(truth: PatientTruth, cts: Sequence[Dataset]) -> None:
    """A CT built from ImageSet_N.img: slice positions, orientation, UIDs, intercept and the bone marker."""
    assert len(cts) == len(truth.slice_positions)
    truth_positions = sorted(truth.slice_positions, key=lambda p: p[2])
    built = sorted(cts, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for ds, expected in zip(built, truth_positions, strict=True):
        assert _close(ds.ImagePositionPatient, expected), (ds.ImagePositionPatient, expected)
        assert _close(ds.ImageOrientationPatient, truth.orientation_cosines, 1e-6)
        assert (ds.Rows, ds.Columns) == (20, 24)
        assert str(ds.FrameOfReferenceUID) == truth.for_uid and str(ds.StudyInstanceUID) == truth.study_uid
        assert float(ds.RescaleIntercept) == -1000
    # The bone marker is where the truth put it (a flipped or transposed image puts it elsewhere).
    bone = []
    for ds in built:
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        for j, i in zip(*np.nonzero(hu > 500), strict=True):
            bone.append(
                np.asarray(ds.ImagePositionPatient, float)
                + i * float(ds.PixelSpacing[1]) * row
                + j * float(ds.PixelSpacing[0]) * col
            )
        assert set(np.unique(hu)) <= {-1000.0, 0.0, 1000.0}
    assert bone, "marker not found"
    assert all(np.all(np.abs(p - np.asarray(truth.marker)) <= 12.5 + 1e-6) for p in bone)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_structures(converted: dict[str, Converted], case: PinnacleCase) -> None:
    c = converted[case.mrn]
    by_z = _slice_uid_by_z(c)
    structure_sets = c.objects["RTSTRUCT"]
    assert len(structure_sets) == 2  # one per plan
    for rs in structure_sets:
        names = {int(r.ROINumber): str(r.ROIName) for r in rs.StructureSetROISequence}
        kinds = {int(o.ReferencedROINumber): str(o.RTROIInterpretedType) for o in rs.RTROIObservationsSequence}
        referenced = [
            str(i.ReferencedSOPInstanceUID)
            for i in rs.ReferencedFrameOfReferenceSequence[0]
            .RTReferencedStudySequence[0]
            .RTReferencedSeriesSequence[0]
            .ContourImageSequence
        ]
        assert sorted(referenced) == sorted(by_z.values())
        contours = {names[int(item.ReferencedROINumber)]: list(item.ContourSequence) for item in rs.ROIContourSequence}
        for roi, expected in c.truth.contours.items():
            got = contours[roi]
            assert len(got) == len(expected)
            for contour, points in zip(got, expected, strict=True):
                data = np.asarray(contour.ContourData, float).reshape(-1, 3)
                # The duplicated closing point of the Pinnacle file is gone; every point is where it was drawn.
                assert len(data) == len(points) == int(contour.NumberOfContourPoints)
                assert _close(data, points), (roi, data[:2], points[:2])
                assert str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID) == by_z[round(points[0][2], 3)]
        for name, point in c.truth.pois.items():
            (number,) = [n for n, v in names.items() if v == name]
            item = next(i for i in rs.ROIContourSequence if int(i.ReferencedROINumber) == number)
            assert item.ContourSequence[0].ContourGeometricType == "POINT"
            assert _close(item.ContourSequence[0].ContourData, point)
            assert kinds[number] == ("ISOCENTER" if name == "Iso_RX" else "MARKER")
        assert kinds[next(n for n, v in names.items() if v == "PTV")] == "PTV"


def _plans(c: Converted) -> dict[str, Dataset]:
    return {str(ds.RTPlanLabel): ds for ds in c.objects["RTPLAN"]}


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_plans_beams_and_mlc(converted: dict[str, Converted], case: PinnacleCase) -> None:
    c = converted[case.mrn]
    plans = _plans(c)
    structure_uids = {str(ds.SOPInstanceUID) for ds in c.objects["RTSTRUCT"]}
    assert len(plans) == sum(len(p.trials) for p in c.truth.plans) == 3
    for plan_truth in c.truth.plans:
        for trial in plan_truth.trials:
            rp = plans[trial.name]
            assert str(rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID) in structure_uids
            assert rp.PatientSetupSequence[0].PatientPosition == case.orientation
            group = rp.FractionGroupSequence[0]
            assert int(group.NumberOfFractionsPlanned) == trial.fractions
            assert float(rp.DoseReferenceSequence[0].TargetPrescriptionDose) == pytest.approx(2.0 * trial.fractions)
            meterset = {int(b.ReferencedBeamNumber): float(b.BeamMeterset) for b in group.ReferencedBeamSequence}
            beams = {int(b.BeamNumber): b for b in rp.BeamSequence}
            for bt in trial.beams:
                beam = beams[bt.number]
                assert meterset[bt.number] == pytest.approx(bt.mu, abs=1e-3)
                mlc = next(d for d in beam.BeamLimitingDeviceSequence if d.RTBeamLimitingDeviceType == "MLCX")
                assert _close(mlc.LeafPositionBoundaries, c.truth.leaf_boundaries, 1e-6)
                assert int(mlc.NumberOfLeafJawPairs) == len(c.truth.leaf_boundaries) - 1
                cps = list(beam.ControlPointSequence)
                assert str(beam.BeamType) == bt.beam_type
                assert len(cps) == len(bt.cp_source)  # step and shoot: two control points per segment
                assert _close(cps[0].IsocenterPosition, bt.isocenter)
                assert [float(cp.CumulativeMetersetWeight) for cp in cps] == bt.cumulative
                for n, (cp, seg) in enumerate(zip(cps, bt.cp_source, strict=True)):
                    assert float(cp.GantryAngle) == pytest.approx(bt.gantry[seg] % 360)
                    arcing = bt.beam_type == "DYNAMIC" and n < len(cps) - 1
                    assert cp.GantryRotationDirection == ("CW" if arcing else "NONE")
                    devices = {
                        d.RTBeamLimitingDeviceType: [float(v) for v in d.LeafJawPositions]
                        for d in cp.BeamLimitingDevicePositionSequence
                    }
                    x1, x2, y1, y2 = bt.jaws[seg]
                    assert devices["ASYMX"] == pytest.approx([x1, x2]) and devices["ASYMY"] == pytest.approx([y1, y2])
                    assert devices["MLCX"] == pytest.approx(bt.bank_a[seg] + bt.bank_b[seg], abs=1e-6)


def _voxel_positions(ds: Dataset) -> np.ndarray:
    """(frames, rows, cols, 3) DICOM positions of every dose voxel (frames offset along the slice normal)."""
    row = np.asarray(ds.ImageOrientationPatient[:3], float)
    col = np.asarray(ds.ImageOrientationPatient[3:], float)
    normal = np.cross(row, col)
    ipp = np.asarray(ds.ImagePositionPatient, float)
    offsets = np.asarray(ds.GridFrameOffsetVector, float)
    f, j, i = np.meshgrid(offsets, np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    return (
        ipp
        + i[..., None] * float(ds.PixelSpacing[1]) * row
        + j[..., None] * float(ds.PixelSpacing[0]) * col
        + f[..., None] * normal
    )


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_doses(converted: dict[str, Converted], case: PinnacleCase) -> None:
    c = converted[case.mrn]
    plans = _plans(c)
    doses = c.objects["RTDOSE"]
    for plan_truth in c.truth.plans:
        for trial in plan_truth.trials:
            plan_uid = str(plans[trial.name].SOPInstanceUID)
            mine = [d for d in doses if str(d.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID) == plan_uid]
            assert sorted(str(d.DoseSummationType) for d in mine) == ["BEAM"] * len(trial.beams) + ["PLAN"]
            expected_sum = None
            for ds in mine:
                assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (
                    trial.dose_dims[1],
                    trial.dose_dims[0],
                    trial.dose_dims[2],
                )
                assert _close(
                    ds.GridFrameOffsetVector, [k * trial.dose_spacing[2] for k in range(trial.dose_dims[2])], 1e-6
                )
                positions = _voxel_positions(ds)
                flat = positions.reshape(-1, 3)
                assert _close(flat.min(axis=0), trial.dose_min) and _close(flat.max(axis=0), trial.dose_max)
                gy = ds.pixel_array.astype(float) * float(ds.DoseGridScaling)
                if ds.DoseSummationType == "BEAM":
                    number = int(
                        ds.ReferencedRTPlanSequence[0]
                        .ReferencedFractionGroupSequence[0]
                        .ReferencedBeamSequence[0]
                        .ReferencedBeamNumber
                    )
                    bt = next(b for b in trial.beams if b.number == number)
                    dist2 = ((positions - np.asarray(bt.peak)) ** 2).sum(axis=-1)
                    expected = bt.peak_gy * np.exp(-dist2 / (2 * DOSE_SIGMA_MM**2))
                    expected_sum = expected * trial.fractions + (0 if expected_sum is None else expected_sum)
                    # Within the 16-bit scaling step: a flipped, shifted or mis-scaled grid fails here.
                    assert np.abs(gy - expected).max() <= float(ds.DoseGridScaling) * 1.01 + 1e-5 * bt.peak_gy
                    hottest = positions.reshape(-1, 3)[int(np.argmax(gy))]
                    assert math.dist(hottest, bt.peak) <= math.dist((0, 0, 0), trial.dose_spacing) / 2 + 1e-6
            plan_dose = next(d for d in mine if d.DoseSummationType == "PLAN")
            gy = plan_dose.pixel_array.astype(float) * float(plan_dose.DoseGridScaling)
            assert expected_sum is not None
            assert np.abs(gy - expected_sum).max() <= float(plan_dose.DoseGridScaling) * 1.01 + 1e-3


def test_version_and_offset_come_from_the_files(converted: dict[str, Converted]) -> None:
    for c in converted.values():
        patient = read_patient(c.folder)
        assert all(p.version.pre_9 == c.truth.pre9 for p in patient.plans)
        assert {p.tool_type for p in patient.plans} == {"Pinnacle^3", "Pinnacle"}  # one plan lacks ToolType


def test_outputs_pass_dciodvfy(converted: dict[str, Converted]) -> None:
    checked = 0
    for c in converted.values():
        for modality, objects in c.objects.items():
            if modality == "CT" and c.truth.with_dicom:
                continue  # the scanner's own files
            # Every plan (static, step-and-shoot and arc beams); one object of each other modality.
            chosen = objects if modality == "RTPLAN" else objects[:1]
            for ds in chosen:
                path = c.files[str(ds.SOPInstanceUID)]
                result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
                errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
                assert not errors, f"{modality} {c.truth.mrn}: {errors}"
                checked += 1
    built = sum(1 for case in CASES if case.with_img and not case.with_dicom)
    assert checked == (2 + 3) * len(CASES) + built


def test_rerun_is_byte_identical_and_trials_can_be_chosen(converted: dict[str, Converted], tmp_path: Path) -> None:
    c = next(c for c in converted.values() if c.truth.with_img and not c.truth.with_dicom)
    again = FolderSink(tmp_path / "again")
    convert_patient(c.folder, again, ConversionReport("pinnacle"), Options(), c.truth.folder)
    for path in (tmp_path / "again").rglob("*.dcm"):
        assert path.read_bytes() == c.files[path.stem].read_bytes()
    assert len(list((tmp_path / "again").rglob("*.dcm"))) == len(c.files)
    chosen = tmp_path / "chosen"
    report = ConversionReport("pinnacle")
    convert_patient(c.folder, FolderSink(chosen), report, Options(trials=["Plan 0/Trial 2"]), c.truth.folder)
    labels = [str(dcmread(p).RTPlanLabel) for p in chosen.rglob("*.dcm") if dcmread(p).Modality == "RTPLAN"]
    assert labels == ["Trial 2"] and report.written["RTDOSE"] == 3


def test_a_beam_without_its_dose_binary_is_reported(converted: dict[str, Converted], tmp_path: Path) -> None:
    c = next(iter(converted.values()))
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    victim = sorted((copy / "Plan_1").glob("plan.Trial.binary.*"), key=lambda p: p.stat().st_size)[-1]
    victim.unlink()
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    assert [e.reason for e in report.errors] == ["missing-dose"]
    assert victim.name in report.errors[0].detail
    assert report.written["RTDOSE"] == 2 * 3 + 2  # Boost's other beams; no plan sum from part of the beams


def test_orientation_from_patient_setup_and_unknown_version(converted: dict[str, Converted], tmp_path: Path) -> None:
    """Without header patient_position the PatientSetup decides; without any version 9.0+ is assumed (warned)."""
    c = next(c for c in converted.values() if c.truth.orientation == "HFP" and not c.truth.pre9)
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    header = copy / "ImageSet_0.header"
    header.write_text("".join(line for line in header.read_text().splitlines(True) if "patient_position" not in line))
    for info in copy.glob("Plan_*/plan.PlanInfo"):
        info.unlink()
    patient = copy / "Patient"
    patient.write_bytes(patient.read_bytes().replace(b"WriteVersion", b"Written"))
    for roi in copy.glob("Plan_*/plan.roi"):
        roi.write_bytes(roi.read_bytes().replace(b"Pinnacle Treatment Planning System Version", b"Planning"))
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    assert any("no Pinnacle version found" in w for w in report.warnings)
    structure = next(dcmread(p) for p in (tmp_path / "out").rglob("*.dcm") if dcmread(p).Modality == "RTSTRUCT")
    names = {int(r.ROINumber): str(r.ROIName) for r in structure.StructureSetROISequence}
    ptv = next(i for i in structure.ROIContourSequence if names[int(i.ReferencedROINumber)] == "PTV")
    assert _close(np.asarray(ptv.ContourSequence[0].ContourData, float).reshape(-1, 3), c.truth.contours["PTV"][0])


def test_pinnacle_text_becomes_valid_dicom_text() -> None:
    from rtharvest.converters.pinnacle.models import Patient
    from rtharvest.converters.pinnacle.writers import text

    assert text("Plan\\A\tlong name", 9) == "Plan A lo"
    patient = Patient(Path("."), "1", "1", "M\u00fcller^Jr", "A\\nna", "", "", "", {}, [])
    assert patient.dicom_name == "M\u00fcllerJr^Anna"


def test_course_prescription_and_repeated_trial_names(converted: dict[str, Converted], tmp_path: Path) -> None:
    c = next(iter(converted.values()))
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    trial_file = copy / "Plan_0" / "plan.Trial"
    text = trial_file.read_bytes().replace(b'Name = "Trial 2"', b'Name = "Trial_1"')
    text = text.replace(b"PrescriptionDose = 200;", b'PrescriptionDose = 5000;\n PrescriptionPeriod = "Overall";')
    trial_file.write_bytes(text)
    convert_patient(copy, FolderSink(tmp_path / "out"), ConversionReport("pinnacle"), Options(), c.truth.folder)
    plans = [dcmread(p) for p in (tmp_path / "out").rglob("*.dcm") if dcmread(p).Modality == "RTPLAN"]
    assert len({str(p.SOPInstanceUID) for p in plans}) == 3
    assert sorted(str(p.RTPlanLabel) for p in plans) == ["Boost", "Trial_1", "Trial_1"]
    for plan in plans:
        if plan.RTPlanLabel == "Trial_1":  # 5000 cGy over 25 fractions = 200 cGy per fraction, 50 Gy in all
            assert float(plan.DoseReferenceSequence[0].TargetPrescriptionDose) == pytest.approx(50.0)


def test_frame_is_checked_against_the_original_ct(converted: dict[str, Converted], tmp_path: Path) -> None:
    """The converted cases map onto their original CT; a pre-9.0 patient read as current does not, and says so."""
    for c in converted.values():
        assert not [w for w in c.report.warnings if "original CT" in w], c.report.warnings
    pre9_checked = {c.truth.orientation for c in converted.values() if c.truth.pre9 and c.truth.with_dicom}
    # The pre-9.0 offset is checked against an original CT supine and prone, head and feet first.
    assert {"HFS", "HFP", "FFS"} <= pre9_checked
    for c in converted.values():
        if not (c.truth.pre9 and c.truth.with_dicom):
            continue
        copy = tmp_path / c.truth.folder
        shutil.copytree(c.folder, copy)
        for info in copy.glob("Plan_*/plan.PlanInfo"):
            info.write_text('PinnacleVersionDescription = "Pinnacle 16.2";\n')
        report = ConversionReport("pinnacle")
        convert_patient(copy, FolderSink(tmp_path / c.truth.mrn), report, Options(), c.truth.folder)
        assert [w for w in report.warnings if "mm away from its original CT" in w], c.truth.orientation


def test_a_plan_that_cannot_be_converted_leaves_the_others(converted: dict[str, Converted], tmp_path: Path) -> None:
    c = next(iter(converted.values()))
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    trial = copy / "Plan_1" / "plan.Trial"
    trial.write_bytes(trial.read_bytes().replace(b'IsocenterName = "Iso_RX"', b'IsocenterName = "Nowhere"'))
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    (error,) = report.errors
    assert error.scope == "plan" and error.key.endswith("Plan_1") and "'Nowhere'" in error.detail
    assert report.written["RTPLAN"] == 2 and report.written["RTDOSE"] == 6


def test_table_positions_that_disagree_with_the_header_are_reported(
    converted: dict[str, Converted], tmp_path: Path
) -> None:
    c = next(c for c in converted.values() if c.truth.with_img and not c.truth.with_dicom)
    for conv in converted.values():
        assert not [w for w in conv.report.warnings if "TablePosition" in w], conv.report.warnings
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    header = copy / "ImageSet_0.header"
    lines = header.read_text().splitlines()
    header.write_text("\n".join("z_start = 42.5;" if line.startswith("z_start") else line for line in lines) + "\n")
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    assert [w for w in report.warnings if "TablePosition and header z_start differ" in w]


def _decoy_machine(name: str) -> str:
    """A machine with as many leaf pairs as SynthLinac but other widths: picking it gives wrong boundaries."""
    pairs = "".join(f"      #{n} ={{ Y = {4.25 - 0.5 * n}; Width = 0.5; }};\n" for n in range(18))
    head = f'Machine ={{\n  Name = "{name}";\n  SAD = 100;\n  MultiLeaf ={{\n    LeafPairList ={{\n'
    return head + pairs + "    };\n  };\n};\n"


def _convert_with_machines(
    c: Converted, tmp_path: Path, edit: Callable[[str], str | None]
) -> tuple[ConversionReport, list[Dataset]]:
    """Convert a copy of ``c`` whose Plan_1 machine file is ``edit(text)`` (``None`` removes the file)."""
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    machines = copy / "Plan_1" / "plan.Pinnacle.Machines"
    new = edit(machines.read_text(encoding="latin-1"))
    if new is None:
        machines.unlink()
    else:
        machines.write_text(new, encoding="latin-1")
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    plans: list[Dataset] = [
        ds for ds in (dcmread(p) for p in (tmp_path / "out").rglob("*.dcm")) if ds.Modality == "RTPLAN"]
    return report, plans


def _mlc_boundaries(plans: list[Dataset], label: str) -> list[list[float]]:
    rp = next(p for p in plans if p.RTPlanLabel == label)
    return [
        [float(v) for v in d.LeafPositionBoundaries]
        for beam in rp.BeamSequence
        for d in beam.BeamLimitingDeviceSequence
        if d.RTBeamLimitingDeviceType == "MLCX"
    ]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # The beams' machine renamed and a second machine added: no entry can be chosen.
        (
            lambda t: t.replace('"SynthLinac"', '"OtherLinac"') + _decoy_machine("ThirdLinac"),
            "its machine 'SynthLinac' is not in",
        ),
        (lambda t: None, "plan.Pinnacle.Machines is missing"),
        (lambda t: t.replace("LeafPairList", "NoLeaves"), "machine 'SynthLinac' of"),
    ],
    ids=["name-mismatch", "no-machine-file", "no-leaf-pairs"],
)
def test_mlc_without_leaf_geometry_is_an_error_not_an_open_field(
    converted: dict[str, Converted], tmp_path: Path, edit: Callable[[str], str | None], expected: str
) -> None:
    c = next(iter(converted.values()))
    report, plans = _convert_with_machines(c, tmp_path, edit)
    (error,) = report.errors
    assert error.scope == "plan" and error.key.endswith("Plan_1")
    # The file and line of the beam's block, as for syntax errors.
    beam_line = (c.folder / "Plan_1" / "plan.Trial").read_text(encoding="latin-1").splitlines().index("    Beam ={") + 1
    assert expected in error.detail and f"Plan_1/plan.Trial:{beam_line}: beam 'B1 Boost'" in error.detail, error.detail
    # Plan_0's machine file is intact: its trials still convert, with their MLC.
    assert sorted(str(p.RTPlanLabel) for p in plans) == ["Trial 2", "Trial_1"]
    assert report.written["RTDOSE"] == 6


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: _decoy_machine("Decoy") + t,  # several machines: the beam's own name decides
        lambda t: t.replace('"SynthLinac"', '"Renamed"'),  # the file's only machine is the beam's
    ],
    ids=["by-name-among-several", "only-machine"],
)
def test_machine_is_found_by_name_or_as_the_only_one(
    converted: dict[str, Converted], tmp_path: Path, edit: Callable[[str], str | None]
) -> None:
    c = next(iter(converted.values()))
    report, plans = _convert_with_machines(c, tmp_path, edit)
    assert report.errors == []
    boundaries = _mlc_boundaries(plans, "Boost")
    assert len(boundaries) == 3
    assert all(_close(b, c.truth.leaf_boundaries, 1e-6) for b in boundaries)


def test_one_line_points_convert_and_a_short_curve_is_reported(converted: dict[str, Converted], tmp_path: Path) -> None:
    """``points={ x y z ... };`` on one line keeps its contour; a curve shorter than num_points fails its plan."""
    c = next(iter(converted.values()))
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    # Plan_0: every points block folded onto one line.
    roi = copy / "Plan_0" / "plan.roi"
    folded: list[str] = []
    block: list[str] | None = None
    for line in roi.read_text(encoding="latin-1").splitlines():
        if line.strip() == "points={":
            block = []
        elif block is not None and line.strip() == "};":
            folded.append("     points={ " + "  ".join(block) + " };")
            block = None
        elif block is not None:
            block.append(line.strip())
        else:
            folded.append(line)
    roi.write_text("\n".join(folded) + "\n", encoding="latin-1")
    # Plan_1: the first curve loses its last point.
    short = copy / "Plan_1" / "plan.roi"
    lines = short.read_text(encoding="latin-1").splitlines()
    first = lines.index("     points={")
    close = lines.index("     };", first)
    del lines[close - 1]
    short.write_text("\n".join(lines) + "\n", encoding="latin-1")
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    (error,) = report.errors
    assert error.reason == "syntax-error" and f"Plan_1/plan.roi:{first - 1}:" in error.detail, error.detail
    assert "num_points = 12 but 11 points" in error.detail
    (structures,) = [ds for ds in (dcmread(p) for p in (tmp_path / "out").rglob("*.dcm")) if ds.Modality == "RTSTRUCT"]
    names = {int(r.ROINumber): str(r.ROIName) for r in structures.StructureSetROISequence}
    for item in structures.ROIContourSequence:
        name = names[int(item.ReferencedROINumber)]
        if name in c.truth.contours:
            got = [np.asarray(ct.ContourData, float).reshape(-1, 3) for ct in item.ContourSequence]
            assert len(got) == len(c.truth.contours[name])
            assert all(_close(g, e) for g, e in zip(got, c.truth.contours[name], strict=True))


def test_a_stray_file_among_the_original_slices_is_skipped_with_a_warning(
    converted: dict[str, Converted], tmp_path: Path
) -> None:
    c = next(c for c in converted.values() if c.truth.with_dicom)
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    (copy / "ImageSet_0.DICOM" / "index.txt").write_text("slice list\n")
    (copy / "ImageSet_0.DICOM" / "truncated.img").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    assert report.errors == []
    stray = sorted(w for w in report.warnings if "skipped" in w)
    assert len(stray) == 2, report.warnings
    assert "ImageSet_0.DICOM/index.txt is not a DICOM file" in stray[0]
    assert "ImageSet_0.DICOM/truncated.img" in stray[1]
    # Every original slice still goes out unchanged, the stray files do not, and the plans reference the originals.
    written = {p.stem: p for p in (tmp_path / "out").rglob("*.dcm")}
    assert report.written["CT"] == len(c.truth.slice_uids) and set(c.truth.slice_uids) <= set(written)
    assert report.written["RTPLAN"] == 3 and report.written["RTDOSE"] == 3 + 3 + 4
    structure = next(ds for ds in map(dcmread, written.values()) if ds.Modality == "RTSTRUCT")
    series = structure.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence) == sorted(c.truth.slice_uids)


def test_date_only_scan_times_give_a_study_date_and_no_invented_time(converted: dict[str, Converted]) -> None:
    """ScanTimeFromScanner holds a date only ("2020-01-02"): StudyDate is that day, every time stays empty."""
    times = ("StudyTime", "ContentTime", "StructureSetTime", "RTPlanTime")
    checked = 0
    for c in converted.values():
        for modality, objects in c.objects.items():
            if modality == "CT" and c.truth.with_dicom:
                continue  # the scanner's own slices keep their own date and time
            for ds in objects:
                assert ds.StudyDate == "20200102", (modality, ds.StudyDate)
                assert all(ds.get(keyword, "") == "" for keyword in times), modality
                checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    ("scan_time", "header_date", "expected"),
    [
        ('"2020-01-02"', "20191231", "20200102"),  # ImageSet ScanTimeFromScanner first
        ('"01/02/2020"', "20191231", "20200102"),  # US order, as Pinnacle writes other dates
        (None, "20191231", "20191231"),  # no scan time: the header's date
        ('"2020-13-45"', "", ""),  # no real date anywhere: empty (Type 2), never a made-up one
    ],
)
def test_study_date_sources(
    converted: dict[str, Converted], tmp_path: Path, scan_time: str | None, header_date: str, expected: str
) -> None:
    c = next(c for c in converted.values() if not c.truth.with_dicom and c.truth.with_img)
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    patient = copy / "Patient"
    text = patient.read_bytes()
    new = b"" if scan_time is None else f"ScanTimeFromScanner = {scan_time};".encode()
    patient.write_bytes(text.replace(b'ScanTimeFromScanner = "2020-01-02";', new))
    header = copy / "ImageSet_0.header"
    header.write_text(header.read_text().replace("date : 20200102", f"date : {header_date}"))
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    assert report.errors == []
    objects = [dcmread(p) for p in (tmp_path / "out").rglob("*.dcm")]
    assert {ds.Modality for ds in objects} == {"CT", "RTSTRUCT", "RTPLAN", "RTDOSE"}
    assert {str(ds.StudyDate) for ds in objects} == {expected}
    assert {str(ds.get("StudyTime", "")) for ds in objects} == {""}


def test_ct_pixel_spacing_is_row_spacing_then_column_spacing(converted: dict[str, Converted], tmp_path: Path) -> None:
    """A header with x_pixdim ≠ y_pixdim: PixelSpacing = [between rows (y), between columns (x)] (PS3.3 10.7.1.3)."""
    c = next(c for c in converted.values() if not c.truth.with_dicom and c.truth.with_img)
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    header = copy / "ImageSet_0.header"
    values = {"x_pixdim": 1.25, "y_pixdim": 0.8}
    lines = [
        f"{line.split('=')[0].strip()} = {values[line.split('=')[0].strip()]};"
        if line.split("=")[0].strip() in values
        else line
        for line in header.read_text().splitlines()
    ]
    header.write_text("\n".join(lines) + "\n")
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    cts = [ds for ds in map(dcmread, (tmp_path / "out").rglob("*.dcm")) if ds.Modality == "CT"]
    assert cts and report.errors == []
    for ds in cts:
        assert (ds.Rows, ds.Columns) == (20, 24)  # Rows = y_dim, Columns = x_dim
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([8.0, 12.5])
        # The row direction runs along Pinnacle x, the column direction along Pinnacle y.
        assert abs(float(ds.ImageOrientationPatient[0])) == 1.0 and abs(float(ds.ImageOrientationPatient[4])) == 1.0


@pytest.mark.parametrize(
    ("file", "drop", "block", "message"),
    [
        (
            "Plan_1/plan.Trial",
            r"LeftJawPosition = [^;]*;",
            "            #0 ={",
            "trial 'Boost' beam 'B1 Boost' control point 0: LeftJawPosition is missing",
        ),
        ("Plan_1/plan.Points", r"YCoord = [^;]*;", "Poi ={", "Poi 'Iso_RX': YCoord is missing"),
        (
            "Plan_1/plan.Pinnacle.Machines",
            r"Width = [^;]*;",
            "      MLCLeafPair ={",
            "machine 'SynthLinac' leaf pair 0: Width is missing",
        ),
    ],
    ids=["control-point", "poi", "leaf-pair"],
)
def test_content_errors_name_the_file_and_line(
    converted: dict[str, Converted], tmp_path: Path, file: str, drop: str, block: str, message: str
) -> None:
    """A well-formed file missing a value fails its plan with ``file:line`` of the block that lacks it."""
    c = next(iter(converted.values()))
    copy = tmp_path / c.truth.folder
    shutil.copytree(c.folder, copy)
    path = copy / file
    lines = path.read_text(encoding="latin-1").splitlines()
    line = next(n for n, text in enumerate(lines, start=1) if text.startswith(block))
    victim = next(n for n in range(line - 1, len(lines)) if re.search(drop, lines[n]))
    lines[victim] = re.sub(drop, "", lines[victim], count=1)
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")
    report = ConversionReport("pinnacle")
    convert_patient(copy, FolderSink(tmp_path / "out"), report, Options(), c.truth.folder)
    (error,) = report.errors
    assert error.reason == "bad-pinnacle-data" and error.scope == "plan"
    assert f"{file}:{line}: {message}" in error.detail, error.detail
    assert report.written["RTPLAN"] == 2  # Plan_0 still converts

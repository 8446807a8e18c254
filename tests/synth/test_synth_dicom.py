"""The generated objects are valid DICOM (dciodvfy) and every reference in them resolves."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from synthclinic import Clinic

from rtharvest.core.sopclass import SopClass
from rtharvest.synth.iods import STUDY_COMPONENT_SOP_CLASS
from tests.tooling import required_tool


def _samples(clinic: Clinic) -> dict[str, Path]:
    """Two objects of each SOP class, plus every object that a trap makes special."""
    truth = clinic.truth
    picked: dict[str, Path] = {}
    per_class: dict[str, int] = defaultdict(int)
    for uid, info in truth.objects.items():
        if per_class[info.sop_class_uid] < 2:
            per_class[info.sop_class_uid] += 1
            picked[uid] = clinic.path(uid)
    for trap in truth.traps:
        for uid in trap.uids:
            info = truth.objects.get(uid)
            if info is not None and info.modality not in ("CT", "MR", "PT"):
                picked[uid] = clinic.path(uid)
    return picked


@pytest.mark.parametrize("edition", ["default", "-new"])
def test_dciodvfy_reports_no_errors(clinic: Clinic, edition: str) -> None:
    dciodvfy = required_tool("dciodvfy")
    samples = _samples(clinic)
    kinds = {clinic.truth.objects[uid].sop_class_uid for uid in samples}
    assert len(kinds) == 13, "every generated IOD kind is sampled"
    failures: list[str] = []
    for uid, path in samples.items():
        args = [dciodvfy, *([] if edition == "default" else [edition]), str(path)]
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        if errors or "Information Object Not found" in output:
            info = clinic.truth.objects[uid]
            failures.append(f"{info.modality} {info.sop_class_uid} {path.name}:\n  " + "\n  ".join(errors))
    assert not failures, "\n".join(failures)


def _walk(ds: Dataset, depth: int = 0):  # type: ignore[no-untyped-def]
    """Yield (keyword, value, item, depth) for every element, recursing into sequences."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield elem.keyword, None, item, depth
                yield from _walk(item, depth + 1)
        else:
            yield elem.keyword, elem.value, ds, depth


def test_every_reference_resolves_or_is_a_flagged_dangling_one(clinic: Clinic) -> None:
    truth = clinic.truth
    objects = truth.objects
    studies = {o.study_uid for o in objects.values()}
    series = {o.series_uid for o in objects.values()}
    fors = {o.for_uid for o in objects.values() if o.for_uid}
    all_uids = set(objects)
    dangling = {(d.uid, d.referenced_by) for d in truth.dangling}
    unresolved: list[str] = []
    seen_dangling: set[tuple[str, str]] = set()
    counted = 0
    for uid in objects:
        ds = pydicom.dcmread(clinic.path(uid), stop_before_pixels=True)
        for keyword, value, item, depth in _walk(ds):
            if value is None:
                continue
            target: set[str] | None = None
            if keyword == "ReferencedSOPInstanceUID":
                if item.get("ReferencedSOPClassUID") == STUDY_COMPONENT_SOP_CLASS:
                    target = studies
                else:
                    counted += 1
                    ref = objects.get(str(value))
                    if ref is not None and "ReferencedSOPClassUID" in item:
                        assert ref.sop_class_uid == item.ReferencedSOPClassUID, f"{uid} → {value}: class"
                    target = all_uids
            elif keyword == "SeriesInstanceUID" and depth > 0:
                target = series
            elif keyword == "StudyInstanceUID" and depth > 0:
                target = studies
            elif keyword in ("ReferencedFrameOfReferenceUID", "SourceFrameOfReferenceUID") or (
                keyword == "FrameOfReferenceUID" and depth > 0
            ):
                target = fors
            if target is None or str(value) in target:
                continue
            if (str(value), uid) in dangling:
                seen_dangling.add((str(value), uid))
                continue
            unresolved.append(f"{objects[uid].modality} {uid} {keyword} → {value}")
    assert counted > 500
    assert not unresolved, "\n".join(unresolved[:20])
    assert seen_dangling == dangling, "every declared dangling reference occurs in a file"
    for dangling_uid, referrer in dangling:
        assert dangling_uid not in objects
        trap_kinds = {t.kind for t in truth.traps if dangling_uid in t.uids}
        assert trap_kinds, f"dangling {dangling_uid} is not flagged as a trap"
        assert trap_kinds & set(objects[referrer].traps), "the referring object carries the trap"


def test_structure_sets_reference_their_planning_series_fully(clinic: Clinic) -> None:
    truth = clinic.truth
    by_series: dict[str, set[str]] = defaultdict(set)
    for uid, info in truth.objects.items():
        by_series[info.series_uid].add(uid)
    empty_first = {uid for t in truth.traps_of("empty_first_roi") for uid in t.uids}
    checked = 0
    for uid, info in truth.objects.items():
        if info.sop_class_uid != SopClass.RT_STRUCTURE_SET.value:
            continue
        ds = pydicom.dcmread(clinic.path(uid))
        (frame,) = ds.ReferencedFrameOfReferenceSequence
        (study,) = frame.RTReferencedStudySequence
        (ref_series,) = study.RTReferencedSeriesSequence
        listed = {i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence}
        assert listed == by_series[ref_series.SeriesInstanceUID], "ContourImageSequence lists every slice"
        image_for = truth.objects[next(iter(listed))].for_uid
        assert frame.FrameOfReferenceUID == image_for
        assert all(r.ReferencedFrameOfReferenceUID == image_for for r in ds.StructureSetROISequence)
        first_roi = ds.ROIContourSequence[0]
        assert ("ContourSequence" in first_roi) == (uid not in empty_first)
        for roi in ds.ROIContourSequence:
            for contour in roi.get("ContourSequence", []):
                (img,) = contour.ContourImageSequence
                assert img.ReferencedSOPInstanceUID in listed
        checked += 1
    assert checked >= 6


def test_doses_and_records_point_at_their_plans(clinic: Clinic) -> None:
    truth = clinic.truth
    foreign = {uid for t in truth.traps_of("foreign_dose_in_study") for uid in t.uids}
    for uid, info in truth.objects.items():
        if info.modality != "RTDOSE":
            continue
        ds = pydicom.dcmread(clinic.path(uid), stop_before_pixels=True)
        plan_uid = ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
        plan = truth.objects[plan_uid]
        assert plan.study_uid == info.study_uid, "doses live in their plan's study"
        if uid in foreign:
            assert plan.role == "trial"
        if ds.DoseSummationType == "BEAM":
            fraction = ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence[0]
            assert fraction.ReferencedBeamSequence[0].ReferencedBeamNumber >= 1
    # Each session sits in its own study: records sharing one (one per beam, or a fraction in two parts)
    # are one fraction of one plan.
    session_of_study: dict[str, tuple[str, int | None]] = {}
    for uid, info in truth.objects.items():
        if info.modality == "RTRECORD":
            ds = pydicom.dcmread(clinic.path(uid), stop_before_pixels=True)
            items = [*ds.get("TreatmentSessionBeamSequence", []), *ds.get("TreatmentSessionIonBeamSequence", []),
                     *ds.get("TreatmentSessionApplicationSetupSequence", [])]
            fractions = {int(item.CurrentFractionNumber) for item in items}
            assert len(fractions) <= 1, uid
            session = (str(ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID), next(iter(fractions), None))
            assert session_of_study.setdefault(info.study_uid, session) == session, "one session per study"


def test_registrations_name_fixed_and_moving_frames(clinic: Clinic) -> None:
    truth = clinic.truth
    seen = set()
    for uid, info in truth.objects.items():
        if info.modality != "REG":
            continue
        ds = pydicom.dcmread(clinic.path(uid))
        if info.sop_class_uid == SopClass.SPATIAL_REGISTRATION.value:
            fixed, moving = ds.RegistrationSequence
            assert fixed.FrameOfReferenceUID == ds.FrameOfReferenceUID
            identity = fixed.MatrixRegistrationSequence[0].MatrixSequence[0].FrameOfReferenceTransformationMatrix
            assert [float(v) for v in identity] == [float(i % 5 == 0) for i in range(16)]
            assert moving.FrameOfReferenceUID != ds.FrameOfReferenceUID
            for item in (fixed, moving):
                for ref in item.ReferencedImageSequence:
                    assert truth.objects[ref.ReferencedSOPInstanceUID].for_uid == item.FrameOfReferenceUID
            seen.add("rigid")
        else:
            (item,) = ds.DeformableRegistrationSequence
            assert item.SourceFrameOfReferenceUID != ds.FrameOfReferenceUID
            for ref in item.ReferencedImageSequence:
                assert truth.objects[ref.ReferencedSOPInstanceUID].for_uid == item.SourceFrameOfReferenceUID
            seen.add("deformable")
        listed = {s.SeriesInstanceUID for s in ds.get("ReferencedSeriesSequence", [])}
        for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []):
            assert study.StudyInstanceUID != info.study_uid
            listed |= {s.SeriesInstanceUID for s in study.ReferencedSeriesSequence}
        assert len(listed) == 2
    assert seen == {"rigid", "deformable"}

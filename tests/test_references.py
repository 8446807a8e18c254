"""Reference extraction: every RT object kind, malformed inputs and pydicom's bundled RT files."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from rtharvest.core.references import ObjectKind, ProblemCode, extract, extract_from_bytes
from rtharvest.core.sopclass import SopClass

from .planner_fixtures import dose, image_series, plan, record, registration, structure_set, uid

# The malformed fixtures set invalid values on purpose; pydicom warns when they are written.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def codes(refs: object) -> set[ProblemCode]:
    return {p.code for p in refs.problems}  # type: ignore[attr-defined]


def to_bytes(ds: Dataset) -> bytes:
    ds = Dataset(ds)  # shallow copy
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -- well-formed objects --------------------------------------------------------------------------


def test_record() -> None:
    rec = extract(record("r", "P1", "1.2.3", "20200302", ion=True))
    assert rec.kind is ObjectKind.RECORD
    assert rec.record is not None
    assert rec.record.plan_uids == ("1.2.3",)
    assert rec.record.treatment_date == "20200302"
    assert rec.record.treatment_time == "101500"
    assert rec.problems == ()


def test_record_date_falls_back_to_control_point_date() -> None:
    ds = record("r", "P1", "1.2.3", "20200302")
    ds.TreatmentDate = ""
    ds.TreatmentSessionBeamSequence = Sequence([Dataset()])
    cp = Dataset()
    cp.TreatmentControlPointDate = "20200305"
    ds.TreatmentSessionBeamSequence[0].ControlPointDeliverySequence = Sequence([cp])
    rec = extract(ds)
    assert rec.record is not None
    assert rec.record.treatment_date == "20200305"
    assert rec.record.date_source == "TreatmentControlPointDate"
    assert ProblemCode.MISSING_ATTRIBUTE in codes(rec)


def test_record_without_plan_reference_and_two_items() -> None:
    empty = extract(record("r", "P1", None, "20200302"))
    assert empty.record is not None and empty.record.plan_uids == ()
    assert ProblemCode.EMPTY_SEQUENCE in codes(empty)
    two = record("r2", "P1", "1.2.3", "20200302")
    extra = Dataset()
    extra.ReferencedSOPInstanceUID = "1.2.4"
    two.ReferencedRTPlanSequence.append(extra)
    refs = extract(two)
    assert refs.record is not None and refs.record.plan_uids == ("1.2.3", "1.2.4")
    assert ProblemCode.MULTIPLE_ITEMS in codes(refs)


def test_plan_and_ion_plan() -> None:
    ds = plan("p", "P1", "1.2.9", "1.2.10", intent="curative", related=[("1.2.11", "PREDECESSOR")])
    refs = extract(ds)
    assert refs.kind is ObjectKind.PLAN and refs.plan is not None
    assert refs.plan.structure_set_uids == ("1.2.10",)
    assert refs.plan.intent == "CURATIVE"  # normalised
    assert refs.plan.related_plans == (("1.2.11", "PREDECESSOR"),)
    assert refs.plan.is_ion is False
    ion = extract(plan("ion", "P1", "1.2.9", "1.2.10", ion=True))
    assert ion.plan is not None and ion.plan.is_ion and ion.sop_class_uid == SopClass.RT_ION_PLAN.value


def test_tomotherapy_plan_without_structure_set_is_not_an_error() -> None:
    refs = extract(plan("tomo", "P1", "1.2.9", None))
    assert refs.plan is not None and refs.plan.structure_set_uids == ()
    assert refs.plan.geometry == "TREATMENT_DEVICE"
    assert ProblemCode.MISSING_SEQUENCE not in codes(refs)


def test_patient_geometry_plan_without_structure_set_is_reported() -> None:
    ds = plan("p", "P1", "1.2.9", "1.2.10")
    del ds.ReferencedStructureSetSequence
    refs = extract(ds)
    problem = next(p for p in refs.problems if p.code is ProblemCode.MISSING_SEQUENCE)
    assert problem.attribute == "ReferencedStructureSetSequence"
    assert problem.tag == "(300C,0060)"


def test_structure_set_first_contoured_roi() -> None:
    images = image_series("ct", "P1", "1.2.9", "1.2.99", "CT", 4)
    refs = extract(structure_set("ss", "P1", "1.2.9", [images], empty_first_roi=True))
    ss = refs.structure_set
    assert ss is not None
    assert ss.frame_of_reference_uids == ("1.2.99",)
    assert ss.referenced_series[0].series_uid == images[0].SeriesInstanceUID
    assert ss.referenced_series[0].study_uid == "1.2.9"
    # ROI 1 is empty; ROI 2's first contour is on the second image (fixture order).
    assert ss.first_contour_roi_number == 2
    assert ss.first_contour_image_uid == images[1].SOPInstanceUID
    assert ss.series_listing(images[1].SOPInstanceUID) == ss.referenced_series[0]
    assert (ss.roi_count, ss.contoured_roi_count) == (2, 1)
    assert refs.problems == ()


def test_structure_set_dangling_roi_and_unlisted_contour_image() -> None:
    images = image_series("ct", "P1", "1.2.9", "1.2.99", "CT", 2)
    other = image_series("other", "P1", "1.2.9", "1.2.99", "CT", 2)
    ds = structure_set("ss", "P1", "1.2.9", [images], contour_series=other)
    ds.ROIContourSequence[0].ReferencedROINumber = 7
    refs = extract(ds)
    got = codes(refs)
    assert ProblemCode.DANGLING_REFERENCE in got
    messages = " ".join(p.message for p in refs.problems)
    assert "ROI 7" in messages and "not listed" in messages


def test_structure_set_without_contours() -> None:
    images = image_series("ct", "P1", "1.2.9", "1.2.99", "CT", 2)
    ds = structure_set("ss", "P1", "1.2.9", [images], empty_first_roi=True)
    ds.ROIContourSequence[1].ContourSequence = Sequence()
    refs = extract(ds)
    assert refs.structure_set is not None and refs.structure_set.first_contour_image_uid is None
    assert ProblemCode.NO_CONTOURS in codes(refs)


def test_dose() -> None:
    refs = extract(dose("d", "P1", "1.2.9", "1.2.5", ss_uid="1.2.6", summation="BEAM"))
    assert refs.kind is ObjectKind.DOSE and refs.dose is not None
    assert refs.dose.plan_uids == ("1.2.5",)
    assert refs.dose.structure_set_uids == ("1.2.6",)
    assert refs.dose.summation_type == "BEAM"


def test_rigid_and_deformable_registration() -> None:
    fixed = image_series("ct", "P1", "1.2.9", "1.2.99", "CT", 2)
    moving = image_series("mr", "P1", "1.2.8", "1.2.98", "MR", 2)
    rigid = extract(registration("reg", "P1", "1.2.9", fixed, moving))
    reg = rigid.registration
    assert reg is not None and not reg.deformable
    assert reg.frame_of_reference_uid == "1.2.99"
    assert [i.for_uid for i in reg.items] == ["1.2.99", "1.2.98"]
    assert reg.items[1].matrix_type == "RIGID"
    assert reg.involved_fors() == {"1.2.99", "1.2.98"}
    # Own study → ReferencedSeriesSequence; other study → StudiesContainingOther...
    assert [(s.study_uid, s.series_uid) for s in reg.referenced_series] == [
        ("1.2.9", fixed[0].SeriesInstanceUID), ("1.2.8", moving[0].SeriesInstanceUID)]
    assert reg.for_of_image(moving[0].SOPInstanceUID) == "1.2.98"
    deformable = extract(registration("def", "P1", "1.2.9", fixed, moving, deformable=True))
    dreg = deformable.registration
    assert dreg is not None and dreg.deformable
    assert [i.for_uid for i in dreg.items] == ["1.2.98"]  # SourceFrameOfReferenceUID
    assert dreg.involved_fors() == {"1.2.99", "1.2.98"}


def test_image() -> None:
    refs = extract(image_series("pt", "P1", "1.2.9", "1.2.99", "PT", 1)[0])
    assert refs.kind is ObjectKind.IMAGE
    assert (refs.modality, refs.frame_of_reference_uid, refs.study_uid) == ("PT", "1.2.99", "1.2.9")
    no_for = image_series("ct", "P1", "1.2.9", None, "CT", 1)[0]
    assert ProblemCode.MISSING_ATTRIBUTE in codes(extract(no_for))


# -- malformed datasets --------------------------------------------------------------------------


def test_empty_dataset() -> None:
    refs = extract(Dataset())
    assert refs.sop_uid == ""
    assert {ProblemCode.MISSING_ATTRIBUTE, ProblemCode.UNKNOWN_SOP_CLASS} <= codes(refs)


def test_unknown_sop_class_falls_back_on_modality() -> None:
    ds = dose("d", "P1", "1.2.9", "1.2.5")
    ds.SOPClassUID = "1.2.3.4.5.private"
    refs = extract(ds)
    assert refs.kind is ObjectKind.DOSE
    assert ProblemCode.UNKNOWN_SOP_CLASS in codes(refs)
    assert ProblemCode.INVALID_UID in codes(refs)


def test_modality_contradicting_sop_class() -> None:
    ds = dose("d", "P1", "1.2.9", "1.2.5")
    ds.Modality = "CT"
    refs = extract(ds)
    assert refs.kind is ObjectKind.DOSE
    assert ProblemCode.INCONSISTENT in codes(refs)


def test_sequence_with_wrong_vr() -> None:
    ds = dose("d", "P1", "1.2.9", None)
    ds[0x300C0002] = DataElement(0x300C0002, "LO", "1.2.5")  # a string where a sequence belongs
    refs = extract(ds)
    assert refs.dose is not None and refs.dose.plan_uids == ()
    problem = next(p for p in refs.problems if p.code is ProblemCode.WRONG_VR)
    assert problem.attribute == "ReferencedRTPlanSequence" and problem.tag == "(300C,0002)"


def test_uid_with_wrong_type_and_bad_syntax() -> None:
    ds = record("r", "P1", "1.2.3", "20200302")
    ds.ReferencedRTPlanSequence[0][0x00081155] = DataElement(0x00081155, "US", 5)
    refs = extract(ds)
    assert refs.record is not None and refs.record.plan_uids == ()
    assert ProblemCode.WRONG_VR in codes(refs)
    bad = record("r2", "P1", "1.2.03.abc", "20200302")
    refs2 = extract(bad)
    assert refs2.record is not None and refs2.record.plan_uids == ("1.2.03.abc",)  # kept: it is what is stored
    assert ProblemCode.INVALID_UID in codes(refs2)


def test_empty_items_and_non_dataset_items() -> None:
    ds = plan("p", "P1", "1.2.9", "1.2.10")
    ds.ReferencedStructureSetSequence.append(Dataset())
    refs = extract(ds)
    assert refs.plan is not None and refs.plan.structure_set_uids == ("1.2.10",)
    problem = next(p for p in refs.problems if p.code is ProblemCode.EMPTY_ITEM)
    assert problem.attribute == "ReferencedStructureSetSequence[1].ReferencedSOPInstanceUID"


def test_structure_set_missing_every_sequence() -> None:
    ds = structure_set("ss", "P1", "1.2.9", [image_series("ct", "P1", "1.2.9", "1.2.99")])
    for kw in ("ReferencedFrameOfReferenceSequence", "StructureSetROISequence", "ROIContourSequence"):
        delattr(ds, kw)
    refs = extract(ds)
    assert refs.structure_set is not None
    assert refs.structure_set.referenced_series == ()
    missing = {p.attribute for p in refs.problems if p.code is ProblemCode.MISSING_SEQUENCE}
    assert missing == {"ReferencedFrameOfReferenceSequence", "StructureSetROISequence", "ROIContourSequence"}


def test_registration_referencing_nothing() -> None:
    fixed = image_series("ct", "P1", "1.2.9", "1.2.99", "CT", 1)
    ds = registration("reg", "P1", "1.2.9", fixed, None, series_level=False)
    ds.RegistrationSequence = Sequence()
    refs = extract(ds)
    assert refs.registration is not None and refs.registration.items == ()
    assert {ProblemCode.EMPTY_SEQUENCE, ProblemCode.MISSING_SEQUENCE} <= codes(refs)


def test_bad_date() -> None:
    ds = record("r", "P1", "1.2.3", "2020.03.02")
    refs = extract(ds)
    assert refs.record is not None and refs.record.treatment_date == "20200302"
    assert ProblemCode.INVALID_DATE in codes(refs)
    ds.TreatmentDate = "March"
    refs = extract(ds)
    assert refs.record is not None and refs.record.treatment_date is None


def test_extract_never_raises_on_a_hostile_dataset() -> None:
    class Hostile(Dataset):
        def __contains__(self, key: object) -> bool:
            raise RuntimeError("boom")

    refs = extract(Hostile())
    assert refs.kind is ObjectKind.UNREADABLE or refs.problems


# -- bytes -----------------------------------------------------------------------------------------


def test_round_trip_bytes() -> None:
    ds = plan("p", "P1", "1.2.9", "1.2.10")
    refs = extract_from_bytes(to_bytes(ds))
    assert refs.kind is ObjectKind.PLAN and refs.plan is not None
    assert refs.plan.structure_set_uids == ("1.2.10",)
    assert refs.problems == ()


@pytest.mark.parametrize("data", [b"", b"garbage" * 20, b"\x00" * 200, b"DICM"])
def test_unreadable_bytes(data: bytes) -> None:
    refs = extract_from_bytes(data)
    assert refs.kind is ObjectKind.UNREADABLE
    assert refs.problems[0].code is ProblemCode.UNREADABLE


def test_truncated_bytes_at_every_cut() -> None:
    data = to_bytes(structure_set("ss", "P1", "1.2.9", [image_series("ct", "P1", "1.2.9", "1.2.99")]))
    for cut in range(0, len(data), 37):
        refs = extract_from_bytes(data[:cut])  # never raises
        assert refs.problems, cut
        assert refs.kind in (ObjectKind.UNREADABLE, ObjectKind.STRUCTURE_SET), cut
    full = extract_from_bytes(data)
    assert full.problems == ()


# -- pydicom's bundled files: four unrelated patients, every reference dangles ---------------------


def bundled(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]


def test_pydicom_rtplan() -> None:
    refs = extract_from_bytes(bundled("rtplan.dcm"))
    assert refs.kind is ObjectKind.PLAN and refs.plan is not None
    assert refs.plan.structure_set_uids == ("1.2.333.444.55.6.7777.88888",)
    assert refs.plan.related_plans == (("1.9.999.999.99.9.9999.9999.20030903145128", "PREDECESSOR"),)
    assert refs.plan.intent is None and refs.plan.geometry == "PATIENT"


def test_pydicom_rtplan_truncated() -> None:
    refs = extract_from_bytes(bundled("rtplan_truncated.dcm"))
    assert refs.kind is ObjectKind.PLAN and refs.plan is not None
    assert refs.plan.structure_set_uids == ()
    assert {ProblemCode.TRUNCATED, ProblemCode.MISSING_SEQUENCE} <= codes(refs)


def test_pydicom_rtdose() -> None:
    refs = extract_from_bytes(bundled("rtdose.dcm"))
    assert refs.kind is ObjectKind.DOSE and refs.dose is not None
    assert refs.dose.plan_uids == ("1.2.123.456.78.9.0123.4567.89012345678901",)
    assert refs.dose.summation_type == "BEAM"
    # The plan UID has a component with a leading zero: reported, kept.
    assert ProblemCode.INVALID_UID in codes(refs)


def test_pydicom_rtstruct_without_file_meta() -> None:
    refs = extract_from_bytes(bundled("rtstruct.dcm"))
    assert refs.kind is ObjectKind.STRUCTURE_SET and refs.structure_set is not None
    assert ProblemCode.NO_FILE_META in codes(refs)
    # Contours carry no ContourImageSequence: the planning image cannot be found from the contours.
    assert refs.structure_set.first_contour_image_uid is None
    assert ProblemCode.NO_CONTOURS in codes(refs)
    assert len(refs.structure_set.referenced_series) == 1


def test_pydicom_ct() -> None:
    refs = extract_from_bytes(bundled("CT_small.dcm"))
    assert refs.kind is ObjectKind.IMAGE and refs.modality == "CT"
    assert refs.frame_of_reference_uid


@pytest.mark.parametrize("name", ["rtdose_1frame.dcm", "rtdose_rle.dcm", "rtdose_expb.dcm", "rtplan.dcm"])
def test_pydicom_files_parse_without_pixels(name: str) -> None:
    refs = extract_from_bytes(bundled(name))
    assert refs.kind in (ObjectKind.DOSE, ObjectKind.PLAN)
    assert refs.sop_uid


def test_read_from_file_like_dataset_equals_bytes() -> None:
    ds = pydicom.dcmread(Path(str(get_testdata_file("rtplan.dcm"))))
    assert extract(ds).plan == extract_from_bytes(bundled("rtplan.dcm")).plan


def test_uid_helper_is_valid() -> None:
    assert extract(record("r", "P1", uid("x"), "20200101")).problems == ()

"""The shared DICOM builders (rtharvest.core.dicombuild): what every writer relies on them for."""

from __future__ import annotations

import pytest
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian

from rtharvest.core.dicombuild import DS_MAX_CHARS, code, ds_text, file_meta, frame_of_reference, make_item, seq


@pytest.mark.parametrize(("value", "decimals", "text"), [
    (1.5, 4, "1.5"),
    (2.0, 4, "2"),
    (-0.00001, 4, "0"),  # never "-0"
    (0.0, 6, "0"),
    (1190.0, 6, "1190"),
    (0.1234567, 6, "0.123457"),
    (-12.345678, 4, "-12.3457"),
])
def test_ds_text_rounds_and_drops_trailing_zeros(value: float, decimals: int, text: str) -> None:
    assert ds_text(value, decimals) == text


@pytest.mark.parametrize("value", [123456789012.5, -98765432101.25, 1e20])
def test_ds_text_never_exceeds_sixteen_characters(value: float) -> None:
    """A fixed-point text too long for a DS falls back to 6 significant digits (PS3.5 allows the exponent)."""
    text = ds_text(value, 6)
    assert len(text) <= DS_MAX_CHARS
    assert float(text) == pytest.approx(value, rel=1e-5)


def test_items_sequences_and_codes() -> None:
    item = make_item(ReferencedSOPInstanceUID="1.2.3", ReferencedBeamNumber=2)
    assert (item.ReferencedSOPInstanceUID, item.ReferencedBeamNumber) == ("1.2.3", 2)
    assert len(seq()) == 0 and [i.ReferencedBeamNumber for i in seq(item, item)] == [2, 2]
    c = code("125024", "DCM", "Image Content-based Alignment")
    assert (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) == ("125024", "DCM", "Image Content-based Alignment")


def test_frame_of_reference_module() -> None:
    ds = make_item()
    frame_of_reference(ds, "1.2.840.1")
    assert ds.FrameOfReferenceUID == "1.2.840.1" and ds.PositionReferenceIndicator == ""


def test_file_meta_names_the_instance_and_the_writer() -> None:
    meta = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", PYDICOM_IMPLEMENTATION_UID)
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and "ImplementationVersionName" not in meta
    named = file_meta("1.2", "1.2.3", "2.25.1", version_name="WRITER1", transfer_syntax=ImplicitVRLittleEndian)
    assert (named.ImplementationVersionName, named.TransferSyntaxUID) == ("WRITER1", ImplicitVRLittleEndian)

"""Small pure builders every DICOM writer of the project shares: the converters' writers
(``rtharvest.converters``) and the synthetic clinic (``rtharvest.synth``).

Only what is the same in all of them lives here: items and sequences, code items, the DS value text,
the Frame of Reference module and the Part-10 file meta group. What each writer fills in (its
Manufacturer, its implementation identity, its precision) stays an argument, so each keeps writing
exactly the bytes it wrote before.
"""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

#: Study Component Management SOP Class: the (retired but universally used) class that
#: RTReferencedStudySequence items name, because a study has no SOP class of its own (PS3.3 C.8.8.5).
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
#: A DS value holds at most 16 characters (PS3.5 6.2).
DS_MAX_CHARS = 16


def make_item(**values: object) -> Dataset:
    """A sequence item (or any dataset) with the given keyword attributes."""
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def seq(*items: Dataset) -> DicomSequence:
    """A sequence value of ``items`` (none: an empty Type 2 sequence)."""
    return DicomSequence(list(items))


def code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (PS3.3 Table 8.8-1 basic attributes)."""
    return make_item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def ds_text(value: float, decimals: int = 4) -> str:
    """A DS value: ``decimals`` decimals without trailing zeros when that fits 16 characters, otherwise
    6 significant digits (a DS longer than 16 characters is invalid; the exponent form is allowed)."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text if len(text) <= DS_MAX_CHARS else f"{value:.6g}"


def frame_of_reference(ds: Dataset, for_uid: str) -> None:
    """The Frame of Reference module (PS3.3 C.7.4.1); the position reference is Type 2, left empty."""
    ds.FrameOfReferenceUID = UID(for_uid)
    ds.PositionReferenceIndicator = ""


def file_meta(
    sop_class: str,
    sop_uid: str,
    implementation_uid: str,
    *,
    version_name: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> FileMetaDataset:
    """A Part-10 file meta group for one instance (PS3.10 7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(implementation_uid)
    if version_name is not None:
        meta.ImplementationVersionName = version_name
    return meta

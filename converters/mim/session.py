"""Unpack a MIM session: the RTSTRUCT and REG datasets embedded in a Raw Data object, as standalone objects.

MIM stores the structure sets and registrations of a session inside a Raw Data object (SOP class
1.2.840.10008.5.1.4.1.1.66), as items of a private sequence of group 0013. Rules applied here
(``../shared/CONVERTERS.md``; PS3.5 7.8 for private blocks, 6.2.2 for UN):

* **Found through the private creator, never a fixed element number.** A private creator element
  ``(0013,00xx)`` whose value starts with ``MIM`` (case-insensitive, spaces ignored) reserves the block
  ``(0013,xx00-xxFF)``. No public sample exists, so the creator's exact text is an assumption; the
  synthetic fixtures write ``"MIM Software Inc. Session Meta"`` (:mod:`rtharvest.synth.mimsession`). Every
  element of the block whose value holds datasets with a SOPClassUID is a session sequence (rosamllib
  reads offset ``0x50``, ``(0013,2050)``; other offsets are accepted too).
* **Three encodings.** An explicit-VR ``SQ``; a ``UN`` of undefined length (pydicom already reads its
  implicit-VR items as a sequence); and, in an Implicit VR file, a defined-length ``UN`` whose bytes are
  parsed here: as sequence items when they start with an Item tag, else as one bare dataset (implicit VR
  unless the bytes show an explicit VR).
* **Standalone objects.** RT Structure Set, Spatial Registration and Deformable Spatial Registration
  items are kept (anything else is reported as skipped); each keeps its own UIDs (other objects reference
  them), loses group 0013, gets the parent's SpecificCharacterSet when it has none (PS3.5 6.1.2.5.2: the
  parent's applies to the items), the parent's Patient, Patient Study and General Study attributes that
  it lacks or leaves empty, the parent's Manufacturer when absent (General Equipment, Type 2), and new
  file meta (Explicit VR Little Endian).

Everything here is pure: bytes or datasets in, datasets out. Bad input raises :class:`MimSessionError`
(whole object) or is reported per item in :attr:`UnpackResult.errors`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_sequence
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import VR

from rtharvest.sopclass import SopClass

from ..sink import with_file_meta

MIM_GROUP = 0x0013
#: Creator values that identify MIM's block: ``MIM`` followed by anything (an assumption, see above).
_CREATOR = re.compile(r"^\s*MIM", re.IGNORECASE)
#: SOP classes a session may carry that the harvest wants as standalone objects.
KEPT_SOP_CLASSES = frozenset({SopClass.RT_STRUCTURE_SET.value, SopClass.SPATIAL_REGISTRATION.value,
                              SopClass.DEFORMABLE_SPATIAL_REGISTRATION.value})
_MODALITY_OF = {SopClass.RT_STRUCTURE_SET.value: "RTSTRUCT", SopClass.SPATIAL_REGISTRATION.value: "REG",
                SopClass.DEFORMABLE_SPATIAL_REGISTRATION.value: "REG"}
#: Patient (C.7.1.1), Patient Study (C.7.2.2) and General Study (C.7.2.1) attributes taken from the parent.
PARENT_ATTRIBUTES = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription",
    "Manufacturer",
)
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_EXPLICIT_VRS = frozenset(v.value for v in VR)


class MimSessionError(ValueError):
    """The object is not a MIM session (``damaged`` False), or it is one whose session sequence cannot be
    read (``damaged`` True)."""

    def __init__(self, message: str, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


@dataclass(frozen=True)
class UnpackedObject:
    """One standalone object unpacked from a session (``index``: its item number in the session)."""

    dataset: Dataset
    sop_uid: str
    sop_class_uid: str
    modality: str
    index: int


@dataclass(frozen=True)
class SkippedItem:
    """An item of the session that gave no object, with a stable ``reason`` and a message."""

    index: int
    reason: str
    detail: str


@dataclass
class UnpackResult:
    """What one session held."""

    raw_uid: str
    objects: list[UnpackedObject] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    errors: list[SkippedItem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    return str(value or "").strip().strip("\x00")


def mim_blocks(ds: Dataset) -> list[int]:
    """Block numbers (``xx`` of ``(0013,00xx)``) reserved by a MIM private creator."""
    blocks: list[int] = []
    for block in range(0x10, 0x100):
        tag = BaseTag((MIM_GROUP << 16) | block)
        if tag in ds:
            try:
                value = ds[tag].value
            except Exception:  # an undecodable creator is not MIM's
                continue
            if _CREATOR.match(_text(value)):
                blocks.append(block)
    return blocks


def is_mim_session(ds: Dataset) -> bool:
    """A Raw Data object with a MIM private block."""
    return _text(ds.get("SOPClassUID", "")) == SopClass.RAW_DATA.value and bool(mim_blocks(ds))


def _charset(ds: Dataset) -> str | list[str]:
    value = ds.get("SpecificCharacterSet")
    if not value:
        return "ISO_IR 6"
    return [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else str(value)


def _looks_explicit(data: bytes) -> bool:
    return len(data) >= 6 and data[4:6].decode("latin-1") in _EXPLICIT_VRS


def _datasets_from_bytes(data: bytes, charset: str | list[str]) -> list[Dataset]:
    """A defined-length UN's bytes: sequence items (Item tags) or one bare dataset."""
    if data[:4] == _ITEM_TAG:
        # PS3.5 6.2.2: a sequence turned into UN keeps its Implicit VR Little Endian encoding.
        return list(read_sequence(BytesIO(data), True, True, len(data), charset))
    return [read_dataset(BytesIO(data), not _looks_explicit(data), True, parent_encoding=charset)]


def _element_datasets(ds: Dataset, tag: BaseTag, charset: str | list[str]) -> list[Dataset]:
    value = ds[tag].value
    if isinstance(value, DicomSequence | list):
        return [item for item in value if isinstance(item, Dataset)]
    if isinstance(value, bytes | bytearray) and len(value) >= 8:
        try:
            return _datasets_from_bytes(bytes(value), charset)
        except Exception:  # a label or another private value that is no dataset
            return []
    return []


def _has_sop_class(item: Dataset) -> bool:
    try:
        return bool(_text(item.get("SOPClassUID", "")))
    except Exception:
        return False


def session_items(ds: Dataset) -> list[Dataset]:
    """The embedded datasets of a MIM session, in order; :class:`MimSessionError` when there are none."""
    blocks = mim_blocks(ds)
    if not blocks:
        raise MimSessionError("no MIM private creator in group 0013: not a MIM session")
    charset = _charset(ds)
    items: list[Dataset] = []
    for block in blocks:
        tags = sorted(t for t in ds.keys() if t.group == MIM_GROUP and t.element >> 8 == block)
        for tag in tags:
            try:
                found = _element_datasets(ds, tag, charset)
            except Exception as exc:
                raise MimSessionError(f"private element {tag} of the MIM block cannot be read: {exc}",
                                      damaged=True) from None
            items.extend(item for item in found if _has_sop_class(item))
    if not items:
        raise MimSessionError("the MIM private block holds no embedded dataset", damaged=True)
    return items


def _standalone(item: Dataset, parent: Dataset) -> Dataset:
    out = Dataset()
    for elem in item:  # iterating decodes raw elements with the item's (or the parent's) character set
        if elem.tag.group in (0x0002, MIM_GROUP):
            continue  # file meta does not belong in a dataset; the MIM group is dropped
        out.add(copy.deepcopy(elem))
    if "SpecificCharacterSet" not in out and "SpecificCharacterSet" in parent:
        out.SpecificCharacterSet = copy.deepcopy(parent.SpecificCharacterSet)
    for keyword in PARENT_ATTRIBUTES:
        if keyword in parent and (keyword not in out or out[keyword].is_empty):
            out[keyword] = copy.deepcopy(parent[keyword])
    return with_file_meta(out, ExplicitVRLittleEndian)


def unpack(ds: Dataset) -> UnpackResult:
    """Unpack a MIM session dataset; :class:`MimSessionError` when ``ds`` is not a readable session."""
    sop_class = _text(ds.get("SOPClassUID", ""))
    if sop_class != SopClass.RAW_DATA.value:
        raise MimSessionError(f"SOP class {sop_class or '(none)'} is not Raw Data: not a MIM session")
    result = UnpackResult(_text(ds.get("SOPInstanceUID", "")))
    parent_pid = _text(ds.get("PatientID", ""))
    for index, item in enumerate(session_items(ds)):
        try:
            item_class = _text(item.get("SOPClassUID", ""))
            if item_class not in KEPT_SOP_CLASSES:
                modality = _text(item.get("Modality", "")) or "?"
                result.skipped.append(SkippedItem(index, "not-rtstruct-or-reg",
                                                  f"item {index}: SOP class {item_class} ({modality}) is kept in "
                                                  "the session"))
                continue
            missing = [kw for kw in ("SOPInstanceUID", "SeriesInstanceUID") if not _text(item.get(kw, ""))]
            if missing:
                result.errors.append(SkippedItem(index, "incomplete-item",
                                                 f"item {index} lacks {', '.join(missing)}"))
                continue
            standalone = _standalone(item, ds)
        except Exception as exc:  # one damaged item must not lose the others
            result.errors.append(SkippedItem(index, "unreadable-item", f"item {index}: {type(exc).__name__}: {exc}"))
            continue
        item_pid = _text(standalone.get("PatientID", ""))
        if parent_pid and item_pid and item_pid != parent_pid:
            result.warnings.append(f"item {index}: PatientID differs from the session's; the item's is kept")
        result.objects.append(UnpackedObject(standalone, _text(standalone.SOPInstanceUID), item_class,
                                             _MODALITY_OF[item_class], index))
    return result


def unpack_bytes(data: bytes) -> UnpackResult:
    """Parse a Part-10 file (or a bare dataset) and :func:`unpack` it."""
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True)
        ds.SOPClassUID  # noqa: B018 - forces the parse far enough to tell DICOM from noise
    except Exception as exc:
        raise MimSessionError(f"not a readable DICOM object: {type(exc).__name__}: {exc}") from None
    return unpack(ds)


def referenced_uids(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID (and referenced SeriesInstanceUID) anywhere in ``ds``."""
    found: set[str] = set()

    def walk(d: Dataset, nested: bool) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item, True)
            elif elem.keyword == "ReferencedSOPInstanceUID" or (nested and elem.keyword == "SeriesInstanceUID"):
                found.add(_text(elem.value))

    walk(ds, False)
    found.discard("")
    return found


def unresolved_references(ds: Dataset, known: Iterable[str]) -> list[str]:
    """References of ``ds`` (SOP instances, series, studies) that name nothing in ``known``."""
    return sorted(referenced_uids(ds) - set(known))

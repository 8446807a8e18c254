"""Unpack a MIM session: the RTSTRUCT and REG datasets embedded in a Raw Data object, as standalone objects.

MIM stores the structure sets and registrations of a session inside a Raw Data object (SOP class
1.2.840.10008.5.1.4.1.1.66), as items of a private sequence of group 0013. Rules applied here
(docs/converters-mim.md; PS3.5 7.8 for private blocks, 6.2.2 for UN):

* **Recognised by evidence, found through the private creator.** A private creator element
  ``(0013,00xx)`` reserves the block ``(0013,xx00-xxFF)`` (never a fixed element number). A block is a
  session block when one of its elements holds at least one *complete RT dataset* (an RT Structure Set,
  Spatial Registration or Deformable Spatial Registration with its SOPInstanceUID and SeriesInstanceUID),
  whatever the creator's text: no public document states MIM's spelling. A creator whose text does not
  start with ``MIM`` gives a warning naming it. A block whose creator starts with ``MIM`` is read as a
  session even without such an item (so a damaged session is reported as damaged). The synthetic fixtures
  write ``"MIM Software Inc. Session Meta"`` (:mod:`rtharvest.synth.mimsession`); rosamllib reads offset
  ``0x50``, ``(0013,2050)``; other offsets are accepted too. Another vendor's block that holds no complete
  RT dataset (labels, numbers, partial items) is left alone.
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

from rtharvest.core.sopclass import SopClass

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


def private_blocks(ds: Dataset) -> list[tuple[int, str]]:
    """Every block of group 0013 reserved by a private creator: ``(xx of (0013,00xx), creator text)``."""
    blocks: list[tuple[int, str]] = []
    for block in range(0x10, 0x100):
        tag = BaseTag((MIM_GROUP << 16) | block)
        if tag in ds:
            try:
                value = ds[tag].value
            except Exception:  # an undecodable creator reserves nothing readable
                continue
            blocks.append((block, _text(value)))
    return blocks


def mim_blocks(ds: Dataset) -> list[int]:
    """Block numbers (``xx`` of ``(0013,00xx)``) whose creator text starts with ``MIM``."""
    return [block for block, creator in private_blocks(ds) if _CREATOR.match(creator)]


def is_complete_rt_dataset(item: Dataset) -> bool:
    """An embedded RT Structure Set or (Deformable) Spatial Registration with its own instance and series UIDs."""
    try:
        return (_text(item.get("SOPClassUID", "")) in KEPT_SOP_CLASSES
                and bool(_text(item.get("SOPInstanceUID", ""))) and bool(_text(item.get("SeriesInstanceUID", ""))))
    except Exception:
        return False


@dataclass(frozen=True)
class SessionBlock:
    """A private block of group 0013 that carries a session: its number, creator text and embedded datasets."""

    block: int
    creator: str
    items: tuple[Dataset, ...]

    @property
    def named_mim(self) -> bool:
        """Whether the creator's text starts with ``MIM`` (else the block is a session by its content only)."""
        return bool(_CREATOR.match(self.creator))


def _block_items(ds: Dataset, block: int, charset: str | list[str], strict: bool) -> list[Dataset]:
    """The datasets with a SOPClassUID held by the elements of ``block``; an unreadable element raises a
    damaged :class:`MimSessionError` when ``strict`` (a MIM-named block), else counts as no dataset."""
    items: list[Dataset] = []
    tags = sorted(t for t in ds.keys() if t.group == MIM_GROUP and t.element >> 8 == block)
    for tag in tags:
        try:
            found = _element_datasets(ds, tag, charset)
        except Exception as exc:
            if strict:
                raise MimSessionError(f"private element {tag} of the MIM block cannot be read: {exc}",
                                      damaged=True) from None
            continue
        items.extend(item for item in found if _has_sop_class(item))
    return items


def session_blocks(ds: Dataset) -> list[SessionBlock]:
    """The blocks of group 0013 that carry a session (see the module docstring for the evidence)."""
    charset = _charset(ds)
    found: list[SessionBlock] = []
    for block, creator in private_blocks(ds):
        named = bool(_CREATOR.match(creator))
        items = _block_items(ds, block, charset, strict=named)
        if named or any(is_complete_rt_dataset(item) for item in items):
            found.append(SessionBlock(block, creator, tuple(items)))
    return found


def is_mim_session(ds: Dataset) -> bool:
    """A Raw Data object with a block of group 0013 that carries a session (by creator or by content)."""
    if _text(ds.get("SOPClassUID", "")) != SopClass.RAW_DATA.value:
        return False
    try:
        return bool(session_blocks(ds))
    except MimSessionError:
        return True  # a MIM-named block that cannot be read: a damaged session, reported as such by unpack


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
    return [item for block in _session_blocks_or_raise(ds) for item in block.items]


def _session_blocks_or_raise(ds: Dataset) -> list[SessionBlock]:
    blocks = session_blocks(ds)
    if not blocks:
        raise MimSessionError("no private block of group 0013 carries a complete RT dataset (and no creator is "
                              "MIM's): not a MIM session")
    if not any(block.items for block in blocks):
        raise MimSessionError("the MIM private block holds no embedded dataset", damaged=True)
    return blocks


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
    blocks = _session_blocks_or_raise(ds)
    for block in blocks:
        if not block.named_mim:
            result.warnings.append(f"private creator {block.creator!r} of (0013,00{block.block:02X}) does not start "
                                   "with 'MIM': read as a session because it holds complete RT datasets")
    for index, item in enumerate(item for block in blocks for item in block.items):
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

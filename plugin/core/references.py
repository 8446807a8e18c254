"""Reference extraction: one DICOM object in, its typed outgoing references out (no I/O).

Every radiotherapy object stores a few one-way references (record → plan, plan → structure set,
dose → plan, structure set → images, registration → frames of reference and images). The planner only
needs those, so :func:`extract` reduces a dataset to frozen values and turns every malformed, missing
or dangling reference into a typed :class:`Problem`. It never raises: clinical exports are routinely
non-conformant (empty Type 2 sequences, vendors omitting Type 1C sequences, wrong VRs written by
converters), and one bad object must not stop a harvest.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import pydicom
from pydicom import filereader
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.uid import UID

from .sopclass import (
    IMAGE_MODALITIES,
    PLAN_CLASSES,
    REGISTRATION_CLASSES,
    TREATMENT_RECORD_CLASSES,
    Modality,
    SopClass,
    modality_of,
)

# ---------------------------------------------------------------------------------------------------
# Problems


class ProblemCode(StrEnum):
    """What is wrong with a reference (or with the object carrying it)."""

    UNREADABLE = "UNREADABLE"  # bytes that pydicom cannot parse at all
    TRUNCATED = "TRUNCATED"  # the byte stream ends inside an element
    NO_FILE_META = "NO_FILE_META"  # no preamble / file meta: parsed with force=True
    PARSE_WARNING = "PARSE_WARNING"  # pydicom warned while parsing (e.g. invalid VR value)
    MISSING_ATTRIBUTE = "MISSING_ATTRIBUTE"  # a required attribute is absent or empty
    MISSING_SEQUENCE = "MISSING_SEQUENCE"  # a sequence the object should carry is absent
    EMPTY_SEQUENCE = "EMPTY_SEQUENCE"  # the sequence is present with zero items
    EMPTY_ITEM = "EMPTY_ITEM"  # an item lacks the UID that makes it a reference
    WRONG_VR = "WRONG_VR"  # value of the wrong type (a string where a sequence belongs, ...)
    INVALID_UID = "INVALID_UID"  # not a syntactically valid UID (kept: it is still what the object says)
    INVALID_DATE = "INVALID_DATE"  # a DA value that is not YYYYMMDD
    MULTIPLE_ITEMS = "MULTIPLE_ITEMS"  # more items than the IOD allows
    DANGLING_REFERENCE = "DANGLING_REFERENCE"  # internal cross-reference that resolves to nothing
    NO_CONTOURS = "NO_CONTOURS"  # structure set whose ROIs reference no image
    UNKNOWN_SOP_CLASS = "UNKNOWN_SOP_CLASS"  # neither SOP class nor Modality tells what this is
    INCONSISTENT = "INCONSISTENT"  # attributes contradict each other (SOP class vs Modality)
    NONSTANDARD_VALUE = "NONSTANDARD_VALUE"  # a CS value outside the defined terms
    INTERNAL = "INTERNAL"  # an unexpected error inside the extractor (a bug: please report)


@dataclass(frozen=True)
class Problem:
    """One typed finding about an object: ``attribute`` is a keyword path, ``tag`` its (gggg,eeee)."""

    code: ProblemCode
    attribute: str
    message: str
    tag: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON-safe form (for logs and the manifest)."""
        return {"Code": self.code.value, "Attribute": self.attribute, "Tag": self.tag,
                "Message": self.message}


# ---------------------------------------------------------------------------------------------------
# Reference values


class ObjectKind(StrEnum):
    """The role-independent kind of an object, from its SOP class (falling back on Modality)."""

    RECORD = "RECORD"
    PLAN = "PLAN"
    STRUCTURE_SET = "STRUCTURE_SET"
    DOSE = "DOSE"
    REGISTRATION = "REGISTRATION"
    IMAGE = "IMAGE"
    OTHER = "OTHER"  # RT Image, raw data, anything else: stored when asked for, never followed
    UNREADABLE = "UNREADABLE"


@dataclass(frozen=True)
class SeriesRef:
    """A referenced series: its study (``None`` when the object does not say) and listed instances."""

    study_uid: str | None
    series_uid: str
    instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SessionItem:
    """One delivered beam or application setup of a treatment record (a TreatmentSessionBeamSequence,
    TreatmentSessionIonBeamSequence or TreatmentSessionApplicationSetupSequence item): the fraction it
    belongs to and whether it continues one an earlier record began."""

    #: CurrentFractionNumber (Type 2: ``None`` when empty or absent).
    fraction_number: int | None
    #: TreatmentDeliveryType as written (``TREATMENT``, ``CONTINUATION``), ``None`` when empty.
    delivery_type: str | None
    #: ReferencedFractionGroupNumber of the item, where a writer puts it there.
    fraction_group: int | None = None


@dataclass(frozen=True)
class DeliveryFacts:
    """What a treatment record says it delivered (PS3.3 RT General Treatment Record and RT Beams / Ion
    Beams / Brachy Session Record modules); counted into fractions by :mod:`rtharvest.core.fractions`."""

    #: True for an RT Treatment Summary Record: a course's cumulative state, never a session.
    summary: bool
    #: ReferencedFractionGroupNumber: the ReferencedRTPlanSequence item's, else the session record
    #: module's (top level); ``None`` when neither says.
    fraction_group: int | None
    #: The session's items (beams or application setups), in order.
    sessions: tuple[SessionItem, ...] = ()


@dataclass(frozen=True)
class RecordRefs:
    """RT (Beams/Ion/Brachy/Summary) Treatment Record."""

    plan_uids: tuple[str, ...]
    treatment_date: str | None
    treatment_time: str | None
    #: Where ``treatment_date`` came from: ``TreatmentDate`` or a fallback attribute.
    date_source: str = "TreatmentDate"
    #: The record's delivery facts (``None`` only for records built without them).
    delivery: DeliveryFacts | None = None


@dataclass(frozen=True)
class PlanRefs:
    """RT Plan / RT Ion Plan."""

    structure_set_uids: tuple[str, ...]
    dose_uids: tuple[str, ...]
    #: ReferencedRTPlanSequence: (plan UID, RTPlanRelationship or ``None``), in order.
    related_plans: tuple[tuple[str, str | None], ...]
    intent: str | None
    label: str | None
    geometry: str | None
    is_ion: bool
    plan_date: str | None = None
    #: FractionGroupSequence: (FractionGroupNumber, NumberOfFractionsPlanned or ``None``), in order.
    fraction_groups: tuple[tuple[int, int | None], ...] = ()


@dataclass(frozen=True)
class StructureSetRefs:
    """RT Structure Set."""

    frame_of_reference_uids: tuple[str, ...]
    #: RTReferencedSeriesSequence entries, in ReferencedFrameOfReference → Study → Series order.
    referenced_series: tuple[SeriesRef, ...]
    #: Image referenced by the first contour of the first ROI (ROIContourSequence order) that has one.
    first_contour_image_uid: str | None
    first_contour_roi_number: int | None
    roi_count: int
    contoured_roi_count: int
    #: Every image a contour names (ROIContourSequence > ContourSequence > ContourImageSequence), in order.
    contour_image_uids: tuple[str, ...] = ()

    def series_listing(self, image_uid: str) -> SeriesRef | None:
        """The referenced series whose ContourImageSequence lists ``image_uid``, if any."""
        for ref in self.referenced_series:
            if image_uid in ref.instance_uids:
                return ref
        return None


@dataclass(frozen=True)
class DoseRefs:
    """RT Dose."""

    plan_uids: tuple[str, ...]
    structure_set_uids: tuple[str, ...]
    summation_type: str | None


@dataclass(frozen=True)
class RegistrationItem:
    """One RegistrationSequence / DeformableRegistrationSequence item."""

    for_uid: str | None
    image_uids: tuple[str, ...]
    matrix_type: str | None


@dataclass(frozen=True)
class RegistrationRefs:
    """Spatial Registration or Deformable Spatial Registration."""

    deformable: bool
    frame_of_reference_uid: str | None
    items: tuple[RegistrationItem, ...]
    #: ReferencedSeriesSequence (study = the REG's own study) then
    #: StudiesContainingOtherReferencedInstancesSequence, in order.
    referenced_series: tuple[SeriesRef, ...]

    def involved_fors(self) -> frozenset[str]:
        """Every FoR the registration involves: its own and each item's (Source)FrameOfReferenceUID."""
        fors = {item.for_uid for item in self.items if item.for_uid}
        if self.frame_of_reference_uid:
            fors.add(self.frame_of_reference_uid)
        return frozenset(fors)

    def for_of_image(self, image_uid: str) -> str | None:
        """The FoR of the registration item that lists ``image_uid``."""
        for item in self.items:
            if image_uid in item.image_uids:
                return item.for_uid
        return None


@dataclass(frozen=True)
class ObjectRefs:
    """Identity plus outgoing references of one object; exactly one of the kind-specific parts is set."""

    sop_uid: str
    sop_class_uid: str
    modality: str | None
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    frame_of_reference_uid: str | None
    kind: ObjectKind
    record: RecordRefs | None = None
    plan: PlanRefs | None = None
    structure_set: StructureSetRefs | None = None
    dose: DoseRefs | None = None
    registration: RegistrationRefs | None = None
    problems: tuple[Problem, ...] = field(default=())


# ---------------------------------------------------------------------------------------------------
# Safe readers

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DATE_RE = re.compile(r"^[0-9]{8}$")


def _tag_of(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        return ""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


#: Read reference sequences item by item without building a pydicom Dataset per item (see _RawItem).
#: A switch for the tests, which check that both ways give the same references and problems.
FAST_SEQUENCES = True
#: Read a clean CT/MR/PET image's references from its elements without a Dataset (image_refs_from_bytes);
#: a switch for the same tests.
FAST_IMAGES = True
_ITEM_TAG, _SEQUENCE_DELIMITER_TAG, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF
_SPECIFIC_CHARACTER_SET_TAG = 0x00080005
_DEFLATED = "1.2.840.10008.1.2.1.99"


class _RawItem:
    """A sequence item whose elements stay raw (pydicom ``RawDataElement``) until one is read.

    pydicom builds a ``Dataset`` for every item of a sequence the first time the sequence is read; a
    structure set's ROIContourSequence → ContourSequence → ContourImageSequence or a registration's
    ReferencedImageSequence hold thousands of items, and building them was most of the 30–70 ms a
    structure set or REG took to parse. Here an item is a dict of its raw elements, and an element is
    converted by pydicom's own ``convert_raw_data_element`` when it is read, so every value, error and
    warning is the one the ``Dataset`` would give. Only what :class:`_Reader` asks of an item is offered.

    Applies to sequences with a defined length, whose bytes pydicom keeps raw until they are read.
    Undefined-length sequences are parsed into Datasets while the file is read, as before. Orthanc 1.10.1
    stores what arrives by C-STORE with defined lengths (checked: a structure set sent by pynetdicom with
    undefined-length sequences and items came back from ``/instances/{id}/file`` with defined ones), so
    every harvested or pushed instance is read this way.
    """

    __slots__ = ("elements", "encoding")

    def __init__(self, elements: dict[int, RawDataElement | DataElement], encoding: Any) -> None:
        self.elements = elements
        self.encoding = encoding

    def __contains__(self, keyword: str) -> bool:
        tag = tag_for_keyword(keyword)
        return tag is not None and tag in self.elements

    def __getitem__(self, keyword: str) -> DataElement:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in self.elements:
            raise KeyError(keyword)
        elem = self.elements[tag]
        if isinstance(elem, RawDataElement):
            elem = self.elements[tag] = convert_raw_data_element(elem, encoding=self.encoding)
        return elem


#: What a sequence item is to :class:`_Reader`: a pydicom Dataset or a raw item.
_Item = Dataset | _RawItem


def _raw_items(ds: _Item, keyword: str, source: bytes | None = None) -> list[_RawItem] | None:
    """The items of sequence ``keyword`` of ``ds`` as :class:`_RawItem`, or None when that is not how
    it should be read: absent, already converted, not a sequence, an item with its own character set,
    anything pydicom warns or fails about (the ``Dataset`` path then reads it, and reports exactly what it
    always did).

    ``source``: the bytes ``ds`` was read from, for a top-level sequence longer than ``defer_size`` (a
    large structure set's ROIContourSequence): pydicom left its value unread, and loading it through the
    Dataset would build every item; its bytes are taken from ``source`` at the element's offset instead.
    """
    if not FAST_SEQUENCES:
        return None
    try:
        found = _sequence_bytes(ds, keyword, source)
        if found is None:
            return None
        data, implicit, little, encoding = found
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = _walk_items(data, implicit, little, encoding)
        return None if caught else items
    except Exception:
        return None


def _sequence_bytes(ds: _Item, keyword: str, source: bytes | None) -> tuple[bytes, bool, bool, Any] | None:
    """(value bytes, implicit VR, little endian, character encoding) of an unconverted sequence, or None."""
    if isinstance(ds, _RawItem):
        tag = tag_for_keyword(keyword)
        elem = ds.elements.get(tag) if tag is not None else None
        encoding = ds.encoding
    else:
        elem = ds.get_item(keyword, keep_deferred=True)
        encoding = ds._character_set
    if not isinstance(elem, RawDataElement) or (elem.VR or dictionary_VR(elem.tag)) != "SQ":
        return None
    data = elem.value
    if data is None and source is not None and isinstance(ds, Dataset) and elem.length not in (0, _UNDEFINED) \
            and str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) != _DEFLATED:
        # Deferred: the value's bytes are where pydicom left them (a deflated dataset was inflated into
        # another buffer first, so its offsets do not point into ``source``).
        data = source[elem.value_tell:elem.value_tell + elem.length]
        if len(data) != elem.length:
            return None
    if not isinstance(data, bytes):
        return None
    return data, elem.is_implicit_VR, elem.is_little_endian, encoding


def _walk_items(data: bytes, implicit: bool, little: bool, encoding: Any) -> list[_RawItem] | None:
    """The items of a sequence value, each a dict of its raw elements, read as pydicom's
    ``read_sequence``/``read_dataset`` would (None when anything is not as expected)."""
    header = struct.Struct("<HHL" if little else ">HHL")
    items: list[_RawItem] = []
    fp = io.BytesIO(data)
    while fp.tell() < len(data):
        raw = fp.read(8)
        if len(raw) < 8:
            return None
        group, element, length = header.unpack(raw)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER_TAG:
            break
        if tag != _ITEM_TAG:
            return None
        start = fp.tell()
        # As pydicom's read_dataset does for each item: an item may switch to implicit VR.
        item_implicit = filereader._is_implicit_vr(fp, implicit, little, None, is_sequence=True)
        fp.seek(start)
        elements: dict[int, RawDataElement | DataElement] = {}
        generator = data_element_generator(fp, item_implicit, little, None, None, encoding)
        if length == _UNDEFINED:
            elements.update((int(e.tag), e) for e in generator)  # ends at the item delimiter
        else:
            while fp.tell() - start < length:
                e = next(generator)
                elements[int(e.tag)] = e
            if fp.tell() - start != length:
                return None
        if _SPECIFIC_CHARACTER_SET_TAG in elements:
            return None
        items.append(_RawItem(elements, encoding))
    return items


class _Reader:
    """Collects problems while reading attributes defensively (any access may raise on bad data)."""

    def __init__(self, source: bytes | None = None) -> None:
        self.problems: list[Problem] = []
        #: The bytes the top-level dataset was read from (see :func:`_raw_items`).
        self.source = source

    def add(self, code: ProblemCode, path: str, message: str, keyword: str = "") -> None:
        self.problems.append(Problem(code, path, message, _tag_of(keyword or path.rsplit(".", 1)[-1])))

    def raw(self, ds: _Item, keyword: str, path: str) -> tuple[bool, Any]:
        """(present, value); a value pydicom cannot convert is reported and treated as absent."""
        try:
            if keyword not in ds:
                return False, None
            return True, ds[keyword].value
        except Exception as exc:  # pydicom raises many types for undecodable raw values
            self.add(ProblemCode.WRONG_VR, path, f"value cannot be decoded: {exc}", keyword)
            return False, None

    def text(self, ds: _Item, keyword: str, path: str, required: bool = False) -> str | None:
        """A single string value (CS/LO/SH/DA/TM...), stripped; ``None`` when absent or empty."""
        present, value = self.raw(ds, keyword, path)
        if not present or value is None or value == "":
            if required:
                self.add(ProblemCode.MISSING_ATTRIBUTE, path, f"{keyword} is absent or empty", keyword)
            return None
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("ascii", "replace")
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            # Multi-valued where one value is expected: use the first, say so.
            self.add(ProblemCode.WRONG_VR, path, f"{keyword} has {len(value)} values, expected one", keyword)
            value = value[0] if len(value) else None
            if value is None:
                return None
        if isinstance(value, Sequence) or isinstance(value, Dataset):
            self.add(ProblemCode.WRONG_VR, path, f"{keyword} is a sequence, expected a value", keyword)
            return None
        text = str(value).strip().strip("\x00").strip()
        return text or None

    def uid(self, ds: _Item, keyword: str, path: str, required: bool = True) -> str | None:
        """A UID value; wrong types are dropped, bad syntax is reported but kept (it is what is stored)."""
        present, value = self.raw(ds, keyword, path)
        if not present or value is None or value == "":
            if required:
                code = ProblemCode.EMPTY_ITEM if "[" in path else ProblemCode.MISSING_ATTRIBUTE
                self.add(code, path, f"{keyword} is absent or empty", keyword)
            return None
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str):
            self.add(ProblemCode.WRONG_VR, path, f"{keyword} is {type(value).__name__}, expected a UID",
                     keyword)
            return None
        uid = value.strip().strip("\x00").strip()
        if not uid:
            if required:
                self.add(ProblemCode.MISSING_ATTRIBUTE, path, f"{keyword} is blank", keyword)
            return None
        if len(uid) > 64 or not _UID_RE.match(uid):
            self.add(ProblemCode.INVALID_UID, path, f"{keyword} {uid!r} is not a valid UID", keyword)
        return uid

    def date(self, ds: _Item, keyword: str, path: str, required: bool = False) -> str | None:
        """A DA value as ``YYYYMMDD``; ACR-NEMA style ``YYYY.MM.DD`` is normalised (and reported)."""
        text = self.text(ds, keyword, path, required)
        if text is None:
            return None
        if _DATE_RE.match(text):
            return text
        compact = text.replace(".", "").replace("-", "")
        if _DATE_RE.match(compact):
            self.add(ProblemCode.INVALID_DATE, path, f"{keyword} {text!r} is not YYYYMMDD; read as {compact}")
            return compact
        self.add(ProblemCode.INVALID_DATE, path, f"{keyword} {text!r} is not a date")
        return None

    def seq(self, ds: _Item, keyword: str, path: str, required: bool = False) -> list[_Item]:
        """Items of a sequence that are datasets; absent/empty/wrong-typed sequences are reported."""
        fast = _raw_items(ds, keyword, self.source)
        present, value = (True, fast) if fast is not None else self.raw(ds, keyword, path)
        if not present:
            if required:
                self.add(ProblemCode.MISSING_SEQUENCE, path, f"{keyword} is absent", keyword)
            return []
        if value is None:
            value = []
        if not isinstance(value, (Sequence, list)):
            self.add(ProblemCode.WRONG_VR, path, f"{keyword} is {type(value).__name__}, expected a sequence",
                     keyword)
            return []
        items = [item for item in value if isinstance(item, (Dataset, _RawItem))]
        if len(items) != len(value):
            self.add(ProblemCode.WRONG_VR, path, f"{keyword} holds non-dataset items", keyword)
        if not items and required:
            self.add(ProblemCode.EMPTY_SEQUENCE, path, f"{keyword} has no items", keyword)
        return items

    def ref_uids(self, ds: _Item, keyword: str, path: str, required: bool = False,
                 max_items: int | None = None) -> tuple[str, ...]:
        """ReferencedSOPInstanceUID of every item of a reference sequence (deduplicated, in order)."""
        items = self.seq(ds, keyword, path, required)
        if max_items is not None and len(items) > max_items:
            self.add(ProblemCode.MULTIPLE_ITEMS, path, f"{keyword} has {len(items)} items, at most "
                     f"{max_items} allowed", keyword)
        out: list[str] = []
        for i, item in enumerate(items):
            uid = self.uid(item, "ReferencedSOPInstanceUID", f"{path}[{i}].ReferencedSOPInstanceUID")
            if uid and uid not in out:
                out.append(uid)
        return tuple(out)

    def integer(self, ds: _Item, keyword: str, path: str) -> int | None:
        present, value = self.raw(ds, keyword, path)
        if not present or value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            self.add(ProblemCode.WRONG_VR, path, f"{keyword} {value!r} is not an integer", keyword)
            return None


# ---------------------------------------------------------------------------------------------------
# Kind-specific extractors


def _record(r: _Reader, ds: Dataset, sop_class: str) -> RecordRefs:
    # ReferencedRTPlanSequence is Type 2 in treatment records (may be empty) and holds at most one item.
    plans = r.ref_uids(ds, "ReferencedRTPlanSequence", "ReferencedRTPlanSequence", required=True, max_items=1)
    date = r.date(ds, "TreatmentDate", "TreatmentDate")
    time = r.text(ds, "TreatmentTime", "TreatmentTime")
    source = "TreatmentDate"
    if date is None:
        # TreatmentDate is Type 2: some R&V exports leave it empty. The delivery date is then only in
        # the per-control-point TreatmentControlPointDate of the first delivered beam.
        for seq_kw in ("TreatmentSessionBeamSequence", "TreatmentSessionIonBeamSequence"):
            for beam in r.seq(ds, seq_kw, seq_kw):
                cps = r.seq(beam, "ControlPointDeliverySequence", f"{seq_kw}[].ControlPointDeliverySequence")
                for cp in cps:
                    date = r.date(cp, "TreatmentControlPointDate", "TreatmentControlPointDate")
                    if date:
                        source = "TreatmentControlPointDate"
                        break
                if date:
                    break
            if date:
                break
        if date is None:
            r.add(ProblemCode.MISSING_ATTRIBUTE, "TreatmentDate", "no treatment date (TreatmentDate "
                  "empty and no TreatmentControlPointDate): the record cannot be placed in a window")
        else:
            r.add(ProblemCode.MISSING_ATTRIBUTE, "TreatmentDate",
                  f"TreatmentDate empty; used {source} {date}")
    return RecordRefs(plans, date, time, source, _delivery(r, ds, sop_class))


#: The sequence holding a session's delivered items, by record class (PS3.3 RT Beams / Ion Beams /
#: Brachy Session Record modules). A record of an unknown class is searched for all three.
_SESSION_SEQUENCES = {
    SopClass.RT_BEAMS_TREATMENT_RECORD.value: ("TreatmentSessionBeamSequence",),
    SopClass.RT_ION_BEAMS_TREATMENT_RECORD.value: ("TreatmentSessionIonBeamSequence",),
    SopClass.RT_BRACHY_TREATMENT_RECORD.value: ("TreatmentSessionApplicationSetupSequence",),
}
_ALL_SESSION_SEQUENCES = ("TreatmentSessionBeamSequence", "TreatmentSessionIonBeamSequence",
                          "TreatmentSessionApplicationSetupSequence")
#: TreatmentDeliveryType values of a delivery record (PS3.3 RT Beams / Ion Beams / Brachy Session Record).
_DELIVERY_TYPES = frozenset({"TREATMENT", "CONTINUATION"})


def _delivery(r: _Reader, ds: Dataset, sop_class: str) -> DeliveryFacts:
    """The fraction group and per-item fraction numbers and delivery types of a record."""
    if sop_class == SopClass.RT_TREATMENT_SUMMARY_RECORD.value:
        return DeliveryFacts(summary=True, fraction_group=None)
    group: int | None = None
    for i, item in enumerate(r.seq(ds, "ReferencedRTPlanSequence", "ReferencedRTPlanSequence")):
        group = r.integer(item, "ReferencedFractionGroupNumber",
                          f"ReferencedRTPlanSequence[{i}].ReferencedFractionGroupNumber")
        if group is not None:
            break
    if group is None:
        group = r.integer(ds, "ReferencedFractionGroupNumber", "ReferencedFractionGroupNumber")
    sessions: list[SessionItem] = []
    for seq_kw in _SESSION_SEQUENCES.get(sop_class, _ALL_SESSION_SEQUENCES):
        for i, item in enumerate(r.seq(ds, seq_kw, seq_kw)):
            path = f"{seq_kw}[{i}]"
            kind = r.text(item, "TreatmentDeliveryType", f"{path}.TreatmentDeliveryType")
            if kind is not None:
                kind = kind.upper()
                if kind not in _DELIVERY_TYPES:
                    r.add(ProblemCode.NONSTANDARD_VALUE, f"{path}.TreatmentDeliveryType",
                          f"TreatmentDeliveryType {kind!r} is neither TREATMENT nor CONTINUATION: "
                          "counted as TREATMENT")
            sessions.append(SessionItem(
                r.integer(item, "CurrentFractionNumber", f"{path}.CurrentFractionNumber"), kind,
                r.integer(item, "ReferencedFractionGroupNumber", f"{path}.ReferencedFractionGroupNumber")))
    return DeliveryFacts(summary=False, fraction_group=group, sessions=tuple(sessions))


def _plan(r: _Reader, ds: Dataset, sop_class: str) -> PlanRefs:
    geometry = r.text(ds, "RTPlanGeometry", "RTPlanGeometry")
    # Type 1C (required when RTPlanGeometry is PATIENT); TomoTherapy exports omit it and let the dose
    # reference the structure set instead, so its absence is reported but not fatal.
    ss = r.ref_uids(ds, "ReferencedStructureSetSequence", "ReferencedStructureSetSequence",
                    required=(geometry == "PATIENT"))
    doses = r.ref_uids(ds, "ReferencedDoseSequence", "ReferencedDoseSequence")
    related: list[tuple[str, str | None]] = []
    for i, item in enumerate(r.seq(ds, "ReferencedRTPlanSequence", "ReferencedRTPlanSequence")):
        path = f"ReferencedRTPlanSequence[{i}]"
        uid = r.uid(item, "ReferencedSOPInstanceUID", f"{path}.ReferencedSOPInstanceUID")
        rel = r.text(item, "RTPlanRelationship", f"{path}.RTPlanRelationship", required=True)
        if uid:
            related.append((uid, rel))
    intent = r.text(ds, "PlanIntent", "PlanIntent")
    if intent is not None:
        intent = intent.upper()
    is_ion = sop_class == SopClass.RT_ION_PLAN.value or _has(ds, "IonBeamSequence")
    return PlanRefs(
        structure_set_uids=ss,
        dose_uids=doses,
        related_plans=tuple(related),
        intent=intent,
        label=r.text(ds, "RTPlanLabel", "RTPlanLabel"),
        geometry=geometry,
        is_ion=is_ion,
        plan_date=r.date(ds, "RTPlanDate", "RTPlanDate"),
        fraction_groups=_fraction_groups(r, ds),
    )


def _fraction_groups(r: _Reader, ds: Dataset) -> tuple[tuple[int, int | None], ...]:
    """FractionGroupSequence (RT Fraction Scheme module): each group's number and fractions planned."""
    groups: list[tuple[int, int | None]] = []
    for i, item in enumerate(r.seq(ds, "FractionGroupSequence", "FractionGroupSequence")):
        path = f"FractionGroupSequence[{i}]"
        number = r.integer(item, "FractionGroupNumber", f"{path}.FractionGroupNumber")
        if number is not None:
            groups.append((number, r.integer(item, "NumberOfFractionsPlanned", f"{path}.NumberOfFractionsPlanned")))
    return tuple(groups)


def _has(ds: Dataset, keyword: str) -> bool:
    try:
        return keyword in ds
    except Exception:
        return False


def _structure_set(r: _Reader, ds: Dataset) -> StructureSetRefs:
    fors: list[str] = []
    series: list[SeriesRef] = []
    rfor = "ReferencedFrameOfReferenceSequence"
    frames = r.seq(ds, rfor, rfor, required=True)
    for i, fr in enumerate(frames):
        fpath = f"ReferencedFrameOfReferenceSequence[{i}]"
        for_uid = r.uid(fr, "FrameOfReferenceUID", f"{fpath}.FrameOfReferenceUID")
        if for_uid and for_uid not in fors:
            fors.append(for_uid)
        # RTReferencedStudySequence became optional (Type 3) in later editions: absent is not an error.
        for j, st in enumerate(r.seq(fr, "RTReferencedStudySequence", f"{fpath}.RTReferencedStudySequence")):
            spath = f"{fpath}.RTReferencedStudySequence[{j}]"
            study = r.uid(st, "ReferencedSOPInstanceUID", f"{spath}.ReferencedSOPInstanceUID")
            series_items = r.seq(st, "RTReferencedSeriesSequence", f"{spath}.RTReferencedSeriesSequence",
                                 required=True)
            for k, se in enumerate(series_items):
                sepath = f"{spath}.RTReferencedSeriesSequence[{k}]"
                series_uid = r.uid(se, "SeriesInstanceUID", f"{sepath}.SeriesInstanceUID")
                images = r.ref_uids(se, "ContourImageSequence", f"{sepath}.ContourImageSequence")
                if series_uid and not any(s.series_uid == series_uid for s in series):
                    series.append(SeriesRef(study, series_uid, images))

    roi_numbers: set[int] = set()
    rois = r.seq(ds, "StructureSetROISequence", "StructureSetROISequence", required=True)
    for i, roi in enumerate(rois):
        number = r.integer(roi, "ROINumber", f"StructureSetROISequence[{i}].ROINumber")
        if number is not None:
            roi_numbers.add(number)

    first_uid: str | None = None
    first_roi: int | None = None
    contoured = 0
    contour_images: dict[str, None] = {}
    for i, rc in enumerate(r.seq(ds, "ROIContourSequence", "ROIContourSequence", required=True)):
        path = f"ROIContourSequence[{i}]"
        number = r.integer(rc, "ReferencedROINumber", f"{path}.ReferencedROINumber")
        if number is not None and roi_numbers and number not in roi_numbers:
            r.add(ProblemCode.DANGLING_REFERENCE, f"{path}.ReferencedROINumber",
                  f"ROI {number} is not in StructureSetROISequence", "ReferencedROINumber")
        contours = r.seq(rc, "ContourSequence", f"{path}.ContourSequence")
        if contours:
            contoured += 1
        # The first ROI is often an empty placeholder (e.g. an unused BODY): take the first contour
        # that actually names an image, in ROI then contour order, as the paper's step 5 does. Every
        # other contour image is collected too: validation checks that each one is stored.
        for j, contour in enumerate(contours):
            cpath = f"{path}.ContourSequence[{j}]"
            imgs = r.ref_uids(contour, "ContourImageSequence", f"{cpath}.ContourImageSequence")
            if imgs and first_uid is None:
                first_uid, first_roi = imgs[0], number
            contour_images.update(dict.fromkeys(imgs))
    if first_uid is None:
        r.add(ProblemCode.NO_CONTOURS, "ROIContourSequence",
              "no contour references an image: the planning image cannot be found from the contours")
    elif series and not any(first_uid in s.instance_uids for s in series):
        # Allowed (ContourImageSequence at series level is optional) but worth knowing when debugging.
        r.add(ProblemCode.DANGLING_REFERENCE, "ROIContourSequence",
              f"first contour image {first_uid} is not listed in any RTReferencedSeriesSequence item",
              "ContourImageSequence")
    return StructureSetRefs(tuple(fors), tuple(series), first_uid, first_roi, len(rois), contoured,
                            tuple(contour_images))


def _dose(r: _Reader, ds: Dataset) -> DoseRefs:
    summation = r.text(ds, "DoseSummationType", "DoseSummationType")
    # Type 1C: required unless the dose is a record/multi-plan sum; many TPS fill it anyway.
    plans = r.ref_uids(ds, "ReferencedRTPlanSequence", "ReferencedRTPlanSequence",
                       required=summation not in ("RECORD", "MULTI_PLAN"))
    ss = r.ref_uids(ds, "ReferencedStructureSetSequence", "ReferencedStructureSetSequence")
    return DoseRefs(plans, ss, summation)


def _matrix_type(r: _Reader, item: _Item, seq_kw: str, path: str) -> str | None:
    for i, mreg in enumerate(r.seq(item, seq_kw, f"{path}.{seq_kw}")):
        for j, m in enumerate(r.seq(mreg, "MatrixSequence", f"{path}.{seq_kw}[{i}].MatrixSequence")):
            t = r.text(m, "FrameOfReferenceTransformationMatrixType",
                       f"{path}.{seq_kw}[{i}].MatrixSequence[{j}].FrameOfReferenceTransformationMatrixType")
            if t:
                return t
    return None


def _registration(r: _Reader, ds: Dataset, deformable: bool) -> RegistrationRefs:
    own_for = r.uid(ds, "FrameOfReferenceUID", "FrameOfReferenceUID")
    items: list[RegistrationItem] = []
    if deformable:
        seq_kw, for_kw, matrix_kw = ("DeformableRegistrationSequence", "SourceFrameOfReferenceUID",
                                     "PreDeformationMatrixRegistrationSequence")
    else:
        seq_kw, for_kw, matrix_kw = ("RegistrationSequence", "FrameOfReferenceUID",
                                     "MatrixRegistrationSequence")
    for i, item in enumerate(r.seq(ds, seq_kw, seq_kw, required=True)):
        path = f"{seq_kw}[{i}]"
        for_uid = r.uid(item, for_kw, f"{path}.{for_kw}")
        images = r.ref_uids(item, "ReferencedImageSequence", f"{path}.ReferencedImageSequence")
        items.append(RegistrationItem(for_uid, images, _matrix_type(r, item, matrix_kw, path)))

    series: list[SeriesRef] = []
    own_study = r.uid(ds, "StudyInstanceUID", "StudyInstanceUID", required=False)

    def add_series(study: str | None, items_: list[_Item], path: str) -> None:
        for k, se in enumerate(items_):
            spath = f"{path}[{k}]"
            series_uid = r.uid(se, "SeriesInstanceUID", f"{spath}.SeriesInstanceUID")
            images = r.ref_uids(se, "ReferencedInstanceSequence", f"{spath}.ReferencedInstanceSequence")
            if series_uid and not any(s.series_uid == series_uid for s in series):
                series.append(SeriesRef(study, series_uid, images))

    # Common Instance Reference module: ReferencedSeriesSequence lists series of the REG's own study;
    # series of other studies are under StudiesContainingOtherReferencedInstancesSequence.
    add_series(own_study, r.seq(ds, "ReferencedSeriesSequence", "ReferencedSeriesSequence"),
               "ReferencedSeriesSequence")
    other = "StudiesContainingOtherReferencedInstancesSequence"
    for j, st in enumerate(r.seq(ds, other, other)):
        study = r.uid(st, "StudyInstanceUID", f"{other}[{j}].StudyInstanceUID")
        add_series(study, r.seq(st, "ReferencedSeriesSequence", f"{other}[{j}].ReferencedSeriesSequence"),
                   f"{other}[{j}].ReferencedSeriesSequence")
    if not items and not series:
        r.add(ProblemCode.MISSING_SEQUENCE, seq_kw, "registration references nothing")
    return RegistrationRefs(deformable, own_for, tuple(items), tuple(series))


# ---------------------------------------------------------------------------------------------------
# Public entry points

_KIND_BY_MODALITY = {
    Modality.RTRECORD.value: ObjectKind.RECORD,
    Modality.RTPLAN.value: ObjectKind.PLAN,
    Modality.RTSTRUCT.value: ObjectKind.STRUCTURE_SET,
    Modality.RTDOSE.value: ObjectKind.DOSE,
    Modality.REG.value: ObjectKind.REGISTRATION,
}


def _kind(r: _Reader, sop_class: str, modality: str | None) -> ObjectKind:
    try:
        sop = SopClass(sop_class)
    except ValueError:
        sop = None
    if sop in TREATMENT_RECORD_CLASSES:
        kind = ObjectKind.RECORD
    elif sop in PLAN_CLASSES:
        kind = ObjectKind.PLAN
    elif sop is SopClass.RT_STRUCTURE_SET:
        kind = ObjectKind.STRUCTURE_SET
    elif sop is SopClass.RT_DOSE:
        kind = ObjectKind.DOSE
    elif sop in REGISTRATION_CLASSES:
        kind = ObjectKind.REGISTRATION
    elif sop is not None and modality_of(sop.value) in (Modality.CT, Modality.MR, Modality.PT):
        kind = ObjectKind.IMAGE
    elif sop is not None:
        kind = ObjectKind.OTHER
    else:
        # Unknown or private SOP class: trust Modality (converters sometimes write odd classes).
        if modality in _KIND_BY_MODALITY:
            kind = _KIND_BY_MODALITY[modality]
        elif modality in IMAGE_MODALITIES:
            kind = ObjectKind.IMAGE
        else:
            kind = ObjectKind.OTHER
        r.add(ProblemCode.UNKNOWN_SOP_CLASS, "SOPClassUID",
              f"SOP class {sop_class or '(none)'} not recognised; kind {kind.value} taken from Modality "
              f"{modality or '(none)'}")
        return kind
    expected = modality_of(sop.value) if sop is not None else None
    if expected not in (None, Modality.RAW) and modality is not None and expected is not None \
            and modality != expected.value:
        r.add(ProblemCode.INCONSISTENT, "Modality", f"Modality {modality} does not match SOP class "
              f"{sop.name if sop else sop_class} (expected {expected.value})")
    return kind


def extract(ds: Dataset, source: bytes | None = None) -> ObjectRefs:
    """Reduce a dataset to its identity and outgoing references; never raises.

    Problems found on the way (missing or empty sequences, items without UIDs, wrong VRs, dangling
    internal references) are returned in ``problems``; the references that could be read are kept.
    ``source``: the bytes ``ds`` was read from, if it was read from bytes (large reference sequences are
    then read without loading them through the Dataset).
    """
    r = _Reader(source)
    try:
        return _extract(r, ds)
    except Exception as exc:  # the contract is "never raises": report and degrade
        r.add(ProblemCode.INTERNAL, "", f"extractor failed: {type(exc).__name__}: {exc}")
        sop = ""
        try:
            sop = str(ds.get("SOPInstanceUID", "") or "")
        except Exception:
            pass
        return ObjectRefs(sop, "", None, None, None, None, None, ObjectKind.UNREADABLE,
                          problems=tuple(r.problems))


def _extract(r: _Reader, ds: Dataset) -> ObjectRefs:
    sop_uid = r.uid(ds, "SOPInstanceUID", "SOPInstanceUID") or ""
    sop_class = r.uid(ds, "SOPClassUID", "SOPClassUID") or ""
    modality = r.text(ds, "Modality", "Modality")
    if modality is not None:
        modality = modality.upper()
    kind = _kind(r, sop_class, modality)
    patient_id = r.text(ds, "PatientID", "PatientID")
    study_uid = r.uid(ds, "StudyInstanceUID", "StudyInstanceUID")
    series_uid = r.uid(ds, "SeriesInstanceUID", "SeriesInstanceUID")
    # FoR is required for images; registrations and other RT objects may lack it.
    for_uid = r.uid(ds, "FrameOfReferenceUID", "FrameOfReferenceUID", required=kind is ObjectKind.IMAGE)
    record = plan = structure_set = dose = registration = None
    if kind is ObjectKind.RECORD:
        record = _record(r, ds, sop_class)
    elif kind is ObjectKind.PLAN:
        plan = _plan(r, ds, sop_class)
    elif kind is ObjectKind.STRUCTURE_SET:
        structure_set = _structure_set(r, ds)
    elif kind is ObjectKind.DOSE:
        dose = _dose(r, ds)
    elif kind is ObjectKind.REGISTRATION:
        deformable = sop_class == SopClass.DEFORMABLE_SPATIAL_REGISTRATION.value or (
            sop_class != SopClass.SPATIAL_REGISTRATION.value and _has(ds, "DeformableRegistrationSequence"))
        registration = _registration(r, ds, deformable)
    return ObjectRefs(sop_uid, sop_class, modality, patient_id, study_uid, series_uid, for_uid, kind,
                      record=record, plan=plan, structure_set=structure_set, dose=dose,
                      registration=registration, problems=tuple(r.problems))


class _TrackingBuffer(io.BytesIO):
    """A BytesIO that notices short reads: pydicom silently accepts a stream cut inside an element."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.short_read_at: int | None = None

    def read(self, size: int | None = -1, /) -> bytes:
        pos = self.tell()
        out = super().read(size)
        if size is not None and size > 0 and len(out) < size and self.short_read_at is None:
            # An empty 8-byte read is the normal end of the element stream (next tag header).
            if not (len(out) == 0 and size == 8):
                self.short_read_at = pos
        return out


def _unreadable(message: str, code: ProblemCode = ProblemCode.UNREADABLE) -> ObjectRefs:
    return ObjectRefs("", "", None, None, None, None, None, ObjectKind.UNREADABLE,
                      problems=(Problem(code, "", message),))


def extract_from_bytes(data: bytes) -> ObjectRefs:
    """Parse a DICOM file (Part 10, or a bare dataset) without pixel data and :func:`extract` it.

    Unreadable or truncated input gives problems, never an exception. Bulk values such as pixel data
    are not read (``stop_before_pixels``); large elements are deferred: never loaded, except a large
    reference sequence (a structure set's ROIContourSequence), whose items are then read from ``data``
    one by one (:func:`_raw_items`).
    """
    if not data:
        return _unreadable("empty input")
    image = image_refs_from_bytes(data) if FAST_IMAGES else None
    if image is not None:
        return image
    extra: list[Problem] = []
    for force in (False, True):
        buf = _TrackingBuffer(data)
        try:
            # Warnings (invalid VR values, ...) are raised lazily when values are decoded, so the
            # extraction runs inside the same guard as the parse.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(buf, stop_before_pixels=True, defer_size="64 KB", force=force)
                if force and len(ds) == 0:
                    return _unreadable("not DICOM: no preamble and no parsable data element")
                refs = extract(ds, data)
        except pydicom.errors.InvalidDicomError:
            continue  # no preamble/file meta: retry as a bare dataset (pydicom's rtstruct.dcm is one)
        except Exception as exc:
            return _unreadable(f"cannot parse: {type(exc).__name__}: {exc}")
        if force:
            extra.append(Problem(ProblemCode.NO_FILE_META, "", "no DICOM preamble/file meta: read as a "
                                 "bare dataset"))
        if buf.short_read_at is not None:
            extra.append(Problem(ProblemCode.TRUNCATED, "", f"input ends inside an element (byte "
                                 f"{buf.short_read_at} of {len(data)}): later attributes are missing"))
        seen: set[str] = set()
        for w in caught:
            msg = str(w.message)[:300]
            if msg not in seen:
                seen.add(msg)
                extra.append(Problem(ProblemCode.PARSE_WARNING, "", msg))
        if not refs.sop_uid and not refs.sop_class_uid:
            # Nothing identifies an object (random bytes read with force=True, or a stream cut before
            # the SOP Common attributes): report it as unreadable, with the details found.
            head = Problem(ProblemCode.UNREADABLE, "", "no SOPInstanceUID/SOPClassUID could be read")
            return replace(refs, kind=ObjectKind.UNREADABLE, problems=(head, *extra, *refs.problems))
        return _with_problems(refs, extra)
    return _unreadable("not DICOM (no preamble and not a parsable dataset)")


def _with_problems(refs: ObjectRefs, extra: list[Problem]) -> ObjectRefs:
    if not extra:
        return refs
    return replace(refs, problems=tuple(extra) + refs.problems)



_SOP_INSTANCE_UID_TAG = 0x00080018
_TRANSFER_SYNTAX_UID_TAG = 0x00020010


def _past_file_meta(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _past_sop_instance_uid(tag: int, vr: str | None, length: int) -> bool:
    return tag > _SOP_INSTANCE_UID_TAG


def _dataset_syntax(fp: io.BytesIO) -> UID | None:
    """Read the file meta of a Part 10 file (``fp`` holds the whole file, preamble included) and leave
    ``fp`` at the dataset's first element; its transfer syntax, or ``None`` when there is none or it is
    unknown or deflated (the element generator cannot read such a dataset). May raise on garbage."""
    fp.seek(132)
    syntax: bytes | None = None
    for elem in data_element_generator(fp, False, True, stop_when=_past_file_meta):
        if elem.tag == _TRANSFER_SYNTAX_UID_TAG and isinstance(elem.value, bytes):
            syntax = elem.value
    if syntax is None:
        return None
    ts = UID(syntax.decode("ascii", "replace").strip(" \x00"))
    return ts if ts.is_transfer_syntax and not ts.is_deflated else None


def peek_sop_instance_uid(data: bytes) -> str | None:
    """The dataset's SOPInstanceUID, read without parsing the rest of the header (or ``None``).

    For the C-STORE path, where every microsecond holds up the sender. Data elements are in ascending tag
    order (PS3.5 §7.1), so pydicom's element generator reads the file meta (for the transfer syntax) and
    then the dataset only up to (0008,0018); no :class:`~pydicom.dataset.Dataset` is built, which is most
    of the cost of ``dcmread`` for so few elements (about 1/15 of :func:`extract_from_bytes` for an
    image). The dataset's own attribute is read (the one Orthanc indexes), not the file meta's
    MediaStorageSOPInstanceUID. ``None`` for anything unusual (no preamble or file meta, a deflated or
    unknown transfer syntax, no such attribute, an invalid UID, an unparsable start): the caller then
    reads the whole header, which says what is wrong.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    try:
        fp = io.BytesIO(data)
        ts = _dataset_syntax(fp)
        if ts is None:
            return None
        value: bytes | None = None
        for elem in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian,
                                           stop_when=_past_sop_instance_uid):
            if elem.tag == _SOP_INSTANCE_UID_TAG and isinstance(elem.value, bytes):
                value = elem.value
    except Exception:  # never raises: the full parse explains what is wrong
        return None
    if value is None:
        return None
    uid = value.decode("ascii", "replace").strip().strip("\x00").strip()  # as extract() normalises it
    return uid if uid and len(uid) <= 64 and _UID_RE.match(uid) else None


#: The top-level attributes an image contributes to its references, with their VRs (PS3.6).
_IMAGE_ATTRIBUTES = {
    0x00080016: "UI",  # SOPClassUID
    0x00080018: "UI",  # SOPInstanceUID
    0x00080060: "CS",  # Modality
    0x00100020: "LO",  # PatientID
    0x0020000D: "UI",  # StudyInstanceUID
    0x0020000E: "UI",  # SeriesInstanceUID
    0x00200052: "UI",  # FrameOfReferenceUID
}
#: Where ``dcmread(stop_before_pixels=True)`` stops: (7FE0,0008), (7FE0,0009) and (7FE0,0010).
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

#: One value of printable ASCII (no backslash: that separates values), NUL padding allowed.
_PLAIN_VALUE = re.compile(rb"[\x20-\x5b\x5d-\x7e\x00]*\Z")


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def _clean_text(value: bytes, uid: bool) -> str | None:
    """The value as :func:`extract` would normalise it, or ``None`` when it is anything but one plain
    ASCII value (empty, multi-valued, non-ASCII, an invalid UID): the full parse then says what is wrong."""
    if not _PLAIN_VALUE.match(value):
        return None
    text = value.decode("ascii").strip().strip("\x00").strip()
    if not text:
        return None
    if len(text) > 64 or (uid and not _UID_RE.match(text)):
        return None  # UI and LO hold at most 64 characters (PS3.5 §6.2)
    return text


def image_refs_from_bytes(data: bytes) -> ObjectRefs | None:
    """A CT, MR or PET image's references read straight from its elements, or ``None``.

    An image contributes only its identity and FrameOfReferenceUID, but most of the cost of
    :func:`extract_from_bytes` for an image is building the pydicom :class:`Dataset` of its whole header
    (a hundred elements, each converted and validated when read). Here pydicom's element generator walks
    the same elements ``dcmread(stop_before_pixels=True)`` reads (so a header cut short is still noticed)
    and only the seven attributes :func:`extract` reads for an image are decoded: about a third of the
    cost. It answers only when the answer is certain to equal :func:`extract_from_bytes`'s with no
    problem at all: a Part 10 file with a known, non-deflated transfer syntax; an image storage class
    (CT, MR, PET) whose Modality agrees with it; each attribute present once, with its standard VR, one
    plain ASCII value (a UID valid per PS3.5 §9.1); no pydicom warning; not truncated. Anything else
    (``None``) goes through the full parse, which reports what is wrong.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    values: dict[int, bytes] = {}
    buf = _TrackingBuffer(data)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ts = _dataset_syntax(buf)
            if ts is None:
                return None
            implicit = ts.is_implicit_VR
            for elem in data_element_generator(buf, implicit, ts.is_little_endian, stop_when=_at_pixels):
                vr = _IMAGE_ATTRIBUTES.get(elem.tag)
                if vr is None:
                    continue
                if elem.tag in values or not isinstance(elem.value, bytes) or (not implicit and elem.VR != vr):
                    return None
                values[elem.tag] = elem.value
    except Exception:  # the full parse explains it
        return None
    if caught or buf.short_read_at is not None or len(values) != len(_IMAGE_ATTRIBUTES):
        return None
    text = {tag: _clean_text(values[tag], vr == "UI") for tag, vr in _IMAGE_ATTRIBUTES.items()}
    if any(v is None for v in text.values()):
        return None
    sop_class, modality = str(text[0x00080016]), str(text[0x00080060])
    try:
        expected = modality_of(SopClass(sop_class).value)
    except ValueError:
        return None
    if expected is None or expected.value not in IMAGE_MODALITIES or modality != expected.value:
        return None
    return ObjectRefs(str(text[0x00080018]), sop_class, modality, text[0x00100020], text[0x0020000D],
                      text[0x0020000E], text[0x00200052], ObjectKind.IMAGE)

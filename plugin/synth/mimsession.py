"""Synthetic MIM session objects: Raw Data objects carrying a REG and an RTSTRUCT of the synthetic clinic.

MIM keeps the structure sets and registrations of a session inside a DICOM Raw Data object (SOP class
1.2.840.10008.5.1.4.1.1.66), as items of a private sequence of group 0013. No public sample file exists, so
these fixtures reproduce what open readers (rosamllib's ``DICOMRawReader``) expect, in the three encodings
seen in the field (:class:`SessionEncoding`).

**Assumptions** (no vendor documentation is public):

* The private creator is :data:`MIM_PRIVATE_CREATOR`; the unpacker
  (:mod:`rtharvest.converters.mim`) reads any group-0013 block that holds complete RT datasets, whatever
  its creator's text (one not starting with ``MIM`` gives a warning).
* The session sequence is element ``0x50`` of the creator's block (rosamllib reads ``(0013,2050)``, i.e.
  the block reserved at ``(0013,0020)``). These fixtures reserve block ``0x10`` for another creator (with
  an element at offset ``0x50`` too) and block ``0x20`` for MIM, with a session label before the
  sequence, so a reader must go through the creator.
* The RAW object's Modality is ``RAW`` (not a defined term of PS3.3 C.7.3.1.1.1; sessions arriving with
  another Modality are recognised by their SOP class).
* Embedded items are complete datasets, but lack the Patient and Study attributes other than the UIDs and
  SpecificCharacterSet (the unpacker must copy those from the parent).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence_item
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from rtharvest.core.sopclass import SopClass
from rtharvest.synth import iods
from rtharvest.synth.groundtruth import GroundTruth

#: Private creator written by these fixtures (an assumption: see the module docstring).
MIM_PRIVATE_CREATOR = "MIM Software Inc. Session Meta"
#: Creator of a second private block the fixtures put first in group 0013 (a trap for fixed element numbers).
OTHER_PRIVATE_CREATOR = "RTHARVEST SYNTH OTHER"
#: Block the fixtures reserve, and the offsets of the label and the session sequence within it.
_BLOCK = 0x20
_LABEL_OFFSET = 0x10
_SEQUENCE_OFFSET = 0x50

#: Attributes stripped from embedded items: the unpacker must take them from the parent.
STRIPPED_FROM_ITEMS = (
    "SpecificCharacterSet", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)


class SessionEncoding(StrEnum):
    """How the session sequence is encoded in the Raw Data object."""

    #: Explicit VR Little Endian file, the private element has VR SQ.
    EXPLICIT_SQ = "explicit-sq"
    #: Explicit VR Little Endian file, VR UN with undefined length (its items are implicit VR, PS3.5 6.2.2).
    UN_UNDEFINED_LENGTH = "un-undefined-length"
    #: Implicit VR Little Endian file: the element has no VR (read as UN) and a defined length; its bytes
    #: are the sequence's items.
    IMPLICIT_UN = "implicit-un"


@dataclass(frozen=True)
class SessionFixture:
    """One generated MIM session file and what it carries."""

    raw_uid: str
    patient_id: str
    path: Path
    embedded_uids: tuple[str, ...]
    encoding: SessionEncoding


def _item(source: Dataset) -> Dataset:
    item = copy.deepcopy(source)
    if hasattr(item, "file_meta"):
        del item.file_meta
    for keyword in STRIPPED_FROM_ITEMS:
        if keyword in item:
            delattr(item, keyword)
    return item


def _items_bytes(items: Sequence[Dataset], charset: str) -> bytes:
    """The items of a sequence encoded in Implicit VR Little Endian with defined lengths."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    for item in items:
        write_sequence_item(fp, item, convert_encodings([charset]))
    return fp.getvalue()


def build_session(raw_uid: str, parent_of: Dataset, embedded: Sequence[Dataset], encoding: SessionEncoding,
                  *, session_label: str = "Fusion session") -> Dataset:
    """A Raw Data object for the patient and study of ``parent_of`` carrying ``embedded`` objects.

    The embedded objects are copied and stripped of :data:`STRIPPED_FROM_ITEMS`; their UIDs are kept.
    """
    patient = iods.Patient(str(parent_of.PatientID), str(parent_of.PatientName),
                           str(parent_of.get("PatientBirthDate", "")), str(parent_of.get("PatientSex", "")))
    study = iods.Study(str(parent_of.StudyInstanceUID), str(parent_of.StudyDate), str(parent_of.StudyTime),
                       str(parent_of.get("StudyDescription", "")), str(parent_of.get("StudyID", "")),
                       str(parent_of.get("AccessionNumber", "")))
    series = iods.Series(iods.make_uid("rtharvest-synth-mim", raw_uid, "series"), 900, "RAW", "MIM session",
                         study.date, study.time)
    ds = iods.base_dataset(SopClass.RAW_DATA.value, raw_uid, patient, study, series, instance_number=1,
                           content_date=study.date, content_time=study.time, station="MIM")
    ds.Manufacturer = "MIM Software Inc."
    ds.AcquisitionContextSequence = DicomSequence([])  # Acquisition Context module: Type 2, may be empty
    charset = str(ds.SpecificCharacterSet)
    items = [_item(obj) for obj in embedded]
    # Another vendor's block first, with an element at the session's offset: a reader that assumes a fixed
    # element number, or the first creator of the group, reads the wrong element.
    ds.add_new((0x0013, 0x0010), "LO", OTHER_PRIVATE_CREATOR)
    ds.add_new((0x0013, _BLOCK), "LO", MIM_PRIVATE_CREATOR)
    ds.private_block(0x0013, OTHER_PRIVATE_CREATOR).add_new(_SEQUENCE_OFFSET, "LO", "not a session")
    block = ds.private_block(0x0013, MIM_PRIVATE_CREATOR)
    if block.block_start != _BLOCK << 8:
        raise RuntimeError("the fixture expects the MIM block at (0013,0020)")
    block.add_new(_LABEL_OFFSET, "LO", session_label)
    tag = block.get_tag(_SEQUENCE_OFFSET)
    if encoding is SessionEncoding.EXPLICIT_SQ:
        ds.add(DataElement(tag, "SQ", DicomSequence(items)))
    else:
        elem = DataElement(tag, "UN", _items_bytes(items, charset))
        elem.is_undefined_length = encoding is SessionEncoding.UN_UNDEFINED_LENGTH
        ds.add(elem)
    implicit = encoding is SessionEncoding.IMPLICIT_UN
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def encode_session(ds: Dataset) -> bytes:
    """Part-10 bytes of a session built by :func:`build_session` (in its file meta's transfer syntax)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def clinic_sessions(root: Path, truth: GroundTruth, out_dir: Path,
                    encodings: Sequence[SessionEncoding] = tuple(SessionEncoding)) -> list[SessionFixture]:
    """One MIM session per registration of the clinic: the REG plus the RTSTRUCT of the REG's study (or,
    failing that, of its patient), written under ``out_dir`` as ``<raw uid>.dcm``.

    Encodings are dealt round-robin over the registrations so that every encoding carries a real chain.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    structure_sets = {uid: info for uid, info in truth.objects.items() if info.modality == "RTSTRUCT"
                      and info.patient_id != "QA_PHANTOM"}
    registrations = sorted(uid for uid, info in truth.objects.items() if info.modality == "REG")
    fixtures: list[SessionFixture] = []
    for index, reg_uid in enumerate(registrations):
        reg_info = truth.objects[reg_uid]
        same_study = sorted(u for u, i in structure_sets.items() if i.study_uid == reg_info.study_uid)
        same_patient = sorted(u for u, i in structure_sets.items() if i.patient_id == reg_info.patient_id)
        carried = [reg_uid, *(same_study or same_patient)[:1]]
        datasets = [dcmread(root / truth.objects[uid].path) for uid in carried]
        encoding = encodings[index % len(encodings)]
        raw_uid = iods.make_uid("rtharvest-synth-mim", reg_uid, "session")
        ds = build_session(raw_uid, datasets[0], datasets, encoding)
        path = out_dir / f"{raw_uid}.dcm"
        path.write_bytes(encode_session(ds))
        fixtures.append(SessionFixture(raw_uid, reg_info.patient_id, path, tuple(carried), encoding))
    return fixtures

"""A generated corpus of bad DICOM input (>= 500 variants) and the means to send it into the harvester.

Two families, both derived from real objects of the synthetic clinic so that everything else in them is
plausible:

* **byte-level** variants (truncations at many offsets, corrupted bytes, lying element lengths, random
  garbage, an empty body, a lone preamble): no DICOM association can carry them, so they are uploaded
  with ``POST /instances`` the way a user's script would;
* **dataset-level** variants (wrong SOP classes, missing UIDs, huge and cyclic references, non-ASCII and
  oversized values), sent by C-STORE from a configured source AET, or uploaded over REST when
  pynetdicom refuses to encode them.

Every variant gets its own SOPInstanceUID when it has one, so each arrival is a distinct event.
"""

from __future__ import annotations

import copy
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PLAN_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"
RECORD_CLASS = "1.2.840.10008.5.1.4.1.1.481.7"
STRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class Variant:
    """One bad input: a dataset to C-STORE, or raw bytes to upload."""

    name: str
    dataset: Dataset | None = None
    raw: bytes | None = None

    @property
    def sop_uid(self) -> str | None:
        if self.dataset is None:
            return None
        return str(self.dataset.get("SOPInstanceUID", "") or "") or None


def load_bases(files: list[Path]) -> dict[str, tuple[Dataset, bytes]]:
    """One object per modality of the synthetic clinic (plan, structure set, dose, record, CT...)."""
    bases: dict[str, tuple[Dataset, bytes]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        modality = str(ds.get("Modality", ""))
        if modality not in bases:
            bases[modality] = (ds, path.read_bytes())
    return bases


def _fresh(ds: Dataset) -> Dataset:
    out = copy.deepcopy(ds)
    uid = generate_uid()
    out.SOPInstanceUID = uid
    if getattr(out, "file_meta", None) is not None:
        out.file_meta.MediaStorageSOPInstanceUID = uid
    return out


def _ref_item(uid: str, cls: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = cls
    item.ReferencedSOPInstanceUID = uid
    return item


def _mutations() -> list[tuple[str, Callable[[Dataset], None]]]:
    def set_(keyword: str, value: object) -> Callable[[Dataset], None]:
        return lambda ds: setattr(ds, keyword, value)

    def set_many(*pairs: tuple[str, object]) -> Callable[[Dataset], None]:
        def apply(ds: Dataset) -> None:
            for keyword, value in pairs:  # in order: the character set before the text it governs
                setattr(ds, keyword, value)
        return apply

    def drop(keyword: str) -> Callable[[Dataset], None]:
        return lambda ds: delattr(ds, keyword) if keyword in ds else None

    def huge(keyword: str, n: int, cls: str) -> Callable[[Dataset], None]:
        return lambda ds: setattr(ds, keyword, Sequence([_ref_item(generate_uid(), cls) for _ in range(n)]))

    def self_ref(keyword: str, cls: str) -> Callable[[Dataset], None]:
        return lambda ds: setattr(ds, keyword, Sequence([_ref_item(str(ds.SOPInstanceUID), cls)]))

    def garbage_ref(keyword: str, uid: str, cls: str) -> Callable[[Dataset], None]:
        return lambda ds: setattr(ds, keyword, Sequence([_ref_item(uid, cls)]))

    def nested(depth: int) -> Callable[[Dataset], None]:
        def apply(ds: Dataset) -> None:
            inner = _ref_item(generate_uid(), PLAN_CLASS)
            for _ in range(depth):
                outer = _ref_item(generate_uid(), PLAN_CLASS)
                outer.ReferencedRTPlanSequence = Sequence([inner])
                inner = outer
            ds.ReferencedRTPlanSequence = Sequence([inner])
        return apply

    muts: list[tuple[str, Callable[[Dataset], None]]] = [
        ("wrong class: CT", set_("SOPClassUID", CT_CLASS)),
        ("wrong class: plan", set_("SOPClassUID", PLAN_CLASS)),
        ("wrong class: record", set_("SOPClassUID", RECORD_CLASS)),
        ("wrong class: structure set", set_("SOPClassUID", STRUCT_CLASS)),
        ("modality contradicts class", set_("Modality", "MR")),
        ("unknown modality", set_("Modality", "ZZ")),
        ("no modality", drop("Modality")),
        ("no study UID", drop("StudyInstanceUID")),
        ("no series UID", drop("SeriesInstanceUID")),
        ("no SOP instance UID", drop("SOPInstanceUID")),
        ("no SOP class UID", drop("SOPClassUID")),
        ("no patient ID", drop("PatientID")),
        ("no frame of reference", drop("FrameOfReferenceUID")),
        ("empty study UID", set_("StudyInstanceUID", "")),
        ("empty frame of reference", set_("FrameOfReferenceUID", "")),
        ("letters in study UID", set_("StudyInstanceUID", "1.2.abc.DEF")),
        ("200-character series UID", set_("SeriesInstanceUID", "1." + "2" * 198)),
        ("UID with spaces", set_("FrameOfReferenceUID", "1.2 .3")),
        ("huge plan references (5000 structure sets)",
         huge("ReferencedStructureSetSequence", 5000, STRUCT_CLASS)),
        ("huge dose references (3000)", huge("ReferencedDoseSequence", 3000, "1.2.840.10008.5.1.4.1.1.481.2")),
        ("huge plan list (2000 plans)", huge("ReferencedRTPlanSequence", 2000, PLAN_CLASS)),
        ("self reference (plan)", self_ref("ReferencedRTPlanSequence", PLAN_CLASS)),
        ("self reference (structure set)", self_ref("ReferencedStructureSetSequence", STRUCT_CLASS)),
        ("nested plan references (depth 200)", nested(200)),
        ("reference to garbage UID", garbage_ref("ReferencedRTPlanSequence", "not-a-uid", PLAN_CLASS)),
        ("reference to empty UID", garbage_ref("ReferencedStructureSetSequence", "", STRUCT_CLASS)),
        ("reference with wrong class", garbage_ref("ReferencedRTPlanSequence", "1.2.3.4", CT_CLASS)),
        ("non-ASCII name, no charset", set_("PatientName", "Zoë^Ĳsbrand")),
        ("Japanese name with UTF-8", set_many(("SpecificCharacterSet", "ISO_IR 192"),
                                              ("PatientName", "山田^太郎"))),
        ("emoji in plan label", set_many(("SpecificCharacterSet", "ISO_IR 192"),
                                         ("RTPlanLabel", "🙂plan"))),
        ("unknown character set", set_("SpecificCharacterSet", "ISO_IR 999")),
        ("control characters in LO", set_("StudyDescription", "a\x00b\x07c\x1bd")),
        ("right-to-left text", set_many(("SpecificCharacterSet", "ISO_IR 192"),
                                        ("StudyDescription", "\u202etxet"))),
        ("10 kB study description", set_("StudyDescription", "x" * 10_000)),
        ("1 MB plan label", set_("RTPlanLabel", "L" * 1_000_000)),
        ("1000-character patient ID", set_("PatientID", "P" * 1000)),
        ("backslash in patient ID", set_("PatientID", "A\\B\\C")),
        ("SQL in patient ID", set_("PatientID", "x'); DROP TABLE jobs;--")),
        ("invalid treatment date", set_("TreatmentDate", "20231345")),
        ("words as date", set_("StudyDate", "yesterday")),
        ("plan intent garbage", set_("PlanIntent", "KILL_ALL_HUMANS")),
        ("string where sequence belongs", lambda ds: ds.add_new(0x300C0060, "LO", "not a sequence")),
        ("empty referenced sequence", set_("ReferencedRTPlanSequence", Sequence([]))),
        ("empty item in sequence", set_("ReferencedStructureSetSequence", Sequence([Dataset()]))),
    ]
    return muts


def dataset_variants(bases: dict[str, tuple[Dataset, bytes]]) -> Iterator[Variant]:
    """Every mutation applied to every base object."""
    for modality, (base, _) in sorted(bases.items()):
        for name, mutate in _mutations():
            ds = _fresh(base)
            try:
                mutate(ds)
            except Exception as exc:  # a mutation pydicom itself refuses is still a variant: skip it
                yield Variant(f"{modality}: {name} (pydicom refused: {type(exc).__name__})", raw=b"")
                continue
            yield Variant(f"{modality}: {name}", dataset=ds)


def byte_variants(bases: dict[str, tuple[Dataset, bytes]], rng: random.Random, per_base: int = 30) -> Iterator[Variant]:
    """Truncations, corruptions, lying lengths and garbage (uploaded over REST)."""
    yield Variant("empty body", raw=b"")
    yield Variant("preamble only", raw=b"\0" * 128 + b"DICM")
    yield Variant("text file", raw=b"hello, this is not DICOM\n" * 10)
    yield Variant("JSON body", raw=b'{"SOPInstanceUID": "1.2.3"}')
    for size in (1, 7, 128, 132, 1000, 65536):
        yield Variant(f"{size} random bytes", raw=rng.randbytes(size))
    for modality, (base, data) in sorted(bases.items()):
        ds = _fresh(base)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        good = buf.getvalue()
        for i in range(per_base):
            cut = rng.randrange(1, len(good))
            yield Variant(f"{modality}: truncated at byte {cut} of {len(good)} (#{i})", raw=good[:cut])
        for i in range(per_base // 2):
            bad = bytearray(good)
            for _ in range(rng.randrange(1, 20)):
                bad[rng.randrange(132, len(bad))] = rng.randrange(256)
            yield Variant(f"{modality}: corrupted bytes (#{i})", raw=bytes(bad))
        for i in range(per_base // 3):
            bad = bytearray(good)
            pos = rng.randrange(140, len(bad) - 8)
            bad[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xf0\xff\xff\x7f", b"\x00\x00\x00\x80"])
            yield Variant(f"{modality}: lying element length at {pos} (#{i})", raw=bytes(bad))
        yield Variant(f"{modality}: no preamble", raw=good[132:])
        yield Variant(f"{modality}: doubled", raw=good + good)
        yield Variant(f"{modality}: original bytes, trailing garbage", raw=data + rng.randbytes(100))

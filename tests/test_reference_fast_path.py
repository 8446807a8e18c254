"""Reference sequences read item by item without a pydicom Dataset per item (``references._RawItem``), and
images read from their elements without a Dataset (``references.image_refs_from_bytes``), give exactly what
the Dataset path gives: the same references, the same problems, the same parse warnings, on every object
kind, in every encoding of sequences and items, and on the bad-input corpus."""

from __future__ import annotations

import copy
import io
import random
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from rtharvest.core import references
from rtharvest.core.references import ObjectRefs, extract_from_bytes
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.loader import dicom_files
from tests.reliability.badinput import byte_variants, dataset_variants, load_bases

RT_MODALITIES = ("RTSTRUCT", "REG", "RTPLAN", "RTDOSE", "RTRECORD")


@pytest.fixture(scope="module")
def clinic_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("fast-path") / "clinic"
    generate(out, SynthOptions(patients=2, seed=5, ct_slices=4, matrix=16), overwrite=True)
    return dicom_files(out)


@pytest.fixture(scope="module")
def rt_datasets(clinic_files: list[Path]) -> list[Dataset]:
    out: list[Dataset] = []
    for path in clinic_files:
        ds = pydicom.dcmread(path)
        if str(ds.get("Modality", "")) in RT_MODALITIES:
            out.append(ds)
    assert {str(ds.Modality) for ds in out} == set(RT_MODALITIES)
    return out


def both_ways(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[ObjectRefs, ObjectRefs]:
    with monkeypatch.context() as m:
        m.setattr(references, "FAST_SEQUENCES", False)
        m.setattr(references, "FAST_IMAGES", False)
        slow = extract_from_bytes(data)
    return slow, extract_from_bytes(data)


def _sequences(ds: Dataset) -> Iterator[tuple[pydicom.DataElement, list[Dataset]]]:
    for elem in ds:
        if elem.VR == "SQ":
            yield elem, list(elem.value)
            for item in elem.value:
                yield from _sequences(item)


def encoded(ds: Dataset, syntax: UID, undefined_lengths: bool) -> bytes:
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = syntax
    for elem, items in _sequences(out):
        elem.is_undefined_length = undefined_lengths
        for item in items:
            item.is_undefined_length_sequence_item = undefined_lengths
    buf = io.BytesIO()
    # dcmwrite, not save_as: save_as refuses to change the byte order.
    pydicom.dcmwrite(buf, out, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian,
                     little_endian=syntax != ExplicitVRBigEndian)
    return buf.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("undefined_lengths", [False, True])
def test_every_rt_object_reads_the_same_in_every_encoding(rt_datasets: list[Dataset], syntax: UID,
                                                          undefined_lengths: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for ds in rt_datasets:
        slow, fast = both_ways(encoded(ds, syntax, undefined_lengths), monkeypatch)
        assert fast == slow, (ds.Modality, syntax, undefined_lengths)
        assert fast.sop_uid == ds.SOPInstanceUID and fast.kind.value != "UNREADABLE"


def test_the_fast_path_is_what_reads_a_structure_set_and_a_registration(rt_datasets: list[Dataset]) -> None:
    """Defined-length sequences (as the synthetic clinic and Orthanc write them) are read raw; the check
    above would pass trivially if the fast path were never taken."""
    for modality, keyword in (("RTSTRUCT", "ROIContourSequence"), ("REG", "RegistrationSequence")):
        ds = next(d for d in rt_datasets if d.Modality == modality)
        read = pydicom.dcmread(io.BytesIO(encoded(ds, ExplicitVRLittleEndian, False)), stop_before_pixels=True)
        items = references._raw_items(read, keyword)
        assert items is not None and len(items) == len(ds[keyword].value)
        assert all(isinstance(i, references._RawItem) for i in items)
    # Undefined lengths are read into Datasets by pydicom while the file is parsed: nothing raw is left.
    read = pydicom.dcmread(io.BytesIO(encoded(ds, ExplicitVRLittleEndian, True)), stop_before_pixels=True)
    assert references._raw_items(read, "RegistrationSequence") is None


def test_a_large_structure_set_reads_the_same_and_its_deferred_sequences_raw(rt_datasets: list[Dataset],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A clinical structure set is megabytes of contour points: its ROIContourSequence is longer than the
    parse's defer_size, so pydicom leaves it unread and the fast path takes its bytes from the file."""
    ss = copy.deepcopy(next(d for d in rt_datasets if d.Modality == "RTSTRUCT"))
    for roi in ss.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            contour.ContourData = [12.5, -3.25, 100.0] * 1000
            contour.NumberOfContourPoints = 1000
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        data = encoded(ss, syntax, False)
        assert len(data) > 128 * 1024
        read = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, defer_size="64 KB")
        assert read.get_item("ROIContourSequence", keep_deferred=True).value is None  # deferred
        items = references._raw_items(read, "ROIContourSequence", data)
        assert items is not None and len(items) == len(ss.ROIContourSequence)
        slow, fast = both_ways(data, monkeypatch)
        assert fast == slow and fast.structure_set is not None and fast.structure_set.contour_image_uids


def test_pydicom_test_files_read_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("rtstruct.dcm", "rtplan.dcm", "rtdose.dcm", "CT_small.dcm", "MR_small.dcm",
                 "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_padded.dcm", "MR_small_RLE.dcm",
                 "MR_truncated.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "image_dfl.dcm"):
        data = Path(str(get_testdata_file(name))).read_bytes()
        slow, fast = both_ways(data, monkeypatch)
        assert fast == slow, name
        if name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"):
            assert references.image_refs_from_bytes(data) == slow, name  # clean images: no Dataset built


@pytest.fixture(scope="module")
def images(clinic_files: list[Path]) -> list[Dataset]:
    out: list[Dataset] = [ds for ds in (pydicom.dcmread(p) for p in clinic_files)
                          if str(ds.get("Modality", "")) in ("CT", "MR", "PT")]
    assert {str(ds.Modality) for ds in out} == {"CT", "MR", "PT"}
    return out


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("undefined_lengths", [False, True])
def test_every_image_reads_the_same_in_every_encoding_and_a_clean_one_without_a_dataset(
        images: list[Dataset], syntax: UID, undefined_lengths: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for ds in images:
        data = encoded(ds, syntax, undefined_lengths)
        slow, fast = both_ways(data, monkeypatch)
        assert fast == slow and not slow.problems, (ds.Modality, syntax, undefined_lengths)
        assert references.image_refs_from_bytes(data) == slow  # taken, not fallen back from


def _variant(ds: Dataset, **changes: object) -> bytes:
    out = copy.deepcopy(ds)
    for keyword, value in changes.items():
        if value is None:
            del out[keyword]
        else:
            setattr(out, keyword, value)
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")  # some variants warn when they are encoded
def test_an_image_with_anything_unusual_is_left_to_the_full_parse(images: list[Dataset],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each variant has a problem the full parse reports (or a value only it decodes or normalises): the
    image path declines, and what extract_from_bytes answers is the full parse's answer, problems included."""
    ct = next(ds for ds in images if ds.Modality == "CT")
    clean = _variant(ct)
    variants = {
        "no FoR": _variant(ct, FrameOfReferenceUID=None),
        "empty series": _variant(ct, SeriesInstanceUID=""),
        "invalid UID": _variant(ct, StudyInstanceUID="1.2.03.4"),
        "two patient IDs": _variant(ct, PatientID=["A", "B"]),
        "non-ASCII patient ID": _variant(ct, SpecificCharacterSet="ISO_IR 100", PatientID="Ä1"),
        "modality of another class": _variant(ct, Modality="MR"),
        "lower-case modality": _variant(ct, Modality="ct"),
        "plan class": _variant(ct, SOPClassUID="1.2.840.10008.5.1.4.1.1.481.5"),
        "unknown class": _variant(ct, SOPClassUID="1.2.3.4"),
        "cut in the header": clean[:clean.index(b"\x20\x00\x52\x00") + 20],
        "no file meta": clean[132:],
    }
    for name, data in variants.items():
        assert references.image_refs_from_bytes(data) is None, name
        slow, fast = both_ways(data, monkeypatch)
        assert fast == slow, name
        assert slow.problems or name in ("non-ASCII patient ID", "lower-case modality"), name
    assert references.image_refs_from_bytes(clean) == both_ways(clean, monkeypatch)[0]
    assert both_ways(variants["non-ASCII patient ID"], monkeypatch)[0].patient_id == "Ä1"


@pytest.mark.filterwarnings("ignore::UserWarning")  # the mutations warn when they are encoded
def test_the_bad_input_corpus_gives_the_same_references_and_problems(clinic_files: list[Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    bases = load_bases(clinic_files)
    compared = with_problems = 0
    for variant in dataset_variants(bases):
        if variant.dataset is None:
            continue
        buf = io.BytesIO()
        try:
            variant.dataset.save_as(buf, enforce_file_format=False, implicit_vr=False, little_endian=True)
        except Exception:
            continue  # not encodable: never reaches the parser
        slow, fast = both_ways(buf.getvalue(), monkeypatch)
        assert fast == slow, variant.name
        compared += 1
        with_problems += bool(slow.problems)
    for variant in byte_variants(bases, random.Random(14)):
        assert variant.raw is not None
        slow, fast = both_ways(variant.raw, monkeypatch)
        assert fast == slow, variant.name
        compared += 1
        with_problems += bool(slow.problems)
    assert compared > 400 and with_problems > 200, (compared, with_problems)

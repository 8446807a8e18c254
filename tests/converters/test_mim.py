"""MIM sessions: the RTSTRUCT/REG objects inside Raw Data objects unpack into conformant, resolvable objects.

The sessions are built from the synthetic clinic (:mod:`rtharvest.synth.mimsession`) in the three encodings
of docs/converters-mim.md; each quirk is named in a test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from rtharvest.converters import cli
from rtharvest.converters.mim import (
    MimSessionError,
    is_mim_session,
    unpack,
    unpack_bytes,
    unresolved_references,
)
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.mimsession import (
    MIM_PRIVATE_CREATOR,
    STRIPPED_FROM_ITEMS,
    SessionEncoding,
    SessionFixture,
    build_session,
    clinic_sessions,
    encode_session,
)
from tests.tooling import required_tool


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth, list[SessionFixture]]:
    root = tmp_path_factory.mktemp("mimclinic")
    truth = generate(root, SynthOptions(patients=6, seed=7))
    sessions = clinic_sessions(root, truth, root / "sessions")
    return root, truth, sessions


def _known(truth: GroundTruth) -> set[str]:
    objects = truth.objects.values()
    return set(truth.objects) | {i.series_uid for i in objects} | {i.study_uid for i in objects}


def _dciodvfy_errors(dciodvfy: str, path: Path) -> list[str]:
    result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    if "Information Object Not found" in output:
        errors.append("IOD not recognised")
    return errors


@pytest.mark.parametrize("encoding", list(SessionEncoding))
def test_sessions_unpack_to_conformant_objects_whose_references_resolve(
        clinic: tuple[Path, GroundTruth, list[SessionFixture]], encoding: SessionEncoding, tmp_path: Path) -> None:
    dciodvfy = required_tool("dciodvfy")
    root, truth, sessions = clinic
    mine = [s for s in sessions if s.encoding is encoding]
    assert mine, f"the clinic has a session in encoding {encoding}"
    known = _known(truth)
    for session in mine:
        raw = pydicom.dcmread(session.path)
        result = unpack_bytes(session.path.read_bytes())
        assert not result.errors and not result.skipped and not result.warnings
        assert result.raw_uid == session.raw_uid
        # Embedded UIDs are kept: the unpacked objects are the clinic's REG and RTSTRUCT.
        assert [o.sop_uid for o in result.objects] == list(session.embedded_uids)
        assert [o.modality for o in result.objects] == ["REG", "RTSTRUCT"]
        for obj in result.objects:
            ds = obj.dataset
            original = pydicom.dcmread(root / truth.objects[obj.sop_uid].path)
            assert ds.file_meta.MediaStorageSOPInstanceUID == obj.sop_uid
            assert ds.file_meta.MediaStorageSOPClassUID == original.SOPClassUID
            assert not [e for e in ds if e.tag.group == 0x0013], "the private MIM group is dropped"
            # Attributes the item lacked come from the parent session.
            for keyword in STRIPPED_FROM_ITEMS:
                if keyword in raw:
                    assert ds[keyword].value == raw[keyword].value, keyword
            for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "PatientID"):
                assert ds[keyword].value == original[keyword].value
            assert unresolved_references(ds, known) == [], "every reference names an object of the clinic"
            path = tmp_path / f"{obj.sop_uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert _dciodvfy_errors(dciodvfy, path) == [], f"{obj.modality} from a {encoding} session"


def _latin1_session(encoding: SessionEncoding) -> tuple[Dataset, Dataset]:
    """A session whose parent names the patient in Latin-1 and whose item (without a character set of its
    own) carries a Latin-1 label: the parent's SpecificCharacterSet must decode both."""
    item = Dataset()
    item.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    item.SOPInstanceUID = "2.25.1001"
    item.SeriesInstanceUID = "2.25.1002"
    item.StudyInstanceUID = "2.25.1003"
    item.Modality = "RTSTRUCT"
    item.StructureSetLabel = "Hüfte"
    item.PatientID = "P1"
    parent = Dataset()
    parent.PatientID = "P1"
    parent.PatientName = "MÜLLER^JÖRG"
    parent.StudyInstanceUID = "2.25.1003"
    parent.StudyDate = "20200102"
    parent.StudyTime = "101010"
    raw = build_session("2.25.1000", parent, [item], encoding)
    assert raw.SpecificCharacterSet == "ISO_IR 100"
    return raw, item


@pytest.mark.parametrize("encoding", list(SessionEncoding))
def test_items_without_a_character_set_use_the_parents(encoding: SessionEncoding) -> None:
    raw, _ = _latin1_session(encoding)
    result = unpack_bytes(encode_session(raw))
    (obj,) = result.objects
    assert obj.dataset.SpecificCharacterSet == "ISO_IR 100"
    assert obj.dataset.StructureSetLabel == "Hüfte"
    assert obj.dataset.PatientName == "MÜLLER^JÖRG"
    # Written and read back, the values survive (encoded in the character set the object declares).
    again = unpack_bytes(encode_session(raw)).objects[0].dataset
    out = BytesIO()
    again.save_as(out, enforce_file_format=True)
    reread = pydicom.dcmread(BytesIO(out.getvalue()))
    assert reread.StructureSetLabel == "Hüfte" and reread.PatientName == "MÜLLER^JÖRG"


def test_defined_length_un_holding_a_bare_dataset_is_parsed_as_one() -> None:
    """Quirk: under implicit VR, the defined-length UN's bytes are the embedded dataset itself, no items."""
    raw, item = _latin1_session(SessionEncoding.IMPLICIT_UN)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, item, "latin_1")
    tag = raw.private_block(0x0013, MIM_PRIVATE_CREATOR).get_tag(0x50)
    raw[tag] = DataElement(tag, "UN", fp.getvalue())
    result = unpack_bytes(encode_session(raw))
    assert [o.sop_uid for o in result.objects] == ["2.25.1001"]
    assert result.objects[0].dataset.StructureSetLabel == "Hüfte"


def test_the_block_is_found_through_its_creator_not_a_fixed_element(clinic: tuple[Path, GroundTruth,
                                                                                  list[SessionFixture]]) -> None:
    _, _, sessions = clinic
    raw = pydicom.dcmread(sessions[0].path)
    # The fixture's first block belongs to another creator and holds an element at the session's offset.
    assert raw[0x00130010].value != MIM_PRIVATE_CREATOR and 0x00131050 in raw
    assert len(unpack(raw).objects) == 2
    # The other creator's block (a label at the session's offset) gives nothing and no warning.
    assert unpack(raw).warnings == []


@pytest.mark.parametrize("encoding", list(SessionEncoding))
def test_a_session_under_another_creator_text_is_recognised_by_its_content(
        clinic: tuple[Path, GroundTruth, list[SessionFixture]], encoding: SessionEncoding) -> None:
    """No public document spells MIM's creator: complete RT datasets in a group-0013 block are the evidence."""
    _, _, sessions = clinic
    session = next(s for s in sessions if s.encoding is encoding)
    raw = pydicom.dcmread(BytesIO(session.path.read_bytes()))
    raw[0x00130020].value = "SESSION META 2"
    assert is_mim_session(raw)
    result = unpack(raw)
    assert [o.sop_uid for o in result.objects] == list(session.embedded_uids)
    (warning,) = result.warnings
    assert "'SESSION META 2'" in warning and "(0013,0020)" in warning


def test_a_block_of_partial_datasets_under_another_creator_is_left_alone() -> None:
    """Decoy: items that are not whole RT datasets (no series, or not RT) make no session of a foreign block."""
    parent = Dataset()
    parent.PatientID = "P1"
    parent.PatientName = "TEST^DECOY"
    parent.StudyInstanceUID = "2.25.1003"
    parent.StudyDate = "20200102"
    parent.StudyTime = "101010"
    partial = Dataset()
    partial.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    partial.SOPInstanceUID = "2.25.5001"  # an RTSTRUCT reference without its series: no whole dataset
    picture = Dataset()
    picture.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    picture.SOPInstanceUID = "2.25.5002"
    picture.SeriesInstanceUID = "2.25.5003"
    raw = build_session("2.25.5000", parent, [partial, picture], SessionEncoding.EXPLICIT_SQ)
    raw[0x00130020].value = "VENDOR X INDEX"
    assert not is_mim_session(raw)
    with pytest.raises(MimSessionError, match="not a MIM session") as info:
        unpack(raw)
    assert not info.value.damaged


def test_a_session_whose_sequence_is_noise_is_damaged(clinic: tuple[Path, GroundTruth,
                                                                    list[SessionFixture]]) -> None:
    _, _, sessions = clinic
    raw = pydicom.dcmread(sessions[0].path)
    raw[0x00132050] = DataElement(0x00132050, "UN", b"\x01\x02" * 10)
    with pytest.raises(MimSessionError, match="holds no embedded dataset") as info:
        unpack(raw)
    assert info.value.damaged


def test_non_rt_items_are_skipped_and_damaged_items_reported_without_losing_the_others() -> None:
    raw, item = _latin1_session(SessionEncoding.EXPLICIT_SQ)
    other = Dataset()
    other.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # a secondary capture in the session
    other.SOPInstanceUID = "2.25.2001"
    broken = Dataset()
    broken.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.1"
    broken.SOPInstanceUID = "2.25.3001"  # no SeriesInstanceUID
    raw2 = build_session("2.25.1000", raw, [other, broken, item], SessionEncoding.EXPLICIT_SQ)
    result = unpack_bytes(encode_session(raw2))
    assert [o.sop_uid for o in result.objects] == ["2.25.1001"]
    assert [(s.index, s.reason) for s in result.skipped] == [(0, "not-rtstruct-or-reg")]
    assert [(e.index, e.reason) for e in result.errors] == [(1, "incomplete-item")]


def test_not_a_session() -> None:
    with pytest.raises(MimSessionError, match="not a readable DICOM"):
        unpack_bytes(b"\x00" * 10)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(MimSessionError, match="not Raw Data"):
        unpack(ds)


Session = tuple[Path, GroundTruth, list[SessionFixture]]


def test_cli_unpacks_folders_and_reports_bad_files_per_file(clinic: Session, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root, truth, sessions = clinic
    inbox = tmp_path / "inbox"
    shutil.copytree(root / "sessions", inbox / "sessions")
    (inbox / "garbage.dcm").write_bytes(b"not dicom at all")
    some_ct = next(uid for uid, info in truth.objects.items() if info.modality == "CT")
    shutil.copyfile(root / truth.objects[some_ct].path, inbox / "ct.dcm")
    raw = pydicom.dcmread(sessions[0].path)
    raw[0x00132050] = DataElement(0x00132050, "UN", b"\x01\x02" * 10)  # a session whose sequence is noise
    raw.save_as(inbox / "damaged_session", enforce_file_format=True)
    out = tmp_path / "out"
    code = cli.main(["mim", str(inbox), str(sessions[1].path), "--out", str(out), "--report", str(tmp_path / "r.json"),
                     "--check-references"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    expected = {uid for s in sessions for uid in s.embedded_uids}
    written = {p.stem for p in out.rglob("*.dcm")}
    assert written == expected, "each embedded object once, even when several sessions carry it"
    assert report["Written"] == {
        "REG": sum(1 for u in expected if truth.objects[u].modality == "REG"),
        "RTSTRUCT": sum(1 for u in expected if truth.objects[u].modality == "RTSTRUCT")}
    assert report["ErrorsByReason"] == {"bad-session": 1, "unreadable": 1}
    assert report["SkippedByReason"] == {"not-a-mim-session": 1}
    # Only one CT slice is in the input: the REGs and RTSTRUCTs referencing the others are flagged.
    assert report["UnresolvedReferenceObjects"] == len(expected)
    assert "objects written" in capsys.readouterr().out


def test_cli_nothing_convertible_is_exit_1(tmp_path: Path) -> None:
    (tmp_path / "bad.dcm").write_bytes(b"nope")
    assert cli.main(["mim", str(tmp_path / "bad.dcm"), str(tmp_path / "absent.dcm"), "--out", str(tmp_path / "o")]) == 1


@pytest.mark.servers
def test_cli_sends_the_unpacked_objects_to_an_auxiliary_orthanc(clinic: Session, tmp_path: Path) -> None:
    from rtharvest.edge.launcher import free_port

    from ..servers import RestClient, start_orthanc_source

    root, _, sessions = clinic
    aux = start_orthanc_source(tmp_path / "aux", free_port(), name="AUXPACS", aet="AUXPACS")
    try:
        code = cli.main(["mim", str(root / "sessions"), "--send", f"AUXPACS@127.0.0.1:{aux.port}",
                         "--report", str(tmp_path / "r.json")])
        assert code == 0
        report = json.loads((tmp_path / "r.json").read_text())
        expected = {uid for s in sessions for uid in s.embedded_uids}
        assert report["Sent"] == len(expected)
        assert aux.orthanc is not None
        api = RestClient(aux.orthanc.url, aux.orthanc.credentials)
        found = api.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in found} == expected
    finally:
        aux.stop()


def test_defined_length_un_in_an_explicit_vr_file_is_parsed_too() -> None:
    """Quirk beyond the three encodings: an archive that re-encoded the session as Explicit VR kept the UN's
    defined length (PS3.5 6.2.2: its items stay Implicit VR Little Endian)."""
    from pydicom.uid import ExplicitVRLittleEndian

    raw, _ = _latin1_session(SessionEncoding.IMPLICIT_UN)
    raw.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    reread = pydicom.dcmread(BytesIO(encode_session(raw)))
    assert reread.get_item(0x00132050).VR == "UN"
    (obj,) = unpack(reread).objects
    assert obj.dataset.StructureSetLabel == "Hüfte"

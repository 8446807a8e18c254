"""``rtharvest-convert pinnacle``: multi-patient tars, folders of tars, safe extraction, errors per patient."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from pydicom import dcmread

from rtharvest.converters import cli
from rtharvest.synth.pinnacle import PinnacleCase, write_institution, write_tar


@pytest.fixture(scope="module")
def institution(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small patients (the round-trip tests cover geometry; these cover plumbing)."""
    root = tmp_path_factory.mktemp("pinnacle-cli")
    cases = [
        PinnacleCase("HFS", "16.2", with_dicom=False, with_img=True, number=1),
        PinnacleCase("FFP", "8.0", with_dicom=False, with_img=True, number=2),
        PinnacleCase("HFP", "16.2", with_dicom=True, with_img=False, number=3),
    ]
    write_institution(root / "src", cases)
    return root / "src"


def _members(n: int) -> str:
    return f"Institution_1/Mount_0/Patient_{n}"


def _patient_ids(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in out.rglob("*.dcm"):
        pid = str(dcmread(path, stop_before_pixels=True).PatientID)
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def test_multi_patient_tar_and_a_folder_of_tars_in_one_command(institution: Path, tmp_path: Path) -> None:
    multi = write_tar(tmp_path / "two.tar.gz", institution, [_members(1), _members(2)])
    folder = tmp_path / "tars"
    folder.mkdir()
    write_tar(folder / "p3.tgz", institution, [_members(3)])
    write_tar(folder / "p1.tar", institution, [_members(1)])
    code = cli.main(
        ["pinnacle", str(multi), str(folder), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, report
    assert report["Counts"] == {"archives": 3, "patients": 4, "trials": 12}
    assert report["Errors"] == []
    ids = _patient_ids(tmp_path / "out")
    # Patient 1 arrives twice with the same UIDs: the same files, written once.
    assert set(ids) == {"PIN001HFSNEW", "PIN002FFPOLD", "PIN003HFPNEW"}
    per_patient = 12 + 2 + 3 + 3 + 3 + 4  # CT slices, RTSTRUCTs, RTPLANs, RTDOSEs (beams + sum per trial)
    assert ids["PIN001HFSNEW"] == ids["PIN002FFPOLD"] == per_patient
    assert ids["PIN003HFPNEW"] == per_patient  # the 12 original slices
    assert report["Written"] == {"CT": 48, "RTDOSE": 40, "RTPLAN": 12, "RTSTRUCT": 8}


class Tty(io.StringIO):
    """A terminal, as far as ``isatty`` is concerned (the progress bar draws only on one)."""

    def isatty(self) -> bool:
        return True


def test_progress_moves_per_patient_inside_a_multi_patient_tar(
    institution: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    multi = write_tar(tmp_path / "three.tar", institution, [_members(1), _members(2), _members(3)])
    (tmp_path / "broken.tgz").write_bytes(b"not a tar")
    terminal = Tty()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = cli.main(["pinnacle", str(multi), str(tmp_path / "broken.tgz"), "--out", str(tmp_path / "out")])
    assert code == 0
    # Two sources; opening the tar finds three patients: one step per patient, then one for the bad tar.
    steps = re.findall(r"\rpinnacle patients \[[#.]+\] (\d+)/(\d+)", terminal.getvalue())
    assert steps == [("1", "4"), ("2", "4"), ("3", "4"), ("4", "4")], terminal.getvalue()


def test_institution_and_patient_folders(institution: Path, tmp_path: Path) -> None:
    code = cli.main(
        [
            "pinnacle",
            str(institution / "Institution_1"),
            "--out",
            str(tmp_path / "a"),
            "--trial",
            "Boost",
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["Counts"] == {"patients": 3, "trials": 3}
    assert report["SkippedByReason"] == {"not-selected": 3}
    code = cli.main(["pinnacle", str(institution / _members(2)), "--out", str(tmp_path / "b")])
    assert code == 0 and set(_patient_ids(tmp_path / "b")) == {"PIN002FFPOLD"}


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_malicious_tar_cannot_write_outside_and_the_good_patient_converts(institution: Path, tmp_path: Path) -> None:
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(institution / _members(1), arcname=_members(1))
        _add(tar, "../../escaped.txt")
        _add(tar, "/tmp/rtharvest-absolute-escape.txt")
        _add(tar, "Institution_1/../../../escaped2.txt")
        _add(tar, "link-out", kind=tarfile.SYMTYPE, link="../../../../etc/passwd")
        _add(tar, "abs-link", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "hard-out", kind=tarfile.LNKTYPE, link="../outside")
        _add(tar, "fifo", kind=tarfile.FIFOTYPE)
        # A link that stays inside is materialised as a copy, and does not break anything.
        _add(tar, "Institution_1/Mount_0/Patient_1/Patient.copy", kind=tarfile.SYMTYPE, link="Patient")
    before = {p for p in tmp_path.rglob("*")}
    code = cli.main(
        [
            "pinnacle",
            str(evil),
            "--out",
            str(tmp_path / "out"),
            "--work-dir",
            str(work),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0
    assert report["ErrorsByReason"] == {"unsafe-archive-member": 7}
    assert not Path("/tmp/rtharvest-absolute-escape.txt").exists()
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(tmp_path / "out") or p == tmp_path / "r.json" for p in created), created
    assert not any(p.is_symlink() for p in created)
    assert set(_patient_ids(tmp_path / "out")) == {"PIN001HFSNEW"}
    assert list(work.iterdir()) == []  # the extraction folder is removed


def test_broken_plans_and_patients_are_reported_with_their_position_and_the_batch_goes_on(
    institution: Path, tmp_path: Path
) -> None:
    batch = tmp_path / "Institution_9" / "Mount_0"
    for n in (1, 2, 3):
        shutil.copytree(institution / _members(n), batch / f"Patient_{n}")
    trial = batch / "Patient_2" / "Plan_1" / "plan.Trial"
    lines = trial.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b";", b"", 1)  # a missing ';' on line 4: Plan_1 fails, Plan_0 converts
    trial.write_bytes(b"\n".join(lines))
    patient = batch / "Patient_3" / "Patient"
    patient.write_bytes(patient.read_bytes().replace(b"MedicalRecordNumber", b"Unrelated"))
    (tmp_path / "broken.tar.gz").write_bytes(b"this is not a tar")
    code = cli.main(
        [
            "pinnacle",
            str(tmp_path / "Institution_9"),
            str(tmp_path / "broken.tar.gz"),
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0
    assert report["ErrorsByReason"] == {"bad-archive": 1, "bad-pinnacle-data": 1, "not-found": 1, "syntax-error": 1}
    (error,) = [e for e in report["Errors"] if e["Reason"] == "syntax-error"]
    assert error["Scope"] == "plan" and error["Key"].endswith("Patient_2/Plan_1")
    assert "Patient_2/Plan_1/plan.Trial:5:" in error["Detail"]
    (error,) = [e for e in report["Errors"] if e["Reason"] == "bad-pinnacle-data"]
    assert error["Scope"] == "patient" and "MedicalRecordNumber" in error["Detail"]
    ids = _patient_ids(tmp_path / "out")
    assert set(ids) == {"PIN001HFSNEW", "PIN002FFPOLD"}
    # CT, both plans' structure sets (Plan_1's trials fail, not its ROIs and points), Plan_0's two RTPLANs and doses
    assert ids["PIN002FFPOLD"] == 12 + 2 + 2 + 3 + 3
    (entry,) = [p for p in report["Patients"] if p["Key"].endswith("Patient_2")]
    assert entry["Written"] == {"CT": 12, "RTDOSE": 6, "RTPLAN": 2, "RTSTRUCT": 2}
    (failed,) = entry["FailedPlans"]
    assert failed["Plan"] == "Plan_1" and "Patient_2/Plan_1/plan.Trial:5:" in failed["Detail"]


def test_synth_cli_writes_patients_truth_and_tar(tmp_path: Path) -> None:
    from rtharvest.synth import cli as synth_cli

    assert synth_cli.main(["pinnacle", "--out", str(tmp_path / "src"), "--tar", str(tmp_path / "all.tgz")]) == 0
    truth = json.loads((tmp_path / "src" / "pinnacle_truth.json").read_text())
    assert {(t["orientation"], t["pre9"]) for t in truth} == {
        (o, p) for o in ("HFS", "HFP", "FFS", "FFP") for p in (True, False)
    }
    with tarfile.open(tmp_path / "all.tgz") as tar:
        patients = {m.name for m in tar.getmembers() if m.name.endswith("/Patient")}
    assert len(patients) == len(truth) == 8

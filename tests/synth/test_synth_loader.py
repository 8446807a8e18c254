"""Loading a clinic: dcmqridx storage area, C-STORE to an in-test pynetdicom SCP, and the CLI."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer
from synthclinic import Clinic

from rtharvest.synth.cli import main
from rtharvest.synth.loader import LoadError, dicom_files, index_for_dcmqrscp, store_to_scp
from tests.tooling import required_tool


class _Scp:
    def __init__(self, server: ThreadedAssociationServer) -> None:
        self.server = server
        self.received: list[str] = []
        self.status = 0x0000

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture
def scp() -> Iterator[_Scp]:
    """A Storage SCP on a free loopback port that records what it receives."""
    ae = AE(ae_title="TESTSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 180  # as the loader's: a loaded CI host stalls
    holder: list[_Scp] = []

    def on_store(event: evt.Event) -> int:
        holder[0].received.append(str(event.dataset.SOPInstanceUID))
        return holder[0].status

    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    holder.append(_Scp(server))
    try:
        yield holder[0]
    finally:
        server.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dicom_files_lists_every_object(clinic: Clinic) -> None:
    files = dicom_files(clinic.root)
    assert len(files) == len(clinic.truth.objects)
    assert {p.stem for p in files} == set(clinic.truth.objects)


def test_store_to_scp_sends_everything(clinic: Clinic, scp: _Scp) -> None:
    files = dicom_files(clinic.root)
    count = store_to_scp(files, "127.0.0.1", scp.port, "TESTSCP")
    assert count == len(files)
    # Every object arrives; one may arrive twice when a loaded host drops the association before its
    # response came back (the loader sends it again on a new association: a C-STORE is idempotent).
    assert set(scp.received) == set(clinic.truth.objects)
    assert len(scp.received) - len(files) <= 3  # at most one resend per dropped association (three at most)


def test_store_to_scp_raises_on_failure_status(clinic: Clinic, scp: _Scp) -> None:
    scp.status = 0xA700  # out of resources
    with pytest.raises(LoadError, match="0xA700"):
        store_to_scp(dicom_files(clinic.root)[:3], "127.0.0.1", scp.port, "TESTSCP")


def test_store_to_scp_raises_when_nobody_listens(clinic: Clinic) -> None:
    with pytest.raises(LoadError, match="not established"):
        store_to_scp(dicom_files(clinic.root)[:1], "127.0.0.1", _free_port(), "NOBODY")


def test_index_for_dcmqrscp(clinic: Clinic, tmp_path: Path) -> None:
    required_tool("dcmqridx")
    files = dicom_files(clinic.root)
    storage = tmp_path / "storage"
    assert index_for_dcmqrscp(files, storage) == len(files)
    index = storage / "index.dat"
    assert index.exists() and index.stat().st_size > 0
    assert len(list(storage.glob("*.dcm"))) == len(files)
    # Each record in index.dat holds the file name of the instance it indexes.
    raw = index.read_bytes()
    assert all(str(storage / p.name).encode() in raw for p in files[:20])


def test_cli_generate_and_load(tmp_path: Path, scp: _Scp, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clinic"
    argv = ["generate", "--patients", "2", "--seed", "3", "--out", str(out), "--slices", "2", "--matrix", "16"]
    assert main(argv) == 0
    assert (out / "ground_truth.json").exists()
    assert main(argv) == 1, "refuses to overwrite"
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    files = dicom_files(out)
    assert main(["load", str(out), "--scp", f"127.0.0.1:{scp.port}", "--aet", "TESTSCP"]) == 0
    assert len(scp.received) == len(files)
    required_tool("dcmqridx")
    assert main(["load", str(out), "--dcmqrscp-dir", str(tmp_path / "store")]) == 0
    assert (tmp_path / "store" / "index.dat").exists()
    assert main(["load", str(tmp_path / "nothing"), "--dcmqrscp-dir", str(tmp_path / "s2")]) == 1


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["generate"],
        ["generate", "--out", "x", "--patients", "0"],
        ["load", "d"],
        ["load", "d", "--scp", "nohostport", "--aet", "A"],
        ["load", "d", "--scp", "127.0.0.1:4242"],
        ["load", "d", "--scp", "h:1", "--dcmqrscp-dir", "s"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "dicom").mkdir(parents=True)
    (tmp_path / "d" / "dicom" / "x.dcm").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2

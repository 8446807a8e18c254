"""The pieces every converter shares: deterministic UIDs, sinks (folder and a real C-STORE SCP), CLI, report."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RTPlanStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import RTPlanStorage as RTPlanContext  # type: ignore[attr-defined]

from rtharvest.converters import cli
from rtharvest.converters.report import ConversionReport
from rtharvest.converters.sink import DestinationRefused, FolderSink, Peer, StoreSink, with_file_meta
from rtharvest.converters.uids import derived_uid
from rtharvest.edge.launcher import free_port


def _plan(label: str = "P1") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTPLAN"
    ds.RTPlanLabel = label
    return with_file_meta(ds)


class _StoreSCP:
    """pynetdicom's storage SCP on loopback answering every C-STORE with ``status``."""

    def __init__(self, status: int) -> None:
        self.received: list[str] = []
        self.associations = 0
        self.port = free_port()
        ae = AE(ae_title="AUXPACS")
        ae.add_supported_context(RTPlanContext, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])

        def on_store(event: evt.Event) -> int:
            assert isinstance(event.request, C_STORE)  # the only request an EVT_C_STORE handler sees
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return status

        def on_open(event: evt.Event) -> None:
            self.associations += 1

        server = ae.start_server(("127.0.0.1", self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_REQUESTED, on_open)])
        assert server is not None  # a non-blocking start returns the running server
        self.server = server

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp() -> Iterator[_StoreSCP]:
    server = _StoreSCP(0x0000)
    yield server
    server.stop()


def test_derived_uid_is_deterministic_and_depends_on_every_input() -> None:
    first = derived_uid("site-a", "record", 12, "x")
    assert first == derived_uid("site-a", "record", 12, "x")
    assert first.startswith("2.25.") and len(first) <= 64 and first.is_valid
    others = {derived_uid("site-b", "record", 12, "x"), derived_uid("site-a", "series", 12, "x"),
              derived_uid("site-a", "record", 13, "x"), derived_uid("site-a", "record", None, "x"),
              derived_uid("site-a", "record", "", "x")}
    assert first not in others and len(others) == 5
    with pytest.raises(ValueError, match="salt"):
        derived_uid("", "record", 1)


@pytest.mark.parametrize("text", ["AUX@host", "host:104", "@h:1", "A@h:0", "A@h:x", "A" * 17 + "@h:104"])
def test_peer_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Peer.parse(text)


def test_peer_parse() -> None:
    assert Peer.parse("AUX@10.0.0.1:104") == Peer("AUX", "10.0.0.1", 104)


def test_folder_sink_writes_part10_files_named_by_uid(tmp_path: Path) -> None:
    sink = FolderSink(tmp_path / "out")
    ds = _plan()
    sink.write(ds)
    sink.write(ds)  # a re-run overwrites with the same bytes
    written = list((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 1
    assert written[0].relative_to(tmp_path / "out").parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                                f"{ds.SOPInstanceUID}.dcm")
    assert dcmread(written[0]).RTPlanLabel == "P1"
    copy = FolderSink(tmp_path / "copy")
    copy.write_file(written[0])
    assert next((tmp_path / "copy").rglob("*.dcm")).read_bytes() == written[0].read_bytes()


def test_store_sink_sends_over_one_association(scp: _StoreSCP, tmp_path: Path) -> None:
    sink = StoreSink(Peer("AUXPACS", "127.0.0.1", scp.port))
    plans = [_plan(f"P{i}") for i in range(3)]
    for ds in plans:
        sink.write(ds)
    path = tmp_path / "p.dcm"
    extra = _plan("file")
    extra.save_as(path, enforce_file_format=True)
    sink.write_file(path)
    sink.close()
    assert scp.received == [str(ds.SOPInstanceUID) for ds in plans] + [str(extra.SOPInstanceUID)]
    assert scp.associations == 1
    assert sink.count == 4


class _ImplicitOnlySCP:
    """A receiver like MIM for RT objects: RT Plan accepted in Implicit VR Little Endian only."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str]] = []  # (SOP instance, transfer syntax, RTPlanLabel)
        self.port = free_port()
        ae = AE(ae_title="IMPLICIT")
        ae.add_supported_context(RTPlanContext, [ImplicitVRLittleEndian])

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            self.received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax), str(ds.RTPlanLabel)))
            return 0x0000

        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert server is not None
        self.server = server

    def stop(self) -> None:
        self.server.shutdown()


def test_store_sink_sends_explicit_vr_objects_to_a_receiver_that_accepts_only_implicit_vr(tmp_path: Path) -> None:
    """The sink proposes Explicit and Implicit VR Little Endian and re-encodes into what was accepted."""
    scp = _ImplicitOnlySCP()
    try:
        sink = StoreSink(Peer("IMPLICIT", "127.0.0.1", scp.port))
        ds = _plan("as dataset")
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        sink.write(ds)
        path = tmp_path / "p.dcm"
        extra = _plan("as file")
        extra.save_as(path, enforce_file_format=True)
        sink.write_file(path)
        sink.close()
        assert scp.received == [
            (str(ds.SOPInstanceUID), ImplicitVRLittleEndian, "as dataset"),
            (str(extra.SOPInstanceUID), ImplicitVRLittleEndian, "as file"),
        ]
        assert sink.count == 2
    finally:
        scp.stop()


def test_store_sink_names_a_compressed_syntax_the_receiver_refused() -> None:
    scp = _ImplicitOnlySCP()
    try:
        sink = StoreSink(Peer("IMPLICIT", "127.0.0.1", scp.port))
        ds = _plan()
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # cannot be re-encoded without decoding pixels
        with pytest.raises(DestinationRefused, match="accepted Implicit VR Little Endian .* JPEG Baseline"):
            sink.write(ds)
        sink.close()
        assert scp.received == []
    finally:
        scp.stop()


def test_store_sink_reports_a_refusal() -> None:
    server = _StoreSCP(0xA700)
    try:
        sink = StoreSink(Peer("AUXPACS", "127.0.0.1", server.port))
        with pytest.raises(DestinationRefused, match="0xA700"):
            sink.write(_plan())
        sink.close()
    finally:
        server.stop()


def test_store_sink_unreachable_node() -> None:
    sink = StoreSink(Peer("NOBODY", "127.0.0.1", free_port()), timeout_s=2)
    with pytest.raises(DestinationRefused, match="not established"):
        sink.write(_plan())


def _fake_converter(fail: bool) -> ModuleType:
    module = ModuleType("fake_converter")
    module.HELP = "test converter"  # type: ignore[attr-defined]

    def configure(parser: object) -> None:
        parser.add_argument("--count", type=int, default=2)  # type: ignore[attr-defined]

    def run(args: object, sink: FolderSink, report: ConversionReport) -> None:
        report.counts["patients"] += 1
        report.error("patient", "row 7", "malformed-leaf-blob", "odd byte count")
        if fail:
            return
        for i in range(args.count):  # type: ignore[attr-defined]
            sink.write(_plan(f"P{i}"))
            report.wrote("RTPLAN")

    module.configure = configure  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("fail", [False, True])
def test_cli_summary_report_and_exit_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], fail: bool) -> None:
    module = _fake_converter(fail)
    monkeypatch.setitem(cli.CONVERTERS, "fake", "fake_converter")
    monkeypatch.setattr(cli, "_load", lambda name: module)
    code = cli.main(["fake", "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json"), "--count", "3"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ErrorsByReason"] == {"malformed-leaf-blob": 1}
    assert report["Errors"][0]["Key"] == "row 7"
    if fail:
        assert code == 1 and report["Written"] == {}
    else:
        assert code == 0 and report["Written"] == {"RTPLAN": 3}
        assert len(list((tmp_path / "o").rglob("*.dcm"))) == 3
    assert "errors: 1 malformed-leaf-blob" in capsys.readouterr().out


def test_cli_destination_refused_is_exit_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server = _StoreSCP(0xA700)
    try:
        monkeypatch.setitem(cli.CONVERTERS, "fake", "fake_converter")
        monkeypatch.setattr(cli, "_load", lambda name: _fake_converter(False))
        code = cli.main(["fake", "--send", f"AUXPACS@127.0.0.1:{server.port}", "--report", str(tmp_path / "r.json")])
        report = json.loads((tmp_path / "r.json").read_text())
    finally:
        server.stop()
    assert code == 1 and report["DestinationRefused"] is True


def test_cli_usage_error_names_the_option(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.CONVERTERS, "fake", "fake_converter")
    monkeypatch.setattr(cli, "_load", lambda name: _fake_converter(False))
    with pytest.raises(SystemExit) as exc:
        cli.main(["fake", "--send", "nonsense"])
    assert exc.value.code == 2
    assert "AET@HOST:PORT" in capsys.readouterr().err


def test_progress_is_silent_off_a_terminal(tmp_path: Path) -> None:
    from rtharvest.converters.report import Progress

    with open(tmp_path / "log", "w") as stream:
        bar = Progress(10, "x", stream)
        bar.step(3)
        bar.close()
    assert (tmp_path / "log").read_text() == ""
    assert threading.active_count() >= 1

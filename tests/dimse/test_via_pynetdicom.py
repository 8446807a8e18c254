"""What only PynetdicomBackend does, against the four real sources on loopback and the fault-injection SCP
(what both backends do: test_backend_contract.py).

Moves go to the harvester's AET (``HARVEST``), which every source knows as a move destination; arrival
is checked in the harvester with ``POST /tools/find``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from pydicom.uid import generate_uid

from rtharvest.dimse.base import InstanceKey, QueryLevel, SourceError, SourceErrorKind, Timeouts, sop_lookup_keys
from rtharvest.dimse.via_pynetdicom import CANCEL_GRACE, PynetdicomBackend
from rtharvest.edge.config import Modality

from ..servers import HARVEST_AET, LOCALHOST
from . import ct, rtdose, store, wait_for_arrival
from .conftest import ALL, RELATIONAL
from .fault_scp import Fault, FaultScp


def backend(clinic: Any, name: str, **kw: Any) -> PynetdicomBackend:
    source = clinic.sources[name]
    return PynetdicomBackend(Modality(name, source.aet, LOCALHOST, source.port), HARVEST_AET, **kw)


def fault_backend(scp: FaultScp, **kw: Any) -> PynetdicomBackend:
    return PynetdicomBackend(Modality("FAULT", scp.aet, LOCALHOST, scp.port), HARVEST_AET, **kw)


def image_keys(ds: Any, **extra: Any) -> dict[str, Any]:
    """Hierarchical IMAGE-level keys (what a strict SCP needs)."""
    return {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
            "SOPInstanceUID": ds.SOPInstanceUID, **extra}


@pytest.mark.parametrize("name", RELATIONAL)
def test_image_find_by_sop_uid_with_empty_upper_keys(clinic: Any, name: str) -> None:
    """Relational sources: SOPInstanceUID plus *empty* Study/Series UIDs (return keys) finds the instance."""
    ds = ct(f"PSOP-{name}")
    store(clinic.sources[name], ds)
    answers = backend(clinic, name).find(QueryLevel.IMAGE, sop_lookup_keys(ds.SOPInstanceUID, Modality=""))
    assert [(a["StudyInstanceUID"], a["SeriesInstanceUID"], a["Modality"]) for a in answers] == [
        (ds.StudyInstanceUID, ds.SeriesInstanceUID, "CT")]


@pytest.mark.parametrize(("name", "outcome"), [
    ("ORTHANC_SRC", None),  # Orthanc finds it
    ("DCMQRSCP", 0xC000),  # dcmqrscp needs the upper-level keys present (even empty)
    ("PYNETDICOM", 0xA900),  # so does pynetdicom's qrscp
    ("DCMQRSCP_STRICT", 0xA900),  # and the strict one refuses any non-hierarchical identifier
])
def test_image_find_by_sop_uid_strictly_alone(clinic: Any, name: str, outcome: int | None) -> None:
    ds = ct(f"PALONE-{name}")
    store(clinic.sources[name], ds)
    b = backend(clinic, name)
    if outcome is None:
        assert [a["SOPInstanceUID"] for a in b.find(QueryLevel.IMAGE, {"SOPInstanceUID": ds.SOPInstanceUID})] \
            == [ds.SOPInstanceUID]
        return
    with pytest.raises(SourceError) as caught:
        b.find(QueryLevel.IMAGE, {"SOPInstanceUID": ds.SOPInstanceUID})
    assert caught.value.dimse_status == outcome


def test_strict_source_refuses_empty_upper_keys_too(clinic: Any) -> None:
    ds = ct("PSTRICT")
    store(clinic.sources["DCMQRSCP_STRICT"], ds)
    with pytest.raises(SourceError) as caught:
        backend(clinic, "DCMQRSCP_STRICT").find(QueryLevel.IMAGE, {
            "StudyInstanceUID": "", "SeriesInstanceUID": "", "SOPInstanceUID": ds.SOPInstanceUID})
    assert caught.value.kind is SourceErrorKind.BAD_REQUEST and caught.value.dimse_status == 0xA900
    assert not caught.value.retryable


@pytest.mark.parametrize("name", ALL)
def test_empty_sequence_return_key(clinic: Any, name: str) -> None:
    """``ReferencedRTPlanSequence: []`` on an RTDOSE: only Orthanc returns the sequence (with its items);
    dcmqrscp (both modes) and pynetdicom's qrscp answer the instance without the key."""
    plan_uid = generate_uid()
    dose = rtdose(f"PSEQ-{name}", plan_uid)
    store(clinic.sources[name], dose)
    b = backend(clinic, name)
    assert b.supports_sequence_keys is True
    answers = b.find(QueryLevel.IMAGE, image_keys(dose, ReferencedRTPlanSequence=[]))
    assert [a["SOPInstanceUID"] for a in answers] == [dose.SOPInstanceUID]
    if name == "ORTHANC_SRC":
        assert [item["ReferencedSOPInstanceUID"] for item in answers[0]["ReferencedRTPlanSequence"]] == [plan_uid]
    else:
        assert "ReferencedRTPlanSequence" not in answers[0]


def test_exact_identifier_is_sent(clinic: Any) -> None:
    """The fault SCP records the identifier: our keys and QueryRetrieveLevel, nothing else."""
    with FaultScp() as scp:
        fault_backend(scp).find(QueryLevel.IMAGE, {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3",
                                                  "SOPInstanceUID": ["1.2.3.4", "1.2.3.5"],
                                                  "ReferencedRTPlanSequence": [],
                                                  "ReferencedStructureSetSequence": [{"ReferencedSOPInstanceUID": ""}]})
    (identifier,) = scp.finds
    assert sorted(e.keyword for e in identifier) == sorted([
        "QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ReferencedRTPlanSequence",
        "ReferencedStructureSetSequence"])
    assert identifier.QueryRetrieveLevel == "IMAGE"
    assert list(identifier.SOPInstanceUID) == ["1.2.3.4", "1.2.3.5"]
    assert len(identifier.ReferencedRTPlanSequence) == 0
    assert "ReferencedSOPInstanceUID" in identifier.ReferencedStructureSetSequence[0]


def test_find_answers_are_mapped(clinic: Any) -> None:
    answer = ct("MAPPED")
    answer.QueryRetrieveLevel = "IMAGE"
    answer.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    answer.ReferencedRTPlanSequence = []
    del answer.PixelData
    with FaultScp(Fault(find_answers=[answer, answer])) as scp:
        answers = fault_backend(scp).find(QueryLevel.IMAGE, {"SOPInstanceUID": ""})
    assert len(answers) == 2
    assert answers[0]["SOPInstanceUID"] == answer.SOPInstanceUID
    assert answers[0]["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert answers[0]["Rows"] == "4" and answers[0]["InstanceNumber"] == "1"
    assert answers[0]["ReferencedRTPlanSequence"] == []
    assert answers[0]["PatientName"] == "DIMSE^TEST"


@pytest.mark.parametrize("keys", [[], [InstanceKey("1.2.3", "", "1.2.3.4")], [InstanceKey("", "1.2.3", "1.2.3.4")]])
def test_move_instances_needs_every_unique_key(keys: list[InstanceKey]) -> None:
    with FaultScp() as scp:
        with pytest.raises(SourceError) as caught:
            fault_backend(scp).move_instances(keys)
    assert caught.value.kind is SourceErrorKind.BAD_REQUEST and not caught.value.retryable
    assert scp.connection_times == []  # refused before any association


def test_partial_image_move_continues_and_reports(clinic: Any) -> None:
    """One unknown UID among known ones (Orthanc: 0xC000): the others still move; the error carries counts."""
    name = "ORTHANC_SRC"
    known = ct("PPARTIAL")
    store(clinic.sources[name], known)
    with pytest.raises(SourceError) as caught:
        backend(clinic, name).move(QueryLevel.IMAGE, patient_id=None, study_uid=known.StudyInstanceUID,
                                   series_uid=known.SeriesInstanceUID, sop_uids=[generate_uid(), known.SOPInstanceUID])
    assert caught.value.dimse_status == 0xC000
    assert caught.value.result is not None and caught.value.result.completed == 1
    assert wait_for_arrival(clinic.api, [known.SOPInstanceUID]) == []


# --- network faults --------------------------------------------------------------------------------------

def test_rejected_association_is_refused_permanently() -> None:
    with FaultScp(Fault(reject=True)) as scp:
        with pytest.raises(SourceError) as caught:
            fault_backend(scp).echo()
    assert caught.value.kind is SourceErrorKind.REFUSED
    assert caught.value.retryable is False  # a permanent rejection: the source does not know our AET
    assert "Calling AE title not recognised" in str(caught.value)


def test_silent_listener_times_out_on_association() -> None:
    with socket.socket() as listener:
        listener.bind((LOCALHOST, 0))
        listener.listen()
        b = PynetdicomBackend(Modality("SILENT", "SILENT", LOCALHOST, listener.getsockname()[1]), HARVEST_AET,
                              timeouts=Timeouts(acse=1))
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            b.echo()
    assert caught.value.kind is SourceErrorKind.TIMEOUT and caught.value.retryable
    assert time.monotonic() - started < 4


def test_echo_failure_status() -> None:
    """A C-ECHO answered with a failure status (the statuses of find and move: test_backend_contract.py)."""
    with FaultScp(Fault(echo_status=0xC001)) as scp:
        with pytest.raises(SourceError) as caught:
            fault_backend(scp).echo()
    error = caught.value
    assert (error.kind, error.dimse_status, error.retryable, error.retry_limit) == (
        SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3)
    assert "FAULT" in str(error) and "0xC001" in str(error)


def test_failure_stops_further_moves_when_not_retryable() -> None:
    """0xA801 (destination unknown) would repeat for every UID: the backend stops after the first."""
    with FaultScp(Fault(move_status=0xA801)) as scp:
        with pytest.raises(SourceError):
            fault_backend(scp).move(QueryLevel.IMAGE, patient_id=None, study_uid="1.2", series_uid="1.2.3",
                                    sop_uids=["1.2.3.4", "1.2.3.5", "1.2.3.6"])
    assert len(scp.moves) == 1
    assert scp.move_destinations == [HARVEST_AET]


@pytest.mark.parametrize("operation", ["find", "move"])
def test_timeout_sends_cancel(operation: str) -> None:
    """A slow SCP that honours C-CANCEL: TIMEOUT right after the deadline, and the SCP saw the cancel."""
    with FaultScp(Fault(delay=30)) as scp:
        b = fault_backend(scp)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            if operation == "find":
                b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""}, timeout=1)
            else:
                b.move(QueryLevel.STUDY, patient_id=None, study_uid="1.2.3", timeout=1)
        elapsed = time.monotonic() - started
    assert caught.value.kind is SourceErrorKind.TIMEOUT and caught.value.retryable
    assert "C-CANCEL" in str(caught.value)
    assert scp.cancelled == 1
    assert 0.9 < elapsed < 3, elapsed


def test_timeout_when_cancel_is_ignored() -> None:
    """An SCP that ignores C-CANCEL: the association is aborted CANCEL_GRACE seconds later."""
    with FaultScp(Fault(delay=30, ignore_cancel=True)) as scp:
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            fault_backend(scp).find(QueryLevel.STUDY, {"StudyInstanceUID": ""}, timeout=1)
        elapsed = time.monotonic() - started
    assert caught.value.kind is SourceErrorKind.TIMEOUT
    assert scp.cancelled == 1
    assert 1 + CANCEL_GRACE - 0.5 < elapsed < 1 + CANCEL_GRACE + 3, elapsed


def test_operations_run_concurrently_in_threads(clinic: Any) -> None:
    """Worker threads: a slow source does not hold up finds on another (one association each)."""
    import threading

    ds = ct("PTHREADS")
    store(clinic.sources["DCMQRSCP"], ds)
    results: list[int] = []
    with FaultScp(Fault(delay=3)) as scp:
        slow = threading.Thread(target=lambda: fault_backend(scp).find(QueryLevel.STUDY, {"StudyInstanceUID": ""}))
        slow.start()
        started = time.monotonic()
        for _ in range(3):
            results.append(len(backend(clinic, "DCMQRSCP").find(QueryLevel.STUDY,
                                                                {"StudyInstanceUID": ds.StudyInstanceUID})))
        fast_elapsed = time.monotonic() - started
        slow.join(10)
    assert results == [1, 1, 1]
    assert fast_elapsed < 2.5

"""PynetdicomBackend against the four real sources on loopback and the fault-injection SCP.

Moves go to the harvester's AET (``HARVEST``), which every source knows as a move destination; arrival
is checked in the harvester with ``POST /tools/find``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from pydicom.uid import generate_uid

from rtharvest.config import Modality
from rtharvest.dimse.base import InstanceKey, QueryLevel, SourceError, SourceErrorKind, Timeouts, sop_lookup_keys
from rtharvest.dimse.via_pynetdicom import CANCEL_GRACE, PynetdicomBackend
from rtharvest.launcher import free_port

from ..servers import HARVEST_AET, LOCALHOST
from . import ct, harvester_has, rtdose, store, wait_for_arrival
from .fault_scp import Fault, FaultScp

ALL = ["ORTHANC_SRC", "DCMQRSCP", "DCMQRSCP_STRICT", "PYNETDICOM"]
RELATIONAL = ["ORTHANC_SRC", "DCMQRSCP", "PYNETDICOM"]


def backend(clinic: Any, name: str, **kw: Any) -> PynetdicomBackend:
    source = clinic.sources[name]
    return PynetdicomBackend(Modality(name, source.aet, LOCALHOST, source.port), HARVEST_AET, **kw)


def fault_backend(scp: FaultScp, **kw: Any) -> PynetdicomBackend:
    return PynetdicomBackend(Modality("FAULT", scp.aet, LOCALHOST, scp.port), HARVEST_AET, **kw)


def image_keys(ds: Any, **extra: Any) -> dict[str, Any]:
    """Hierarchical IMAGE-level keys (what a strict SCP needs)."""
    return {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
            "SOPInstanceUID": ds.SOPInstanceUID, **extra}


@pytest.mark.parametrize("name", ALL)
def test_echo(clinic: Any, name: str) -> None:
    backend(clinic, name).echo()


@pytest.mark.parametrize("name", ALL)
def test_find_at_each_level_with_hierarchical_keys(clinic: Any, name: str) -> None:
    ds = ct(f"PFIND-{name}")
    store(clinic.sources[name], ds)
    b = backend(clinic, name)

    patients = b.find(QueryLevel.PATIENT, {"PatientID": ds.PatientID, "PatientName": ""})
    assert [(p["PatientID"], p["PatientName"]) for p in patients] == [(ds.PatientID, "DIMSE^TEST")]

    studies = b.find(QueryLevel.STUDY, {"StudyInstanceUID": ds.StudyInstanceUID, "StudyDate": ""})
    assert [(s["StudyInstanceUID"], s["StudyDate"]) for s in studies] == [(ds.StudyInstanceUID, "20200101")]

    series = b.find(QueryLevel.SERIES, {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": "",
                                        "Modality": ""})
    assert [(s["SeriesInstanceUID"], s["Modality"]) for s in series] == [(ds.SeriesInstanceUID, "CT")]

    images = b.find(QueryLevel.IMAGE, image_keys(ds, InstanceNumber=""))
    assert [(i["SOPInstanceUID"], i["InstanceNumber"]) for i in images] == [(ds.SOPInstanceUID, "1")]
    # Exactly our keys were sent: nobody added AccessionNumber or PatientID to the identifier.
    assert "AccessionNumber" not in images[0] and "PatientID" not in images[0]


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
def test_frame_of_reference_at_image_level(clinic: Any, name: str) -> None:
    """Only Orthanc returns (and matches) FrameOfReferenceUID; the others ignore the key (strict too)."""
    ds = ct(f"PFOR-{name}")
    store(clinic.sources[name], ds)
    b = backend(clinic, name)
    returned = b.find(QueryLevel.IMAGE, image_keys(ds, FrameOfReferenceUID=""))
    wrong = b.find(QueryLevel.IMAGE, image_keys(ds, FrameOfReferenceUID="1.2.3.4"))
    assert len(returned) == 1
    if name == "ORTHANC_SRC":
        assert returned[0]["FrameOfReferenceUID"] == ds.FrameOfReferenceUID
        assert wrong == []
    else:
        assert "FrameOfReferenceUID" not in returned[0]
        assert [a["SOPInstanceUID"] for a in wrong] == [ds.SOPInstanceUID]


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


@pytest.mark.parametrize("name", ALL)
def test_move_instances_and_series(clinic: Any, name: str) -> None:
    first = ct(f"PMOVE-{name}")
    second = ct(f"PMOVE-{name}", first.StudyInstanceUID, first.SeriesInstanceUID, number=2)
    third = ct(f"PMOVE-{name}", first.StudyInstanceUID, first.SeriesInstanceUID, number=3)
    store(clinic.sources[name], first, second, third)
    b = backend(clinic, name)

    result = b.move(QueryLevel.IMAGE, patient_id=first.PatientID, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID, sop_uids=[first.SOPInstanceUID])
    assert (result.status, result.completed, result.failed) == (0, 1, 0)
    assert wait_for_arrival(clinic.api, [first.SOPInstanceUID]) == []
    assert not harvester_has(clinic.api, second.SOPInstanceUID)

    # Two SOP UIDs: one C-MOVE each on one association, counts summed.
    result = b.move(QueryLevel.IMAGE, patient_id=None, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID, sop_uids=[second.SOPInstanceUID, third.SOPInstanceUID])
    assert (result.status, result.completed) == (0, 2)
    assert wait_for_arrival(clinic.api, [second.SOPInstanceUID, third.SOPInstanceUID]) == []

    fourth = ct(f"PMOVE-{name}", first.StudyInstanceUID, first.SeriesInstanceUID, number=4)
    store(clinic.sources[name], fourth)
    result = b.move(QueryLevel.SERIES, patient_id=None, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID)
    assert (result.status, result.completed) == (0, 4)
    assert wait_for_arrival(clinic.api, [fourth.SOPInstanceUID]) == []


def key_of(ds: Any) -> InstanceKey:
    return InstanceKey(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


@pytest.mark.parametrize("name", ALL)
def test_move_instances_of_several_series(clinic: Any, name: str) -> None:
    """Single instances of different studies and series (a patient's treatment records) in one call."""
    first = ct(f"PMANY-{name}")
    other_study = ct(f"PMANY-{name}")
    other_series = ct(f"PMANY-{name}", first.StudyInstanceUID)
    store(clinic.sources[name], first, other_study, other_series)
    wanted = [first, other_study, other_series]
    result = backend(clinic, name).move_instances([key_of(ds) for ds in wanted])
    assert (result.status, result.completed, result.failed) == (0, 3, 0)
    assert wait_for_arrival(clinic.api, [ds.SOPInstanceUID for ds in wanted]) == []


def test_move_instances_share_one_association() -> None:
    keys = [InstanceKey(generate_uid(), generate_uid(), generate_uid()) for _ in range(3)]
    with FaultScp() as scp:
        result = fault_backend(scp).move_instances(keys)
    assert result.status == 0
    assert len(scp.connection_times) == 1
    assert [(m.QueryRetrieveLevel, m.StudyInstanceUID, m.SeriesInstanceUID, m.SOPInstanceUID) for m in scp.moves] \
        == [("IMAGE", k.study_uid, k.series_uid, k.sop_uid) for k in keys]


@pytest.mark.parametrize("keys", [[], [InstanceKey("1.2.3", "", "1.2.3.4")], [InstanceKey("", "1.2.3", "1.2.3.4")]])
def test_move_instances_needs_every_unique_key(keys: list[InstanceKey]) -> None:
    with FaultScp() as scp:
        with pytest.raises(SourceError) as caught:
            fault_backend(scp).move_instances(keys)
    assert caught.value.kind is SourceErrorKind.BAD_REQUEST and not caught.value.retryable
    assert scp.connection_times == []  # refused before any association


@pytest.mark.parametrize("name", ALL)
def test_move_of_unknown_uid(clinic: Any, name: str) -> None:
    """Orthanc: 0xC000 failure. dcmqrscp (both modes) and pynetdicom's qrscp: success with 0 completed."""
    ds = ct(f"PUNKNOWN-{name}")
    store(clinic.sources[name], ds)
    unknown = generate_uid()
    b = backend(clinic, name)

    def move() -> Any:
        return b.move(QueryLevel.IMAGE, patient_id=None, study_uid=ds.StudyInstanceUID,
                      series_uid=ds.SeriesInstanceUID, sop_uids=[unknown])

    if name == "ORTHANC_SRC":
        with pytest.raises(SourceError) as caught:
            move()
        assert (caught.value.kind, caught.value.dimse_status) == (SourceErrorKind.FAILURE_STATUS, 0xC000)
        assert caught.value.retryable and caught.value.retry_limit == 3
        assert caught.value.result is not None and caught.value.result.completed == 0
    else:
        result = move()
        assert (result.status, result.completed, result.failed, result.warning) == (0, 0, 0, 0)
    assert not harvester_has(clinic.api, unknown)


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

def test_unreachable_source_is_fast_and_retryable() -> None:
    b = PynetdicomBackend(Modality("CLOSED", "NOBODY", LOCALHOST, free_port()), HARVEST_AET)
    for operation in (b.echo, lambda: b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""}),
                      lambda: b.move(QueryLevel.STUDY, patient_id=None, study_uid="1.2.3")):
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            operation()
        assert caught.value.kind is SourceErrorKind.UNREACHABLE and caught.value.retryable
        assert "CLOSED" in str(caught.value)
        assert time.monotonic() - started < 2.0


def test_rejected_association_is_refused_permanently() -> None:
    with FaultScp(Fault(reject=True)) as scp:
        with pytest.raises(SourceError) as caught:
            fault_backend(scp).echo()
    assert caught.value.kind is SourceErrorKind.REFUSED
    assert caught.value.retryable is False  # a permanent rejection: the source does not know our AET
    assert "Calling AE title not recognised" in str(caught.value)


def test_aborted_association() -> None:
    with FaultScp(Fault(abort=True)) as scp:
        with pytest.raises(SourceError) as caught:
            fault_backend(scp).find(QueryLevel.STUDY, {"StudyInstanceUID": ""})
    assert caught.value.kind is SourceErrorKind.REFUSED and caught.value.retryable


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


@pytest.mark.parametrize(("fault", "operation", "kind", "status", "retryable", "limit"), [
    (Fault(find_status=0xA702), "find", SourceErrorKind.FAILURE_STATUS, 0xA702, True, None),
    (Fault(find_status=0xC001), "find", SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3),
    (Fault(find_status=0xA900), "find", SourceErrorKind.BAD_REQUEST, 0xA900, False, None),
    (Fault(move_status=0xA702), "move", SourceErrorKind.FAILURE_STATUS, 0xA702, True, None),
    (Fault(move_status=0xC001), "move", SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3),
    (Fault(move_status=0xA801), "move", SourceErrorKind.FAILURE_STATUS, 0xA801, False, None),
    (Fault(echo_status=0xC001), "echo", SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3),
], ids=["find-A702", "find-C001", "find-A900", "move-A702", "move-C001", "move-A801", "echo-C001"])
def test_failure_statuses(fault: Fault, operation: str, kind: SourceErrorKind, status: int, retryable: bool,
                          limit: int | None) -> None:
    with FaultScp(fault) as scp:
        b = fault_backend(scp)
        with pytest.raises(SourceError) as caught:
            if operation == "find":
                b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""})
            elif operation == "move":
                b.move(QueryLevel.SERIES, patient_id=None, study_uid="1.2.3", series_uid="1.2.3.4")
            else:
                b.echo()
    error = caught.value
    assert (error.kind, error.dimse_status, error.retryable, error.retry_limit) == (kind, status, retryable, limit)
    assert "FAULT" in str(error) and f"0x{status:04X}" in str(error)


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

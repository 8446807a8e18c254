"""OrthancRestBackend against real sources through the harvester's REST API, plus LoopbackClient.

The harvester (``clinic.harvester``) drives its own DICOM client; the sources are the session's plain
Orthanc, dcmqrscp (default and strict) and pynetdicom's Q/R SCP. Fault injection uses
:mod:`tests.dimse.fault_scp`, registered in the harvester as the runtime modality ``FAULT``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from rtharvest.dimse.base import InstanceKey, QueryLevel, SourceError, SourceErrorKind, Timeouts
from rtharvest.dimse.via_orthanc import OrthancRestBackend
from rtharvest.launcher import free_port
from rtharvest.loopback import LoopbackClient, LoopbackError

from ..servers import HARVEST_AET, LOCALHOST
from . import ct, harvester_has, loopback_for, store, wait_for_arrival
from .fault_scp import Fault, FaultScp

RELATIONAL = ["ORTHANC_SRC", "DCMQRSCP", "PYNETDICOM"]
ALL = RELATIONAL + ["DCMQRSCP_STRICT"]


@pytest.fixture(scope="module")
def loopback(clinic: Any) -> LoopbackClient:
    return loopback_for(clinic)


def backend(loopback: LoopbackClient, name: str, **kw: Any) -> OrthancRestBackend:
    return OrthancRestBackend(loopback, name, HARVEST_AET, **kw)


@pytest.mark.parametrize("name", ALL)
def test_echo(clinic: Any, loopback: LoopbackClient, name: str) -> None:
    backend(loopback, name).echo()


@pytest.mark.parametrize("name", RELATIONAL)
def test_find_at_each_level(clinic: Any, loopback: LoopbackClient, name: str) -> None:
    ds = ct(f"OFIND-{name}")
    store(clinic.sources[name], ds)
    b = backend(loopback, name)

    patients = b.find(QueryLevel.PATIENT, {"PatientID": ds.PatientID, "PatientName": ""})
    assert [p["PatientID"] for p in patients] == [ds.PatientID]
    assert patients[0]["PatientName"] == "DIMSE^TEST"

    studies = b.find(QueryLevel.STUDY, {"StudyInstanceUID": ds.StudyInstanceUID, "StudyDate": ""})
    assert [(s["StudyInstanceUID"], s["StudyDate"]) for s in studies] == [(ds.StudyInstanceUID, "20200101")]

    series = b.find(QueryLevel.SERIES, {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": "",
                                        "Modality": ""})
    assert [(s["SeriesInstanceUID"], s["Modality"]) for s in series] == [(ds.SeriesInstanceUID, "CT")]

    images = b.find(QueryLevel.IMAGE, {"StudyInstanceUID": ds.StudyInstanceUID,
                                       "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": ""})
    assert [i["SOPInstanceUID"] for i in images] == [ds.SOPInstanceUID]
    # Orthanc's client adds these to every query, so every source echoes them back.
    assert {"PatientID", "AccessionNumber", "SpecificCharacterSet"} <= set(images[0])
    # Multi-valued attributes come back as lists (dictionary VM 1-n), single ones as strings.
    assert images[0]["SpecificCharacterSet"] == ["ISO_IR 100"]


@pytest.mark.parametrize("name", RELATIONAL)
def test_image_find_by_sop_uid_alone(clinic: Any, loopback: LoopbackClient, name: str) -> None:
    """Relational sources find an instance by SOPInstanceUID alone; the answer names its study and series."""
    ds = ct(f"OSOP-{name}")
    store(clinic.sources[name], ds)
    answers = backend(loopback, name).find(QueryLevel.IMAGE, {"SOPInstanceUID": ds.SOPInstanceUID})
    assert len(answers) == 1
    # Orthanc's client adds StudyInstanceUID/SeriesInstanceUID at IMAGE level by itself.
    assert answers[0]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert answers[0]["SeriesInstanceUID"] == ds.SeriesInstanceUID


@pytest.mark.parametrize("name", RELATIONAL)
def test_frame_of_reference_at_image_level(clinic: Any, loopback: LoopbackClient, name: str) -> None:
    """With Normalize false FrameOfReferenceUID is sent; only Orthanc returns and matches it."""
    ds = ct(f"OFOR-{name}")
    store(clinic.sources[name], ds)
    b = backend(loopback, name)
    returned = b.find(QueryLevel.IMAGE, {"SOPInstanceUID": ds.SOPInstanceUID, "FrameOfReferenceUID": ""})
    wrong = b.find(QueryLevel.IMAGE, {"SOPInstanceUID": ds.SOPInstanceUID, "FrameOfReferenceUID": "1.2.3.4"})
    if name == "ORTHANC_SRC":
        assert returned[0]["FrameOfReferenceUID"] == ds.FrameOfReferenceUID
        assert wrong == []  # really matched
    else:
        # dcmqrscp and pynetdicom's qrscp do not know the key: not returned, matching ignored (superset).
        assert "FrameOfReferenceUID" not in returned[0]
        assert [a["SOPInstanceUID"] for a in wrong] == [ds.SOPInstanceUID]


def test_strict_source_refuses_orthanc_queries_below_study(clinic: Any, loopback: LoopbackClient) -> None:
    ds = ct("OSTRICT")
    store(clinic.sources["DCMQRSCP_STRICT"], ds)
    b = backend(loopback, "DCMQRSCP_STRICT")
    for level, keys in [
        (QueryLevel.IMAGE, {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
                            "SOPInstanceUID": ds.SOPInstanceUID}),
        (QueryLevel.SERIES, {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ""}),
    ]:
        with pytest.raises(SourceError) as caught:
            b.find(level, keys)
        assert caught.value.kind is SourceErrorKind.BAD_REQUEST
        assert caught.value.dimse_status == 0xA900
        assert caught.value.retryable is False
        assert "DCMQRSCP_STRICT" in str(caught.value)
    # STUDY level passes (Orthanc's extra keys are study/patient keys there).
    studies = b.find(QueryLevel.STUDY, {"StudyInstanceUID": ds.StudyInstanceUID})
    assert [s["StudyInstanceUID"] for s in studies] == [ds.StudyInstanceUID]


@pytest.mark.parametrize("name", ALL)
def test_move_instances_and_series(clinic: Any, loopback: LoopbackClient, name: str) -> None:
    """IMAGE-level moves of one and of two instances, then the whole series; each verified in the harvester.

    Orthanc's REST move carries exactly the Study/Series/SOP hierarchy, so it works on the strict source.
    """
    first = ct(f"OMOVE-{name}")
    second = ct(f"OMOVE-{name}", first.StudyInstanceUID, first.SeriesInstanceUID, number=2)
    third = ct(f"OMOVE-{name}", first.StudyInstanceUID, first.SeriesInstanceUID, number=3)
    store(clinic.sources[name], first, second, third)
    b = backend(loopback, name)

    result = b.move(QueryLevel.IMAGE, patient_id=first.PatientID, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID, sop_uids=[first.SOPInstanceUID])
    assert result.status == 0 and not result.counts_known  # Orthanc's REST move reports no counts
    assert wait_for_arrival(clinic.api, [first.SOPInstanceUID]) == []
    assert not harvester_has(clinic.api, second.SOPInstanceUID)

    b.move(QueryLevel.IMAGE, patient_id=None, study_uid=first.StudyInstanceUID,
           series_uid=first.SeriesInstanceUID, sop_uids=[second.SOPInstanceUID, third.SOPInstanceUID])
    assert wait_for_arrival(clinic.api, [second.SOPInstanceUID, third.SOPInstanceUID]) == []

    series_only = ct(f"OMOVE-{name}", first.StudyInstanceUID, first.SeriesInstanceUID, number=4)
    store(clinic.sources[name], series_only)
    b.move(QueryLevel.SERIES, patient_id=None, study_uid=first.StudyInstanceUID,
           series_uid=first.SeriesInstanceUID)
    assert wait_for_arrival(clinic.api, [series_only.SOPInstanceUID]) == []


@pytest.mark.parametrize("name", RELATIONAL)
def test_move_of_unknown_uid(clinic: Any, loopback: LoopbackClient, name: str) -> None:
    """Orthanc fails with 0xC000 (HTTP 422); dcmqrscp and pynetdicom's SCP report success, send nothing."""
    ds = ct(f"OUNKNOWN-{name}")
    store(clinic.sources[name], ds)
    unknown = generate_uid()
    b = backend(loopback, name)
    move = lambda: b.move(QueryLevel.IMAGE, patient_id=None, study_uid=ds.StudyInstanceUID,  # noqa: E731
                          series_uid=ds.SeriesInstanceUID, sop_uids=[unknown])
    if name == "ORTHANC_SRC":
        with pytest.raises(SourceError) as caught:
            move()
        assert caught.value.kind is SourceErrorKind.FAILURE_STATUS
        assert caught.value.dimse_status == 0xC000
        assert caught.value.retryable is True and caught.value.retry_limit == 3
    else:
        result = move()
        assert result.status == 0 and not result.counts_known
    # A C-MOVE answers after its last sub-operation: whatever it sent is stored by now, no need to wait.
    assert not harvester_has(clinic.api, unknown)


def test_sequence_keys_are_refused_not_dropped(loopback: LoopbackClient) -> None:
    b = backend(loopback, "ORTHANC_SRC")
    assert b.supports_sequence_keys is False
    with pytest.raises(SourceError) as caught:
        b.find(QueryLevel.IMAGE, {"SOPInstanceUID": "1.2.3", "ReferencedRTPlanSequence": []})
    assert caught.value.kind is SourceErrorKind.BAD_REQUEST and not caught.value.retryable


def test_move_needs_the_hierarchy(loopback: LoopbackClient) -> None:
    with pytest.raises(SourceError) as caught:
        backend(loopback, "ORTHANC_SRC").move(QueryLevel.IMAGE, patient_id=None, study_uid="1.2",
                                              series_uid=None, sop_uids=["1.2.3"])
    assert caught.value.kind is SourceErrorKind.BAD_REQUEST


def test_unknown_modality(loopback: LoopbackClient) -> None:
    with pytest.raises(SourceError) as caught:
        backend(loopback, "NO_SUCH_SOURCE").echo()
    assert caught.value.kind is SourceErrorKind.NOT_FOUND and not caught.value.retryable


# --- runtime modalities: a closed port and the fault SCP -----------------------------------------------

@pytest.fixture
def runtime_modality(clinic: Any) -> Iterator[Callable[[str, int], str]]:
    """Register ``FAULT`` (AET, port) in the harvester for one test; removed afterwards."""
    names: list[str] = []

    def register(aet: str, port: int) -> str:
        status, body = clinic.api.request("PUT", "/modalities/FAULT", {"AET": aet, "Host": LOCALHOST, "Port": port})
        assert status == 200, body
        names.append("FAULT")
        return "FAULT"

    yield register
    for name in names:
        clinic.api.request("DELETE", f"/modalities/{name}")


def test_unreachable_source_is_fast_and_retryable(loopback: LoopbackClient,
                                                  runtime_modality: Callable[[str, int], str]) -> None:
    name = runtime_modality("CLOSED", free_port())
    b = backend(loopback, name)
    for operation in (b.echo,
                      lambda: b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""}),
                      lambda: b.move(QueryLevel.STUDY, patient_id=None, study_uid="1.2.3")):
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            operation()
        assert caught.value.kind is SourceErrorKind.UNREACHABLE
        assert caught.value.retryable is True
        assert time.monotonic() - started < 2.0


def _fault_backend(loopback: LoopbackClient, register: Callable[[str, int], str], scp: FaultScp,
                   **kw: Any) -> OrthancRestBackend:
    return backend(loopback, register(scp.aet, scp.port), **kw)


@pytest.mark.parametrize("name", ALL)
def test_move_instances_of_several_series(clinic: Any, loopback: LoopbackClient, name: str) -> None:
    """Single instances of different studies and series (a patient's treatment records) in one REST call."""
    first = ct(f"OMANY-{name}")
    other_study = ct(f"OMANY-{name}")
    other_series = ct(f"OMANY-{name}", first.StudyInstanceUID)
    wanted = [first, other_study, other_series]
    store(clinic.sources[name], *wanted)
    backend(loopback, name).move_instances(
        [InstanceKey(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in wanted])
    assert wait_for_arrival(clinic.api, [ds.SOPInstanceUID for ds in wanted]) == []


def test_move_instances_share_one_association(loopback: LoopbackClient,
                                              runtime_modality: Callable[[str, int], str]) -> None:
    """Orthanc's move job keeps one association for all the resources of a call."""
    keys = [InstanceKey(generate_uid(), generate_uid(), generate_uid()) for _ in range(3)]
    with FaultScp() as scp:
        _fault_backend(loopback, runtime_modality, scp).move_instances(keys)
    assert len(scp.connection_times) == 1
    assert [(m.QueryRetrieveLevel, m.StudyInstanceUID, m.SeriesInstanceUID, m.SOPInstanceUID) for m in scp.moves] \
        == [("IMAGE", k.study_uid, k.series_uid, k.sop_uid) for k in keys]


def test_rejected_association(loopback: LoopbackClient, runtime_modality: Callable[[str, int], str]) -> None:
    with FaultScp(Fault(reject=True)) as scp:
        b = _fault_backend(loopback, runtime_modality, scp)
        with pytest.raises(SourceError) as caught:
            b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""})
    assert caught.value.kind is SourceErrorKind.REFUSED and caught.value.retryable


def test_aborted_association(loopback: LoopbackClient, runtime_modality: Callable[[str, int], str]) -> None:
    with FaultScp(Fault(abort=True)) as scp:
        b = _fault_backend(loopback, runtime_modality, scp)
        with pytest.raises(SourceError) as caught:
            b.move(QueryLevel.STUDY, patient_id=None, study_uid="1.2.3")
    assert caught.value.kind is SourceErrorKind.REFUSED


@pytest.mark.parametrize(("fault", "operation", "kind", "status", "retryable", "limit"), [
    (Fault(find_status=0xA702), "find", SourceErrorKind.FAILURE_STATUS, 0xA702, True, None),
    (Fault(find_status=0xC001), "find", SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3),
    (Fault(find_status=0xA900), "find", SourceErrorKind.BAD_REQUEST, 0xA900, False, None),
    (Fault(move_status=0xA702), "move", SourceErrorKind.FAILURE_STATUS, 0xA702, True, None),
    (Fault(move_status=0xC001), "move", SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3),
    (Fault(move_status=0xA801), "move", SourceErrorKind.FAILURE_STATUS, 0xA801, False, None),
], ids=["find-A702", "find-C001", "find-A900", "move-A702", "move-C001", "move-A801"])
def test_failure_statuses(loopback: LoopbackClient, runtime_modality: Callable[[str, int], str], fault: Fault,
                          operation: str, kind: SourceErrorKind, status: int, retryable: bool,
                          limit: int | None) -> None:
    with FaultScp(fault) as scp:
        b = _fault_backend(loopback, runtime_modality, scp)
        with pytest.raises(SourceError) as caught:
            if operation == "find":
                b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""})
            else:
                b.move(QueryLevel.SERIES, patient_id=None, study_uid="1.2.3", series_uid="1.2.3.4")
    error = caught.value
    assert (error.kind, error.dimse_status, error.retryable, error.retry_limit) == (kind, status, retryable, limit)


def test_find_timeout(loopback: LoopbackClient, runtime_modality: Callable[[str, int], str]) -> None:
    """A silent source: Orthanc gives up after its DIMSE timeout; we ask for ~2 s and get TIMEOUT."""
    with FaultScp(Fault(delay=30)) as scp:
        b = _fault_backend(loopback, runtime_modality, scp)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""}, timeout=2)
        elapsed = time.monotonic() - started
    assert caught.value.kind is SourceErrorKind.TIMEOUT and caught.value.retryable
    assert 1.5 < elapsed < 6, elapsed


# --- LoopbackClient --------------------------------------------------------------------------------------

def test_loopback_instance_helpers(clinic: Any, loopback: LoopbackClient) -> None:
    ds = ct("LOOPBACK")
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    status, body = clinic.api.request("POST", "/instances", raw=buffer.getvalue(),
                                      headers={"Content-Type": "application/dicom"})
    assert status == 200, body
    orthanc_id = loopback.find_instance(ds.SOPInstanceUID)
    assert orthanc_id is not None and orthanc_id == body["ID"]
    assert loopback.instance_exists(ds.SOPInstanceUID)
    assert not loopback.instance_exists(generate_uid())
    assert loopback.find_instance(ds.StudyInstanceUID) is None  # a study UID is not an instance

    data = loopback.get_instance_file(orthanc_id)
    assert data[128:132] == b"DICM"
    assert ds.SOPInstanceUID.encode() in data

    loopback.set_metadata(orthanc_id, "HarvestSource", "ORTHANC_SRC")
    assert loopback.get_metadata(orthanc_id, "HarvestSource") == "ORTHANC_SRC"
    assert loopback.get_metadata(orthanc_id, "HarvestHop") is None

    loopback.delete_instance(orthanc_id)
    assert not loopback.instance_exists(ds.SOPInstanceUID)
    loopback.delete_instance(orthanc_id)  # already gone: not an error


def test_loopback_errors(clinic: Any, loopback: LoopbackClient) -> None:
    with pytest.raises(LoopbackError) as caught:
        loopback.get("/instances/does-not-exist")
    assert caught.value.status == 404 and "does-not-exist" in str(caught.value)

    anonymous = LoopbackClient(clinic.harvester.url, None)
    with pytest.raises(LoopbackError) as caught:
        anonymous.get("/system")
    assert caught.value.status == 401

    closed = LoopbackClient(f"http://{LOCALHOST}:{free_port()}", None, timeout=2)
    with pytest.raises(LoopbackError) as caught:
        closed.get("/system")
    assert caught.value.status == 0 and not caught.value.timed_out


def test_loopback_failure_becomes_source_error(clinic: Any) -> None:
    """The harvester's REST API itself unreachable: PROTOCOL (not blamed on the source), retryable."""
    b = OrthancRestBackend(LoopbackClient(f"http://{LOCALHOST}:{free_port()}", None), "ORTHANC_SRC", HARVEST_AET,
                           timeouts=Timeouts(echo=1))
    with pytest.raises(SourceError) as caught:
        b.echo()
    assert caught.value.kind is SourceErrorKind.PROTOCOL and caught.value.retryable

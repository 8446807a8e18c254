"""What only OrthancRestBackend does, against real sources through the harvester's REST API, plus
LoopbackClient (what both backends do: test_backend_contract.py).

The harvester (``clinic.harvester``) drives its own DICOM client; the sources are the session's plain
Orthanc, dcmqrscp (default and strict) and pynetdicom's Q/R SCP. Fault injection uses
:mod:`tests.dimse.fault_scp`, registered in the harvester as the runtime modality ``FAULT``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from rtharvest.dimse.base import QueryLevel, SourceError, SourceErrorKind, Timeouts
from rtharvest.dimse.via_orthanc import OrthancRestBackend
from rtharvest.edge.launcher import free_port
from rtharvest.edge.loopback import LoopbackClient, LoopbackError

from ..servers import HARVEST_AET, LOCALHOST
from . import ct, store
from .conftest import RELATIONAL
from .fault_scp import Fault, FaultScp


def backend(loopback: LoopbackClient, name: str, **kw: Any) -> OrthancRestBackend:
    return OrthancRestBackend(loopback, name, HARVEST_AET, **kw)


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


# --- the fault SCP as a runtime modality of the harvester ------------------------------------------------

def _fault_backend(loopback: LoopbackClient, register: Callable[[str, int], str], scp: FaultScp,
                   **kw: Any) -> OrthancRestBackend:
    return backend(loopback, register(scp.aet, scp.port), **kw)


def test_rejected_association(loopback: LoopbackClient, runtime_modality: Callable[[str, int], str]) -> None:
    with FaultScp(Fault(reject=True)) as scp:
        b = _fault_backend(loopback, runtime_modality, scp)
        with pytest.raises(SourceError) as caught:
            b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""})
    assert caught.value.kind is SourceErrorKind.REFUSED and caught.value.retryable


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

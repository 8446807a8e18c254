"""The :class:`~rtharvest.dimse.base.SourceBackend` contract, run through both backends (``via``): Orthanc's
REST client (through the harvester, the default) and pynetdicom (the harvester's own association).

Each case runs against the real session sources (plain Orthanc, dcmqrscp default and strict, pynetdicom's
Q/R SCP) or :mod:`tests.dimse.fault_scp`; moves go to the harvester's AET and arrival is checked in the
harvester. Where the backends differ by design (what the identifier carries, whether a move reports its
counts, which sources take a query below STUDY level), the case says so; behaviour only one backend has is
tested in ``test_via_orthanc.py`` and ``test_via_pynetdicom.py``.
"""

from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from rtharvest.dimse.base import InstanceKey, MoveResult, QueryLevel, SourceError, SourceErrorKind

from . import ct, harvester_has, store, wait_for_arrival
from .conftest import ALL, BACKENDS, RELATIONAL, Via
from .fault_scp import Fault, FaultScp

#: (backend, source) pairs: Orthanc's client adds keys a strict source refuses below STUDY level, so its
#: queries there run on the relational sources only (the refusal: test_via_orthanc.py).
QUERIES = [("orthanc", name) for name in RELATIONAL] + [("pynetdicom", name) for name in ALL]
#: Echo and moves carry a clean hierarchy with either backend: every source.
EVERY = [(kind, name) for kind in BACKENDS for name in ALL]


def image_keys(ds: Dataset, **extra: object) -> dict[str, object]:
    """Hierarchical IMAGE-level keys (what a strict SCP needs)."""
    return {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
            "SOPInstanceUID": ds.SOPInstanceUID, **extra}


@pytest.mark.parametrize(("via", "name"), EVERY, indirect=["via"])
def test_echo(via: Via, name: str) -> None:
    via.source(name).echo()


@pytest.mark.parametrize(("via", "name"), QUERIES, indirect=["via"])
def test_find_at_each_level(via: Via, name: str) -> None:
    ds = ct(f"FIND-{via.kind}-{name}")
    store(via.clinic.sources[name], ds)
    b = via.source(name)

    patients = b.find(QueryLevel.PATIENT, {"PatientID": ds.PatientID, "PatientName": ""})
    assert [(p["PatientID"], p["PatientName"]) for p in patients] == [(ds.PatientID, "DIMSE^TEST")]

    studies = b.find(QueryLevel.STUDY, {"StudyInstanceUID": ds.StudyInstanceUID, "StudyDate": ""})
    assert [(s["StudyInstanceUID"], s["StudyDate"]) for s in studies] == [(ds.StudyInstanceUID, "20200101")]

    series = b.find(QueryLevel.SERIES, {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": "",
                                        "Modality": ""})
    assert [(s["SeriesInstanceUID"], s["Modality"]) for s in series] == [(ds.SeriesInstanceUID, "CT")]

    images = b.find(QueryLevel.IMAGE, image_keys(ds, InstanceNumber=""))
    assert [(i["SOPInstanceUID"], i["InstanceNumber"]) for i in images] == [(ds.SOPInstanceUID, "1")]
    if via.kind == "orthanc":
        # Orthanc's client adds these to every query, so every source echoes them back.
        assert {"PatientID", "AccessionNumber", "SpecificCharacterSet"} <= set(images[0])
        # Multi-valued attributes come back as lists (dictionary VM 1-n), single ones as strings.
        assert images[0]["SpecificCharacterSet"] == ["ISO_IR 100"]
    else:
        # Exactly our keys were sent: nobody added AccessionNumber or PatientID to the identifier.
        assert "AccessionNumber" not in images[0] and "PatientID" not in images[0]


@pytest.mark.parametrize(("via", "name"), QUERIES, indirect=["via"])
def test_frame_of_reference_at_image_level(via: Via, name: str) -> None:
    """Only Orthanc returns (and matches) FrameOfReferenceUID; the others ignore the key (strict too)."""
    ds = ct(f"FOR-{via.kind}-{name}")
    store(via.clinic.sources[name], ds)
    b = via.source(name)
    # Orthanc's client completes the hierarchy of a SOP UID by itself (with Normalize false the key is sent).
    keys = {"SOPInstanceUID": ds.SOPInstanceUID} if via.kind == "orthanc" else image_keys(ds)
    returned = b.find(QueryLevel.IMAGE, {**keys, "FrameOfReferenceUID": ""})
    wrong = b.find(QueryLevel.IMAGE, {**keys, "FrameOfReferenceUID": "1.2.3.4"})
    assert len(returned) == 1
    if name == "ORTHANC_SRC":
        assert returned[0]["FrameOfReferenceUID"] == ds.FrameOfReferenceUID
        assert wrong == []  # really matched
    else:
        # dcmqrscp and pynetdicom's qrscp do not know the key: not returned, matching ignored (superset).
        assert "FrameOfReferenceUID" not in returned[0]
        assert [a["SOPInstanceUID"] for a in wrong] == [ds.SOPInstanceUID]


@pytest.mark.parametrize(("via", "name"), EVERY, indirect=["via"])
def test_move_instances_and_series(via: Via, name: str) -> None:
    """IMAGE-level moves of one and of two instances, then the whole series; each verified in the harvester.

    Both backends send exactly the Study/Series/SOP hierarchy, so moves work on the strict source too."""
    first = ct(f"MOVE-{via.kind}-{name}")
    second = ct(first.PatientID, first.StudyInstanceUID, first.SeriesInstanceUID, number=2)
    third = ct(first.PatientID, first.StudyInstanceUID, first.SeriesInstanceUID, number=3)
    store(via.clinic.sources[name], first, second, third)
    b = via.source(name)
    api = via.clinic.api

    result = b.move(QueryLevel.IMAGE, patient_id=first.PatientID, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID, sop_uids=[first.SOPInstanceUID])
    assert result.status == 0
    if via.counts_known:
        assert (result.completed, result.failed) == (1, 0)
    else:
        assert not result.counts_known  # Orthanc's REST move reports no counts
    assert wait_for_arrival(api, [first.SOPInstanceUID]) == []
    assert not harvester_has(api, second.SOPInstanceUID)

    # Two SOP UIDs: pynetdicom sends one C-MOVE each on one association and sums the counts.
    result = b.move(QueryLevel.IMAGE, patient_id=None, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID, sop_uids=[second.SOPInstanceUID, third.SOPInstanceUID])
    assert result.status == 0 and (result.completed == 2 if via.counts_known else not result.counts_known)
    assert wait_for_arrival(api, [second.SOPInstanceUID, third.SOPInstanceUID]) == []

    fourth = ct(first.PatientID, first.StudyInstanceUID, first.SeriesInstanceUID, number=4)
    store(via.clinic.sources[name], fourth)
    result = b.move(QueryLevel.SERIES, patient_id=None, study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID)
    assert result.status == 0 and (result.completed == 4 if via.counts_known else not result.counts_known)
    assert wait_for_arrival(api, [fourth.SOPInstanceUID]) == []


@pytest.mark.parametrize(("via", "name"), QUERIES, indirect=["via"])
def test_move_of_unknown_uid(via: Via, name: str) -> None:
    """Orthanc fails with 0xC000 (HTTP 422 through its REST API); dcmqrscp (both modes) and pynetdicom's
    SCP report success and send nothing."""
    ds = ct(f"UNKNOWN-{via.kind}-{name}")
    store(via.clinic.sources[name], ds)
    unknown = generate_uid()
    b = via.source(name)

    def move() -> MoveResult:
        return b.move(QueryLevel.IMAGE, patient_id=None, study_uid=ds.StudyInstanceUID,
                      series_uid=ds.SeriesInstanceUID, sop_uids=[unknown])

    if name == "ORTHANC_SRC":
        with pytest.raises(SourceError) as caught:
            move()
        assert (caught.value.kind, caught.value.dimse_status) == (SourceErrorKind.FAILURE_STATUS, 0xC000)
        assert caught.value.retryable is True and caught.value.retry_limit == 3
        if via.counts_known:
            assert caught.value.result is not None and caught.value.result.completed == 0
    else:
        result = move()
        assert result.status == 0
        if via.counts_known:
            assert (result.completed, result.failed, result.warning) == (0, 0, 0)
        else:
            assert not result.counts_known
    # A C-MOVE answers after its last sub-operation: whatever it sent is stored by now, no need to wait.
    assert not harvester_has(via.clinic.api, unknown)


@pytest.mark.parametrize(("via", "name"), EVERY, indirect=["via"])
def test_move_instances_of_several_series(via: Via, name: str) -> None:
    """Single instances of different studies and series (a patient's treatment records) in one call."""
    first = ct(f"MANY-{via.kind}-{name}")
    other_study = ct(first.PatientID)
    other_series = ct(first.PatientID, first.StudyInstanceUID)
    wanted = [first, other_study, other_series]
    store(via.clinic.sources[name], *wanted)
    result = via.source(name).move_instances(
        [InstanceKey(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in wanted])
    assert result.status == 0
    if via.counts_known:
        assert (result.completed, result.failed) == (3, 0)
    assert wait_for_arrival(via.clinic.api, [ds.SOPInstanceUID for ds in wanted]) == []


@pytest.mark.parametrize("via", BACKENDS, indirect=True)
def test_move_instances_share_one_association(via: Via) -> None:
    """All the instances of one call go over one association (Orthanc's move job, pynetdicom's loop)."""
    keys = [InstanceKey(generate_uid(), generate_uid(), generate_uid()) for _ in range(3)]
    with FaultScp() as scp:
        result = via.fault(scp).move_instances(keys)
    assert result.status == 0
    assert len(scp.connection_times) == 1
    assert [(m.QueryRetrieveLevel, m.StudyInstanceUID, m.SeriesInstanceUID, m.SOPInstanceUID) for m in scp.moves] \
        == [("IMAGE", k.study_uid, k.series_uid, k.sop_uid) for k in keys]


@pytest.mark.parametrize("via", BACKENDS, indirect=True)
def test_unreachable_source_is_fast_and_retryable(via: Via) -> None:
    b = via.closed()
    for operation in (b.echo,
                      lambda: b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""}),
                      lambda: b.move(QueryLevel.STUDY, patient_id=None, study_uid="1.2.3")):
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            operation()
        assert caught.value.kind is SourceErrorKind.UNREACHABLE and caught.value.retryable is True
        assert b.name in str(caught.value)
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(("via", "operation"), [("orthanc", "move"), ("pynetdicom", "find")], indirect=["via"])
def test_aborted_association(via: Via, operation: str) -> None:
    with FaultScp(Fault(abort=True)) as scp:
        b = via.fault(scp)
        with pytest.raises(SourceError) as caught:
            if operation == "find":
                b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""})
            else:
                b.move(QueryLevel.STUDY, patient_id=None, study_uid="1.2.3")
    assert caught.value.kind is SourceErrorKind.REFUSED
    if via.kind == "pynetdicom":
        assert caught.value.retryable


@pytest.mark.parametrize("via", BACKENDS, indirect=True)
@pytest.mark.parametrize(("fault", "operation", "kind", "status", "retryable", "limit"), [
    (Fault(find_status=0xA702), "find", SourceErrorKind.FAILURE_STATUS, 0xA702, True, None),
    (Fault(find_status=0xC001), "find", SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3),
    (Fault(find_status=0xA900), "find", SourceErrorKind.BAD_REQUEST, 0xA900, False, None),
    (Fault(move_status=0xA702), "move", SourceErrorKind.FAILURE_STATUS, 0xA702, True, None),
    (Fault(move_status=0xC001), "move", SourceErrorKind.FAILURE_STATUS, 0xC001, True, 3),
    (Fault(move_status=0xA801), "move", SourceErrorKind.FAILURE_STATUS, 0xA801, False, None),
], ids=["find-A702", "find-C001", "find-A900", "move-A702", "move-C001", "move-A801"])
def test_failure_statuses(via: Via, fault: Fault, operation: str, kind: SourceErrorKind, status: int,
                          retryable: bool, limit: int | None) -> None:
    with FaultScp(fault) as scp:
        b = via.fault(scp)
        with pytest.raises(SourceError) as caught:
            if operation == "find":
                b.find(QueryLevel.STUDY, {"StudyInstanceUID": ""})
            else:
                b.move(QueryLevel.SERIES, patient_id=None, study_uid="1.2.3", series_uid="1.2.3.4")
    error = caught.value
    assert (error.kind, error.dimse_status, error.retryable, error.retry_limit) == (kind, status, retryable, limit)
    if via.kind == "pynetdicom":
        assert "FAULT" in str(error) and f"0x{status:04X}" in str(error)

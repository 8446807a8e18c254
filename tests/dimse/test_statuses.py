"""The DIMSE status table, SourceError defaults and the pure key/answer mappings (no servers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NotRequired, TypedDict

import pytest
from pydicom.dataset import Dataset

from rtharvest.dimse.base import (
    UNKNOWN_COUNT,
    MoveResult,
    QueryLevel,
    SourceBackend,
    SourceError,
    SourceErrorKind,
    check_move_arguments,
    classify_status,
)
from rtharvest.dimse.statuses import describe_status, is_pending, is_warning, retry_limit_for
from rtharvest.dimse.via_orthanc import OrthancRestBackend, _answer_from_orthanc, _orthanc_timeout
from rtharvest.dimse.via_pynetdicom import PynetdicomBackend, answer_from_dataset, identifier_from_keys

K = SourceErrorKind


@pytest.mark.parametrize(("status", "kind", "retryable"), [
    (0x0000, None, False),
    (0xFF00, None, False),
    (0xFF01, None, False),
    (0x0001, None, False),
    (0xB000, None, False),
    (0xB007, None, False),
    (0xFE00, K.TIMEOUT, True),
    (0xA700, K.FAILURE_STATUS, True),
    (0xA701, K.FAILURE_STATUS, True),
    (0xA702, K.FAILURE_STATUS, True),
    (0xA801, K.FAILURE_STATUS, False),
    (0xA900, K.BAD_REQUEST, False),
    (0xA9FF, K.BAD_REQUEST, False),
    (0xC000, K.FAILURE_STATUS, True),
    (0xC001, K.FAILURE_STATUS, True),
    (0xCFFF, K.FAILURE_STATUS, True),
    (0x0122, K.BAD_REQUEST, False),
    (0x0110, K.FAILURE_STATUS, True),
    (0x1234, K.FAILURE_STATUS, True),
])
def test_classify_status(status: int, kind: SourceErrorKind | None, retryable: bool) -> None:
    assert classify_status(status) == (kind, retryable)
    assert describe_status(status)


def test_retry_limits() -> None:
    assert retry_limit_for(0xC000) == 3  # unable to process: a few attempts only
    assert retry_limit_for(0x1234) == 3
    assert retry_limit_for(0xA702) is None  # out of resources: the queue's back-off and cap
    assert retry_limit_for(0xA900) is None
    assert is_pending(0xFF01) and not is_pending(0x0000)
    assert is_warning(0xB000) and not is_warning(0xA900)


def test_source_error_defaults_and_message() -> None:
    error = SourceError.from_status(0xA900, source="ARIA", operation="find IMAGE")
    assert (error.kind, error.retryable, error.dimse_status, error.retry_limit) == (K.BAD_REQUEST, False, 0xA900, None)
    assert "find IMAGE at source ARIA" in str(error) and "0xA900" in str(error)
    c000 = SourceError.from_status(0xC000, source="ARIA", operation="move IMAGE")
    assert (c000.retryable, c000.retry_limit) == (True, 3)
    assert SourceError(K.UNREACHABLE, "x", source="s", operation="echo").retryable is True
    assert SourceError(K.NOT_FOUND, "x", source="s", operation="echo").retryable is False
    assert SourceError(K.BAD_REQUEST, "x", source="s", operation="echo").retryable is False


def test_move_result_counts() -> None:
    assert not MoveResult().counts_known and MoveResult().completed == UNKNOWN_COUNT
    assert MoveResult(0, 1, 0, 0).counts_known


def test_backends_satisfy_the_protocol() -> None:
    from rtharvest.edge.config import Modality
    from rtharvest.edge.loopback import LoopbackClient

    assert isinstance(OrthancRestBackend(LoopbackClient("http://127.0.0.1:1", None), "X", "H"), SourceBackend)
    assert isinstance(PynetdicomBackend(Modality("X", "X", "127.0.0.1", 1), "H"), SourceBackend)


class MoveArgs(TypedDict):
    """The UID arguments of :func:`check_move_arguments`."""

    patient_id: str | None
    study_uid: str
    series_uid: str | None
    sop_uids: Sequence[str]


class MoveKeys(TypedDict):
    """The UID arguments a case gives; the others default to none."""

    patient_id: str | None
    study_uid: str
    series_uid: NotRequired[str | None]
    sop_uids: NotRequired[Sequence[str]]


@pytest.mark.parametrize(("level", "kw"), [
    (QueryLevel.PATIENT, {"patient_id": None, "study_uid": "1.2"}),
    (QueryLevel.STUDY, {"patient_id": None, "study_uid": ""}),
    (QueryLevel.SERIES, {"patient_id": None, "study_uid": "1.2"}),
    (QueryLevel.IMAGE, {"patient_id": None, "study_uid": "1.2", "series_uid": "1.2.3"}),
    (QueryLevel.IMAGE, {"patient_id": None, "study_uid": "1.2", "series_uid": "1.2.3", "sop_uids": "1.2.3.4"}),
])
def test_move_arguments_are_checked(level: QueryLevel, kw: MoveKeys) -> None:
    args: MoveArgs = {"series_uid": None, "sop_uids": (), **kw}
    with pytest.raises(SourceError) as caught:
        check_move_arguments(level, source="S", **args)
    assert caught.value.kind is K.BAD_REQUEST


def test_identifier_from_keys() -> None:
    ds = identifier_from_keys(QueryLevel.IMAGE, {
        "StudyInstanceUID": "1.2", "SeriesInstanceUID": None, "SOPInstanceUID": ["1.2.3", "1.2.4"],
        "InstanceNumber": "", "Rows": 4, "ReferencedRTPlanSequence": [],
        "ReferencedStructureSetSequence": [{"ReferencedSOPInstanceUID": ""}],
    })
    assert ds.QueryRetrieveLevel == "IMAGE"
    assert ds.SeriesInstanceUID in ("", None)
    assert list(ds.SOPInstanceUID) == ["1.2.3", "1.2.4"]
    assert ds.Rows == 4
    assert len(ds.ReferencedRTPlanSequence) == 0
    assert len(ds.ReferencedStructureSetSequence) == 1
    with pytest.raises(SourceError) as caught:
        identifier_from_keys(QueryLevel.STUDY, {"NoSuchKeyword": ""})
    assert caught.value.kind is K.BAD_REQUEST


def test_answer_from_dataset() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ModalitiesInStudy = "CT"
    ds.StudyDate = ""
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.4"
    ds.ReferencedRTPlanSequence = [item]
    ds.add_new(0x00091001, "LO", "private")
    answer = answer_from_dataset(ds)
    assert answer["SOPInstanceUID"] == "1.2.3"
    assert answer["ImageType"] == ["ORIGINAL", "PRIMARY"]
    assert answer["ModalitiesInStudy"] == ["CT"]  # VM 1-n: always a list
    assert answer["StudyDate"] == ""
    assert answer["ReferencedRTPlanSequence"] == [{"ReferencedSOPInstanceUID": "1.2.4"}]
    assert answer["00091001"] == "private"


def test_answer_from_orthanc() -> None:
    raw = {
        "0008,0018": {"Name": "SOPInstanceUID", "Type": "String", "Value": "1.2.3"},
        "0008,0061": {"Name": "ModalitiesInStudy", "Type": "String", "Value": "CT\\RTPLAN"},
        "0008,0020": {"Name": "StudyDate", "Type": "Null", "Value": None},
        "0008,0054": {"Name": "RetrieveAETitle", "Type": "Null", "Value": None},
        "300c,0002": {"Name": "ReferencedRTPlanSequence", "Type": "Sequence", "Value": [
            {"0008,1155": {"Name": "ReferencedSOPInstanceUID", "Type": "String", "Value": "1.2.4"}}]},
        "7fe0,0010": {"Name": "PixelData", "Type": "Binary", "Value": None},
    }
    assert _answer_from_orthanc(raw) == {
        "SOPInstanceUID": "1.2.3", "ModalitiesInStudy": ["CT", "RTPLAN"], "StudyDate": "", "RetrieveAETitle": [],
        "ReferencedRTPlanSequence": [{"ReferencedSOPInstanceUID": "1.2.4"}],
    }


def test_orthanc_timeout_is_half_the_deadline() -> None:
    assert _orthanc_timeout(60) == 30
    assert _orthanc_timeout(2) == 1
    assert _orthanc_timeout(0.5) == 1

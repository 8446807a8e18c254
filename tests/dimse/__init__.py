"""Tests of the DICOM backends against real sources on loopback; helpers shared by the test modules."""

from __future__ import annotations

import base64
import time
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTDoseStorage, RTPlanStorage  # type: ignore[attr-defined]

from rtharvest.edge.loopback import LoopbackClient

from ..servers import LOCALHOST, DicomSource, RestClient


def _base(sop_class: UID, patient_id: str, modality: str, study_uid: str | None, series_uid: str | None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientID = patient_id
    ds.PatientName = "DIMSE^TEST"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = modality
    ds.StudyDate = "20200101"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def ct(patient_id: str, study_uid: str | None = None, series_uid: str | None = None, number: int = 1) -> Dataset:
    """A tiny CT image with fresh UIDs (or in the given study/series)."""
    ds = _base(CTImageStorage, patient_id, "CT", study_uid, series_uid)
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(32)
    return ds


def rtdose(patient_id: str, plan_uid: str) -> Dataset:
    """An RTDOSE-like object referencing ``plan_uid`` through ReferencedRTPlanSequence (no pixels)."""
    ds = _base(RTDoseStorage, patient_id, "RTDOSE", None, None)
    item = Dataset()
    item.ReferencedSOPClassUID = RTPlanStorage
    item.ReferencedSOPInstanceUID = plan_uid
    ds.ReferencedRTPlanSequence = [item]
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    return ds


def store(source: DicomSource, *datasets: Dataset) -> None:
    """C-STORE ``datasets`` into ``source`` as a clinical system would."""
    ae = AE(ae_title="SEEDER")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(LOCALHOST, source.port, ae_title=source.aet)
    assert assoc.is_established, f"cannot associate with {source.name}"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, f"C-STORE into {source.name} failed: {status}"
    finally:
        assoc.release()


def harvester_has(api: RestClient, sop_uid: str) -> bool:
    """Whether the harvester stores an instance with this SOP Instance UID now."""
    _, ids = api.request("POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    return bool(ids)


def wait_for_arrival(api: RestClient, sop_uids: list[str], deadline_s: float = 20.0) -> list[str]:
    """Poll the harvester until every UID is stored; return the ones still missing at the deadline."""
    deadline = time.monotonic() + deadline_s
    missing = list(sop_uids)
    while missing and time.monotonic() < deadline:
        missing = [uid for uid in missing if not harvester_has(api, uid)]
        if missing:
            time.sleep(0.1)
    return missing


def loopback_for(clinic: Any) -> LoopbackClient:
    """A LoopbackClient to the harvester with the test credentials (HTTP basic auth)."""
    user, password = clinic.harvester.credentials
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return LoopbackClient(clinic.harvester.url, f"Basic {token}")

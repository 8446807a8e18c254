"""Identity mismatches explained: a source that matches PatientID case-insensitively returns
another patient's records for a PatientIDs harvest; they stay out, and the harvest document and the
manifest say how many and why, so a harvest of 0 patients is never silent."""

from __future__ import annotations

from pathlib import Path

from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, store_to_scp

from .conftest import Clinic
from .harvesting import stored_sop_uids, wait_completed
from .servers import LOCALHOST, start_pynetdicom_qrscp


def test_case_insensitive_source_mismatches_are_counted(clinic: Clinic, loaded: GroundTruth,
                                                        synthetic: tuple[Path, GroundTruth], tmp_path: Path) -> None:
    out, truth = synthetic
    window = truth.window("patient")
    [pid] = window.patient_ids or []
    files = [p for p in dicom_files(out) if p.parent.parent.name == pid]
    records = {uid for uid, info in truth.objects.items() if info.patient_id == pid and info.modality == "RTRECORD"}
    assert records and pid.lower() != pid
    source = start_pynetdicom_qrscp(tmp_path / "nocase", clinic.harvester.dicom_port, name="NOCASE",
                                    aet="NOCASE", patient_id_nocase=True)
    try:
        assert store_to_scp(files, LOCALHOST, source.port, source.aet) == len(files)
        clinic.restart_harvester(fresh=True, extra_sources={"NOCASE": source},
                                 overrides={"RtHarvest.Sources.NOCASE": {"Backend": "pynetdicom"}})
        # Searching the lower-case ID: the source answers with the upper-case patient's records.
        answer = clinic.api.post("/rtharvest/harvests", {"Source": "NOCASE", "PatientIDs": [pid.lower()]})
        harvest_id = str(answer["ID"])
        doc = wait_completed(clinic.api, harvest_id)
        assert doc["Patients"] == 0
        mismatches = doc["PatientIDMismatches"]
        assert mismatches["Count"] == len(records), mismatches
        [reason] = mismatches["Reasons"]
        assert "differ only in letter case" in reason and pid not in reason
        summary = clinic.api.get(f"/rtharvest/harvests/{harvest_id}/manifest")["Summary"]
        assert summary["PatientIDMismatches"] == mismatches
        # Nothing of the other patient stays in the store, and no event names either ID.
        assert not records & set(stored_sop_uids(clinic.api))
        events = clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&limit=1000")
        assert not [e for e in events if pid in e["Message"] or pid.lower() in e["Message"]]
    finally:
        source.stop()
        clinic.restart_harvester(fresh=True)

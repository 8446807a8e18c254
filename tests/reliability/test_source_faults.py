"""Source faults: a source that dies mid-move, refuses associations, answers failure statuses or never answers.

Misbehaving sources are :class:`tests.dimse.fault_scp.FaultScp` instances added to the harvester as extra
DicomModalities. Each faulty harvest's job must back off and retry within its cap (MaxAttempts, or the
smaller bound for "unable to process"), then stay listed as a FAILED manual-intervention item carrying the
DIMSE status in ``GET /rtharvest/jobs``; meanwhile a healthy harvest running beside them completes and
equals the ground truth. A failed item can be retried by hand.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from pydicom.dataset import Dataset

from rtharvest.synth.groundtruth import GroundTruth

from ..conftest import Clinic
from ..dimse.fault_scp import Fault, FaultScp
from ..harvesting import start_harvest, wait_completed
from ..servers import DicomSource
from .helpers import assert_harvest_equals_truth, assert_jobs_sound, db_rows, leased_kinds, queue_db

pytestmark = pytest.mark.servers

MAX_ATTEMPTS = 10  # the harvester's default cap (docker/orthanc.json)
UNABLE_TO_PROCESS_ATTEMPTS = 3  # rtharvest.dimse.statuses: Cxxx is retried a few times only


def _record_answer() -> Dataset:
    """What a faulty source answers to every C-FIND: one treatment record inside any window."""
    ds = Dataset()
    ds.PatientID = "FAULT1"
    ds.StudyInstanceUID = "2.25.1001"
    ds.SeriesInstanceUID = "2.25.1002"
    ds.SOPInstanceUID = "2.25.1003"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.7"
    ds.Modality = "RTRECORD"
    ds.TreatmentDate = "20150105"
    ds.QueryRetrieveLevel = "IMAGE"
    return ds


# name: (fault, backend, expected attempts, expected DimseStatus, words of LastError)
FAULTS: dict[str, tuple[Fault, str, int, str | None, tuple[str, ...]]] = {
    # Orthanc's DICOM client does not say whether a rejection is permanent: retried up to the cap.
    "F_REFUSE": (Fault(reject=True), "orthanc", MAX_ATTEMPTS, None, ("refused", "rejected")),
    # pynetdicom sees "rejected-permanent, calling AE title not recognised": a configuration error that no
    # retry can fix, so the item surfaces for manual intervention at once.
    "F_REFUSE_PY": (Fault(reject=True), "pynetdicom", 1, None, ("rejected-permanent", "rejected")),
    "F_FIND_A7": (Fault(find_status=0xA700), "orthanc", MAX_ATTEMPTS, "0xA700", ("0xA700",)),
    "F_MOVE_A7": (Fault(find_answers=[_record_answer()], move_status=0xA702), "pynetdicom", MAX_ATTEMPTS,
                  "0xA702", ("0xA702",)),
    "F_MOVE_C0": (Fault(find_answers=[_record_answer()], move_status=0xC001), "orthanc",
                  UNABLE_TO_PROCESS_ATTEMPTS, "0xC001", ("0xC001",)),
    "F_FIND_C0": (Fault(find_status=0xC000), "pynetdicom", UNABLE_TO_PROCESS_ATTEMPTS, "0xC000", ("0xC000",)),
    "F_SILENT": (Fault(delay=60, ignore_cancel=True), "pynetdicom", MAX_ATTEMPTS, None, ("timeout",)),
}


def _jobs(clinic: Clinic, harvest_id: str) -> list[dict[str, Any]]:
    return list(clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&limit=1000"))


def test_faulty_sources_fail_within_the_cap_and_do_not_stall_the_rest(clinic: Clinic, loaded: GroundTruth) -> None:
    scps = {name: FaultScp(fault, aet=name.replace("_", "")).start() for name, (fault, *_) in FAULTS.items()}
    try:
        extra = {name: DicomSource(name, scp.aet, scp.port, "fault") for name, scp in scps.items()}
        settings = {f"RtHarvest.Sources.{name}": {"Backend": backend, "FindTimeout": 1, "MoveTimeout": 2}
                    for name, (_, backend, *_rest) in FAULTS.items()}
        clinic.restart_harvester(fresh=True, extra_sources=extra, overrides=settings)
        window = loaded.window("all")
        # One month around the answer's TreatmentDate: a dated window becomes one record-search job per
        # month, and each fault is judged on one job.
        faulty = {name: clinic.api.post("/rtharvest/harvests", {"Source": name, "From": "20150101",
                                                                 "To": "20150131"})["ID"] for name in FAULTS}
        t0 = time.monotonic()
        healthy = start_harvest(clinic.api, window, "ORTHANC_SRC")
        wait_completed(clinic.api, healthy)
        healthy_s = time.monotonic() - t0
        # The healthy harvest did not wait for the faulty ones to give up.
        still_trying = [n for n, h in faulty.items()
                        if clinic.api.get(f"/rtharvest/harvests/{h}")["State"] != "Completed"]
        assert still_trying, "every faulty harvest had already failed: the test proves nothing about stalls"
        assert_harvest_equals_truth(clinic, window, healthy, {"ORTHANC_SRC"})

        for name, harvest_id in faulty.items():
            _, _, attempts, dimse_status, words = FAULTS[name]
            wait_completed(clinic.api, harvest_id, deadline_s=120)
            jobs = _jobs(clinic, harvest_id)
            assert len(jobs) == 1, (name, jobs)
            job = jobs[0]
            assert job["State"] == "failed", (name, job)
            assert job["Attempts"] == attempts, (name, job)
            assert job["DimseStatus"] == dimse_status, (name, job)
            assert any(w.lower() in job["LastError"].lower() for w in words), (name, job)
            assert name in job["LastError"], (name, job)
            errors = clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&level=error")
            assert any("failed for good" in e["Message"] for e in errors), (name, errors)
        print(f"\nhealthy harvest beside {len(FAULTS)} faulty sources: {healthy_s:.1f} s")

        # A manual-intervention item is retried on request: another full set of attempts, then failed again.
        harvest_id = faulty["F_MOVE_C0"]
        job_id = _jobs(clinic, harvest_id)[0]["ID"]
        retried = clinic.api.post(f"/rtharvest/jobs/{job_id}/retry")
        assert retried["State"] == "pending" and retried["Attempts"] == 0
        assert clinic.api.get(f"/rtharvest/harvests/{harvest_id}")["State"] == "Running"
        wait_completed(clinic.api, harvest_id, deadline_s=60)
        job = _jobs(clinic, harvest_id)[0]
        assert job["State"] == "failed" and job["Attempts"] == UNABLE_TO_PROCESS_ATTEMPTS, job
        status, answer = clinic.api.request("POST", f"/rtharvest/jobs/{job_id}/retry", {})
        assert status == 200, answer
        status, answer = clinic.api.request("POST", f"/rtharvest/jobs/{job_id}/retry", {})
        assert status == 409 and "only failed jobs" in answer["Error"], answer
    finally:
        for scp in scps.values():
            scp.stop()
        clinic.restart_harvester(fresh=True)


def test_source_killed_and_restarted_mid_move(clinic: Clinic, loaded: GroundTruth) -> None:
    clinic.restart_harvester(fresh=True)
    source = clinic.sources["ORTHANC_SRC"]
    assert source.orthanc is not None
    window = loaded.window("all")
    harvest_id = start_harvest(clinic.api, window, "ORTHANC_SRC")
    path = queue_db(clinic)
    deadline = time.monotonic() + 30
    while not leased_kinds(path, harvest_id) & {"RetrieveSeries", "RetrieveInstance"}:
        assert time.monotonic() < deadline, "no move seen"
        time.sleep(0.01)
    source.orthanc.kill()
    try:
        # Until jobs noticed: the source does not answer a C-ECHO either, so the job waits for it, named
        # SourceUnreachable, without spending its attempt.
        deadline = time.monotonic() + 30
        while not db_rows(path, "SELECT 1 FROM jobs WHERE harvest_id = ? AND fault = 'SourceUnreachable'"
                          " AND state = 'waiting' LIMIT 1", (harvest_id,)):
            assert time.monotonic() < deadline, "no job noticed the source going away"
            time.sleep(0.05)
        health = clinic.api.get("/rtharvest/status")["Health"]
        assert health["Sources"]["ORTHANC_SRC"]["State"] == "Down", health
        assert health["Sources"]["ORTHANC_SRC"]["LastErrorClass"] == "SourceUnreachable", health
        assert any("ORTHANC_SRC is down" in p for p in health["Problems"]), health
    finally:
        source.orthanc.start()
    wait_completed(clinic.api, harvest_id)
    assert_harvest_equals_truth(clinic, window, harvest_id, {"ORTHANC_SRC"})
    jobs = assert_jobs_sound(path, harvest_id)
    # The outage spent no attempt (one at most went to the move the kill interrupted) and left no stale
    # error on the jobs that then succeeded (a held job may still fail for good afterwards: a dangling
    # reference, checked by assert_jobs_sound).
    events = clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&level=info&limit=1000")
    held = {e["Job"] for e in events if e.get("FaultClass") == "SourceUnreachable" and "waits" in e["Message"]}
    assert held, events
    spent = [(j["id"], j["kind"], j["attempts"], j["last_error"]) for j in jobs
             if j["id"] in held and j["state"] == "done" and (j["attempts"] > 2 or j["last_error"] is not None)]
    assert not spent, spent
    assert clinic.api.get("/rtharvest/status")["Health"]["Sources"]["ORTHANC_SRC"]["State"] == "Ok"

"""A harvest whose Orthanc is SIGKILLed more times than the attempts cap while one job runs still completes.

The harvest's only job is a records search at a slow source (a :class:`FaultScp` that answers after a
few seconds); the harvester is killed each time that job is leased by the current run, and restarted on
the same queue. Restarts declare the dead run's leases dead: the attempt is given back and a crash is
counted, so the job completes once the harvester is left alone, and no attempt was charged to the source.
"""

from __future__ import annotations

import time

import pytest

from ..conftest import Clinic
from ..dimse.fault_scp import Fault, FaultScp
from ..harvesting import wait_completed
from ..servers import DicomSource
from .helpers import db_rows, queue_db

pytestmark = pytest.mark.servers

KILLS = 12  # more than MaxAttempts (10)
NAME = "SLOW_SRC"


def test_killed_more_than_the_attempts_cap_while_one_job_runs(clinic: Clinic) -> None:
    scp = FaultScp(Fault(delay=3.0), aet="SLOWSRC").start()
    try:
        extra = {NAME: DicomSource(NAME, scp.aet, scp.port, "fault")}
        overrides = {f"RtHarvest.Sources.{NAME}": {"Backend": "pynetdicom", "FindTimeout": 30, "MoveTimeout": 30}}
        clinic.restart_harvester(fresh=True, extra_sources=extra, overrides=overrides)
        # One day: the records search is one job (longer windows are searched in slices).
        harvest_id = clinic.api.post("/rtharvest/harvests", {"Source": NAME, "From": "20150105",
                                                              "To": "20150105"})["ID"]
        path = queue_db(clinic)
        for kill in range(KILLS):
            pid = clinic.harvester.pid
            deadline = time.monotonic() + 30
            while True:  # leased by this run (a dead run's lease is only recovered at start-up)
                rows = db_rows(path, "SELECT lease_owner FROM jobs WHERE harvest_id = ? AND state = 'leased'",
                               (harvest_id,))
                if any(f":{pid}:" in (owner or "") for (owner,) in rows):
                    break
                assert time.monotonic() < deadline, f"kill {kill}: the job was not leased by run {pid}"
                time.sleep(0.02)
            clinic.harvester.kill()
            clinic.restart_harvester(fresh=False, extra_sources=extra, overrides=overrides)
        doc = wait_completed(clinic.api, harvest_id, deadline_s=60)
        assert doc["State"] == "Completed"
        jobs = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}")
        assert len(jobs) == 1
        job = jobs[0]
        assert job["State"] == "done", job
        assert job["Attempts"] == 1 and job["Crashes"] == KILLS, job
        assert job["LastError"] is None, job
    finally:
        scp.stop()
        clinic.restart_harvester(fresh=True)

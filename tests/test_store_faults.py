"""Faults of the harvester's own store, seen from the operator's chair: Orthanc's PostgreSQL index stopped
mid-harvest. The plugin's routes keep answering from its own database, the status route and the jobs name
the store index (not the source), the jobs wait without spending attempts, and once PostgreSQL is back the
harvest completes equal to the ground truth.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rtharvest.edge.postgres import parse_url
from rtharvest.synth.groundtruth import GroundTruth

from .conftest import Clinic
from .harvesting import start_harvest, wait_completed
from .reliability.helpers import assert_harvest_equals_truth, assert_jobs_sound, queue_db
from .servers import PostgresCluster, RestClient

pytestmark = pytest.mark.servers

SOURCE = "ORTHANC_SRC"
#: What "bounded" means for the plugin's own routes during the outage (they read SQLite only).
ROUTE_DEADLINE_S = 5.0
_databases = itertools.count(1)


def bounded_get(api: RestClient, path: str) -> Any:
    """GET that must answer 200 within :data:`ROUTE_DEADLINE_S`."""
    started = time.monotonic()
    status, body = api.request("GET", path, timeout=ROUTE_DEADLINE_S)
    assert status == 200, (path, status, body)
    assert time.monotonic() - started < ROUTE_DEADLINE_S
    return body


def wait_for(what: str, check: Any, deadline_s: float = 120.0) -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not seen within {deadline_s} s: {what}"
        time.sleep(0.5)


def pause_with_work_left(api: RestClient, harvest_id: str) -> dict[str, Any]:
    """Pause the harvest and wait until none of its jobs runs; it must still have jobs to run.

    The fault a test causes then lands while the harvest has work left, however fast the harvest is
    against the test: this small one can finish within seconds of "a quarter stored", before a fault caused
    from here is in place (and then nothing is left to wait for it).
    """
    status, body = api.request("POST", f"/rtharvest/harvests/{harvest_id}/pause")
    assert status == 200, f"the harvest could not be paused with work left ({status}: {body})"
    doc = wait_for("no job of the paused harvest running", lambda: (d := api.get(
        f"/rtharvest/harvests/{harvest_id}"))["Progress"]["JobsRunning"] == 0 and d, 120)
    assert doc["State"] == "Paused" and doc["Progress"]["JobsPending"] > 0, doc
    return doc


def resume(api: RestClient, harvest_id: str) -> None:
    """Resume a paused harvest (Waiting when its jobs are already held back for an outage)."""
    assert api.post(f"/rtharvest/harvests/{harvest_id}/resume")["State"] in ("Running", "Waiting")


def test_postgresql_outage_is_named_waited_out_and_loses_nothing(clinic: Clinic, loaded: GroundTruth,
                                                                 postgres: PostgresCluster) -> None:
    name = f"outage{next(_databases)}"
    target = parse_url(postgres.create_database(name))
    clinic.restart_harvester(fresh=True, overrides={"PostgreSQL": target.section(),
                                                    "RtHarvest.OutageBackoffMaxSeconds": 4})
    halted = False
    try:
        window = loaded.window("all")
        harvest_id = start_harvest(clinic.api, window, SOURCE)
        wait_for("a quarter of the harvest stored",
                 lambda: clinic.api.get("/statistics")["CountInstances"] >= len(window.expected) // 4)
        pause_with_work_left(clinic.api, harvest_id)
        before = clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&level=info&limit=1")
        last_before = before[0]["ID"] if before else 0
        postgres.halt()
        halted = True
        resume(clinic.api, harvest_id)  # the plugin's own route: it answers with the index down

        # The status route answers from the plugin's own state and names the store index.
        def index_down() -> Any:
            health = bounded_get(clinic.api, "/rtharvest/status")["Health"]
            return health if health["StoreIndex"]["State"] == "Unavailable" else None

        health = wait_for("Health.StoreIndex Unavailable", index_down, 60)
        assert health["Ok"] is False
        assert any(p.startswith("StoreIndex:") for p in health["Problems"]), health
        assert "CannotKnow" in health["StoreIndex"]
        # Every open job ends up held back for the store: the harvest shows Waiting with the reason.
        doc = wait_for("the harvest Waiting", lambda: (d := bounded_get(
            clinic.api, f"/rtharvest/harvests/{harvest_id}"))["State"] == "Waiting" and d, 120)
        assert [w["FaultClass"] for w in doc["WaitingFor"]] == ["StoreIndex"], doc["WaitingFor"]
        assert "PostgreSQL" in doc["WaitingFor"][0]["Reason"]
        waiting = bounded_get(clinic.api, f"/rtharvest/jobs?harvest={harvest_id}&state=waiting&limit=10000")
        assert waiting and all(j["FaultClass"] == "StoreIndex" for j in waiting), waiting
        status = bounded_get(clinic.api, "/rtharvest/status")
        assert status["Health"]["JobsWaitingForOutage"]["StoreIndex"]["Jobs"] >= len(waiting)
        # Nothing blamed the source while its store was down.
        events = bounded_get(clinic.api, f"/rtharvest/log?harvest={harvest_id}&level=info&limit=1000")
        blamed = [(e["Message"], e["FaultClass"]) for e in events
                  if e["ID"] > last_before and str(e.get("FaultClass", "")).startswith("Source")]
        assert not blamed, blamed
        assert any(e.get("FaultClass") == "StoreIndex" for e in events)

        postgres.resume()
        halted = False
        done = wait_completed(clinic.api, harvest_id, deadline_s=300)
        assert done["PlansCollected"] == window.summary.plans_collected
        assert_harvest_equals_truth(clinic, window, harvest_id, {SOURCE})
        jobs = assert_jobs_sound(queue_db(clinic), harvest_id)
        # A job that succeeded after waiting shows no stale error (its history is in the log).
        stale = [j for j in jobs if j["state"] == "done" and j["last_error"]]
        assert not stale, stale[:3]
        # The outage spent no attempt: a job held back more often than it was attempted.
        log = clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&level=info&limit=10000")
        holds = Counter(e["Job"] for e in log if e.get("FaultClass") == "StoreIndex" and "Job" in e)
        attempts = {j["id"]: j["attempts"] for j in jobs}
        assert holds and any(n >= 2 for n in holds.values()), holds
        assert all(attempts[job] <= 2 for job, n in holds.items() if n >= 2), \
            {job: (n, attempts[job]) for job, n in holds.items()}
        failed = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&state=failed")
        assert {j["Target"] for j in failed} == {d.uid for d in loaded.dangling}
        health = wait_for("Health Ok again", lambda: (h := bounded_get(clinic.api, "/rtharvest/status")["Health"])[
            "StoreIndex"]["State"] == "Ok" and h, 60)
        assert not any(p.startswith("StoreIndex") for p in health["Problems"])
    finally:
        if halted:
            postgres.resume()
        clinic.restart_harvester(fresh=True)


#: MinFreeStorageMB of the full-disk test, and what the ballast leaves free (below it, but room for the
#: queue's own writes and a move that was already under way).
MIN_FREE_MB = 96
LEFT_FREE_MB = 48


def test_full_disk_stops_new_moves_loses_nothing_and_resumes(clinic: Clinic, loaded: GroundTruth,
                                                            synthetic: tuple[Path, GroundTruth]) -> None:
    """The storage (a small tmpfs mounted for the test) fills up mid-harvest: no move starts, the jobs wait
    named DiskFull, what is stored stays, and the harvest completes once the space is freed."""
    out, _ = synthetic
    data_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) // 2**20
    run_dir = clinic.base / f"diskfull{next(_databases)}"
    storage = run_dir / "storage"
    storage.mkdir(parents=True)
    size_mb = 2 * data_mb + MIN_FREE_MB + 64  # the harvest, the index and queue, and the margin
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(storage)],
                             capture_output=True, text=True)
    # The tests run as root (README); a machine that cannot mount one is a failure to see, not a skip.
    assert mounted.returncode == 0, f"a size-limited filesystem needs mount (root): {mounted.stderr.strip()}"
    ballast = storage / "ballast"
    try:
        clinic.restart_harvester(run_dir=run_dir, overrides={"RtHarvest.MinFreeStorageMB": MIN_FREE_MB,
                                                             "RtHarvest.OutageBackoffMaxSeconds": 3})
        window = loaded.window("all")
        harvest_id = start_harvest(clinic.api, window, SOURCE)
        wait_for("a quarter of the harvest stored",
                 lambda: clinic.api.get("/statistics")["CountInstances"] >= len(window.expected) // 4)
        pause_with_work_left(clinic.api, harvest_id)
        stored = clinic.api.get("/statistics")["CountInstances"]  # no move runs now
        # The disk fills up (another program's files).
        free = shutil.disk_usage(storage).free
        with open(ballast, "wb") as f:
            f.truncate(0)
            chunk = b"\0" * 2**20
            for _ in range(max(0, free // 2**20 - LEFT_FREE_MB)):
                f.write(chunk)
        resume(clinic.api, harvest_id)

        def disk_full() -> Any:
            health = bounded_get(clinic.api, "/rtharvest/status")["Health"]
            return health if health["Storage"]["State"] == "DiskFull" else None

        health = wait_for("Health.Storage DiskFull", disk_full, 60)
        assert health["Storage"]["FreeBytes"] < MIN_FREE_MB * 2**20 == health["Storage"]["MinFreeBytes"]
        assert any(p.startswith("DiskFull:") and "MinFreeStorageMB" in p for p in health["Problems"]), health
        doc = wait_for("the harvest Waiting", lambda: (d := bounded_get(
            clinic.api, f"/rtharvest/harvests/{harvest_id}"))["State"] == "Waiting" and d, 120)
        assert [w["FaultClass"] for w in doc["WaitingFor"]] == ["DiskFull"], doc["WaitingFor"]
        # No move started once it was full (not even on the word of a check made a moment before), and none
        # starts while it stays full: the store stays as it is while jobs are held back again.
        assert clinic.api.get("/statistics")["CountInstances"] == stored
        holds = len(clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&level=info&limit=10000"))
        wait_for("jobs held back again", lambda: len(clinic.api.get(
            f"/rtharvest/log?harvest={harvest_id}&level=info&limit=10000")) > holds + 2, 60)
        assert clinic.api.get("/statistics")["CountInstances"] == stored
        assert bounded_get(clinic.api, f"/rtharvest/harvests/{harvest_id}")["State"] == "Waiting"

        ballast.unlink()  # space returns
        wait_completed(clinic.api, harvest_id, deadline_s=300)
        assert_harvest_equals_truth(clinic, window, harvest_id, {SOURCE})
        assert_jobs_sound(queue_db(clinic), harvest_id)
        failed = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&state=failed")
        assert {j["Target"] for j in failed} == {d.uid for d in loaded.dangling}
    finally:
        clinic.restart_harvester(fresh=True)
        subprocess.run(["umount", str(storage)], check=False)

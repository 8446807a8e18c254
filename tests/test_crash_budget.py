"""Attempts count what the source did, crashes what the harvester did.

The queue is driven directly, with restarts simulated the way the plugin does them: a new run declares
every lease of the previous one dead (``recover_stale_leases(owner_prefix="")``). The real SIGKILL
version with an Orthanc harvester is tests/reliability/test_crash_budget_e2e.py; the multi-process
version is at the end of this file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtharvest.core.manifest import failure_from_job
from rtharvest.store.db import Database
from rtharvest.store.jobqueue import CRASH_BUDGET_SPENT, JobQueue, JobState, RetryPolicy

CHILD = Path(__file__).with_name("queue_crash_child.py")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(str(tmp_path / "queue.db"))
    yield database
    database.close()


def one_job(q: JobQueue) -> tuple[str, int]:
    harvest = q.create_harvest("SRC")
    job_id, _ = q.enqueue(harvest.id, "FindTreatmentRecords", "SRC", {"patient_id": None})
    return harvest.id, job_id


def test_restarts_do_not_spend_attempts(db: Database) -> None:
    q = JobQueue(db, RetryPolicy(max_attempts=10, base_delay=0.0, max_delay=0.0))
    harvest_id, job_id = one_job(q)
    for run in range(25):  # far more restarts than the attempts cap
        job = q.claim(f"host:{run}:w0", 300.0)
        assert job is not None and job.id == job_id
        assert job.attempts == 1, "a restart consumed an attempt"
        assert q.recover_stale_leases(owner_prefix="") == 1
    job = q.get_job(job_id)
    assert (job.state, job.attempts, job.crashes) == (JobState.PENDING, 0, 25)
    claimed = q.claim("host:final:w0", 300.0)
    assert claimed is not None
    done = q.complete(job_id, "host:final:w0")
    assert done.state is JobState.DONE and done.attempts == 1 and done.crashes == 25
    assert q.get_harvest(harvest_id).state.value == "Completed"


def test_source_failures_still_count_between_restarts(db: Database) -> None:
    q = JobQueue(db, RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0))
    _, job_id = one_job(q)
    for n in range(3):
        q.claim(f"host:{n}:a", 300.0)
        q.recover_stale_leases(owner_prefix="")  # a crash: attempt given back
        q.claim(f"host:{n}:b", 300.0)
        q.fail(job_id, f"host:{n}:b", "C-FIND timed out at SRC")
    job = q.get_job(job_id)
    assert job.state is JobState.FAILED and job.attempts == 3 and job.crashes == 3
    reason = failure_from_job(job).reason()
    assert reason.startswith("failed after 3 attempts: C-FIND timed out")


def test_a_job_that_kills_the_harvester_every_time_still_ends(db: Database) -> None:
    q = JobQueue(db, RetryPolicy(max_attempts=10, max_crashes=5, base_delay=0.0, max_delay=0.0))
    harvest_id, job_id = one_job(q)
    for run in range(5):
        assert q.claim(f"host:{run}:w0", 300.0) is not None
        q.recover_stale_leases(owner_prefix="")
    job = q.get_job(job_id)
    assert job.state is JobState.FAILED and job.crashes == 5 and job.attempts == 0
    assert (job.last_error or "").startswith(f"{CRASH_BUDGET_SPENT} 5 times while running this job")
    assert q.claim("host:x:w0", 300.0) is None
    assert q.get_harvest(harvest_id).state.value == "Completed"
    # The manifest names the harvester, not the source.
    reason = failure_from_job(job).reason()
    assert reason.startswith("harvester failure: ") and "not a failure of the source" in reason
    # A retry by hand gives both budgets back.
    retried = q.retry(job_id)
    assert retried.attempts == 0 and retried.crashes == 0 and retried.state is JobState.PENDING


def test_an_expired_lease_of_a_live_worker_still_counts_as_an_attempt(db: Database) -> None:
    now = [1000.0]
    q = JobQueue(db, RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0), clock=lambda: now[0])
    _, job_id = one_job(q)
    for _ in range(2):
        assert q.claim("host:1:w0", 10.0) is not None
        now[0] += 11  # the worker is stuck on a source beyond its lease
    assert q.claim("host:1:w1", 10.0) is None
    job = q.get_job(job_id)
    assert job.state is JobState.FAILED and job.crashes == 0 and "attempts cap reached" in (job.last_error or "")


def test_sigkilled_worker_processes_do_not_spend_attempts(tmp_path: Path) -> None:
    """Real processes: a worker holding the only job is SIGKILLed twelve times (more than the attempts
    cap) and restarted; the job still completes, with its attempts untouched."""
    path = tmp_path / "queue.db"
    db = Database(str(path))
    q = JobQueue(db, RetryPolicy(max_attempts=10, base_delay=0.0, max_delay=0.0))
    _, job_id = one_job(q)
    log = tmp_path / "steps.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def child(work_ms: float) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, str(CHILD), "--db", str(path), "--log", str(log), "--node", "n",
                                 "--recover", "--threads", "1", "--work-ms", str(work_ms), "--children", "0",
                                 "--max-seconds", "60"], env=env)

    kills = 0
    while kills < 12:
        proc = child(60_000)  # works "forever": only the kill ends it
        deadline = time.monotonic() + 30
        while not (q.get_job(job_id).lease_owner or "").startswith(f"n:{proc.pid}:"):
            assert proc.poll() is None and time.monotonic() < deadline, "the worker never claimed the job"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    last = child(1)
    assert last.wait(60) == 0
    job = q.get_job(job_id)
    assert job.state is JobState.DONE and job.attempts == 1 and job.crashes == 12
    db.close()

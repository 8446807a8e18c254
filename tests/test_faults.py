"""Fault classes, the health monitor and the queue's outage hold: a job held back for an outage keeps its
attempts and says why; a job that succeeds clears the error of its earlier attempts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtharvest.dimse.base import SourceError, SourceErrorKind
from rtharvest.edge.loopback import LoopbackError
from rtharvest.harvest.faults import STORE_CHECK_TTL_S, FaultClass, HealthMonitor, fault_of_source_error
from rtharvest.store.db import Database
from rtharvest.store.jobqueue import JobQueue, JobState, RetryPolicy

from .test_jobqueue import FakeClock, make_queue


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(str(tmp_path / "queue.db"))
    yield database
    database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def q(db: Database, clock: FakeClock) -> JobQueue:
    return make_queue(db, clock, policy=RetryPolicy(base_delay=5.0, jitter=0.0))


def test_outage_hold_keeps_the_attempt_grows_to_the_ceiling_and_resumes(q: JobQueue, clock: FakeClock) -> None:
    harvest = q.create_harvest("ARIA")
    job = q.get_job(q.enqueue(harvest.id, "RetrieveSeries", "ARIA", {"uid": "1.2.3"})[0])
    delays = []
    for _ in range(6):
        claimed = q.claim("w1")
        assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
        held = q.defer(job.id, "w1", FaultClass.STORE_INDEX.value, "waiting: StoreIndex: index down", 30.0)
        assert held.state == JobState.WAITING and held.attempts == 0 and held.fault == "StoreIndex"
        assert held.last_error == "waiting: StoreIndex: index down"
        delays.append(held.next_attempt_at - clock())
        assert q.claim("w1") is None  # not before its backoff
        clock.advance(delays[-1])
    assert delays == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]
    assert q.outage_waits(harvest.id) == {"StoreIndex": (1, "waiting: StoreIndex: index down")}
    claimed = q.claim("w1")
    assert claimed is not None and claimed.outages == 6
    # Tried again (leased) it still waits for the outage until the attempt ends: the harvest must not flicker
    # between Running and Waiting each time a held job is looked at again.
    assert q.outage_waits(harvest.id) == {"StoreIndex": (1, "waiting: StoreIndex: index down")}
    q.defer(job.id, "w1", FaultClass.DISK_FULL.value, "waiting: DiskFull: 10 MB free", 30.0)
    assert q.outage_waits(harvest.id) == {"DiskFull": (1, "waiting: DiskFull: 10 MB free")}
    assert q.outage_waits() == {"DiskFull": (1, "waiting: DiskFull: 10 MB free")}
    clock.advance(30.0)
    assert q.claim("w1") is not None
    q.complete(job.id, "w1", note="moved 1")  # the outage is over for it
    assert q.outage_waits(harvest.id) == {}


def test_success_clears_the_last_error_and_the_fault(q: JobQueue, clock: FakeClock) -> None:
    harvest = q.create_harvest("ARIA")
    job = q.get_job(q.enqueue(harvest.id, "RetrieveSeries", "ARIA", {"uid": "1.2.3"})[0])
    assert q.claim("w1") is not None
    failed = q.fail(job.id, "w1", "move at source ARIA failed (timeout)", dimse_status=0xA702,
                    fault=FaultClass.SOURCE_TIMEOUT.value)
    assert failed.fault == "SourceTimeout" and failed.last_error and failed.dimse_status == 0xA702
    clock.advance(3600)
    assert q.claim("w1") is not None
    done = q.complete(job.id, "w1", note="moved 3")
    assert done.state == JobState.DONE
    assert (done.last_error, done.fault, done.dimse_status, done.outages) == (None, None, None, 0)
    assert done.attempts == 2  # the attempts still tell the story, and the log has the error


def test_source_errors_are_classed_by_kind() -> None:
    def err(kind: SourceErrorKind, detail: str = "x") -> SourceError:
        return SourceError(kind, detail, source="ARIA", operation="move SERIES")

    assert fault_of_source_error(err(SourceErrorKind.REFUSED)) is FaultClass.SOURCE_REFUSED
    assert fault_of_source_error(err(SourceErrorKind.TIMEOUT)) is FaultClass.SOURCE_TIMEOUT
    assert fault_of_source_error(err(SourceErrorKind.UNREACHABLE)) is FaultClass.SOURCE_UNREACHABLE
    assert fault_of_source_error(err(SourceErrorKind.NOT_FOUND)) is FaultClass.NOT_AVAILABLE
    assert fault_of_source_error(err(SourceErrorKind.PROTOCOL, "harvester REST API unreachable: refused")) \
        is FaultClass.LOOPBACK
    assert fault_of_source_error(SourceError.from_status(0xC000, source="ARIA", operation="move SERIES")) \
        is FaultClass.SOURCE_FAILURE


def test_store_check_names_index_loopback_disk_full_and_missing_storage(tmp_path: Path) -> None:
    def down() -> None:
        raise LoopbackError(0, "timed out", timed_out=True, method="GET", path="/statistics")

    def refused() -> None:
        raise LoopbackError(0, "connection refused", method="GET", path="/statistics")

    health = HealthMonitor(tmp_path, 0, "PostgreSQL", index_probe=down)
    check = health.check_store()
    assert check.fault is FaultClass.STORE_INDEX and "PostgreSQL" in check.detail
    doc = health.document(["ARIA"], scheduler_alive=True, export_worker_alive=True, workers_alive=4, workers=4,
                          started=True, waiting={})
    assert doc["StoreIndex"]["State"] == "Unavailable" and "CannotKnow" in doc["StoreIndex"]
    assert doc["Ok"] is False and doc["Problems"][0].startswith("StoreIndex:")
    assert doc["Sources"]["ARIA"]["State"] == "Unknown"

    assert HealthMonitor(tmp_path, 0, index_probe=refused).check_store().fault is FaultClass.LOOPBACK
    ok = HealthMonitor(tmp_path, 0, index_probe=lambda: None)
    assert ok.check_store().fault is None
    free = shutil.disk_usage(tmp_path).free
    full = HealthMonitor(tmp_path, free + 2**30, index_probe=lambda: None).check_store()
    assert full.fault is FaultClass.DISK_FULL and "MinFreeStorageMB" in full.detail
    assert HealthMonitor(tmp_path / "gone", 0).check_store().fault is FaultClass.STORAGE_UNAVAILABLE
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert HealthMonitor(locked, 0).check_store().fault is FaultClass.STORAGE_UNAVAILABLE


def test_the_disk_is_checked_every_time_and_only_the_index_probe_is_reused(tmp_path: Path) -> None:
    """No move may start on the word of a check made before the storage failed: the disk (a statvfs) is
    checked at every call, while the index's probe (a loopback call of up to 5 s) is shared for
    STORE_CHECK_TTL_S. Before, the whole check was reused, and a harvest went on storing for seconds into a
    disk below MinFreeStorageMB (the full-disk test in tests/test_store_faults.py missed Waiting)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    now = [1000.0]
    probes: list[float] = []
    health = HealthMonitor(storage, 0, index_probe=lambda: probes.append(now[0]), clock=lambda: now[0])
    assert health.store_fault() is None and probes == [1000.0]
    storage.rmdir()  # the storage goes away a second later, well within the TTL
    now[0] += 1.0
    outage = health.store_fault()
    assert outage is not None and outage.fault is FaultClass.STORAGE_UNAVAILABLE
    last = health.last_store_check()  # what the status route shows
    assert last is not None and last.fault is FaultClass.STORAGE_UNAVAILABLE
    storage.mkdir()
    now[0] += 1.0
    assert health.store_fault() is None and probes == [1000.0]  # back at once; the index's probe is reused
    now[0] += STORE_CHECK_TTL_S
    assert health.store_fault() is None and probes == [1000.0, 1002.0 + STORE_CHECK_TTL_S]


def test_sources_down_and_back_and_dead_threads_are_problems(tmp_path: Path) -> None:
    health = HealthMonitor(tmp_path, 0, index_probe=lambda: None)
    health.check_store()
    health.source_error("ARIA", FaultClass.SOURCE_UNREACHABLE, "move at source ARIA failed", down=True)
    health.source_ok("MIM")
    doc = health.document(["ARIA", "MIM"], scheduler_alive=False, export_worker_alive=True, workers_alive=3,
                          workers=4, started=True, waiting={"SourceUnreachable": {"Jobs": 2, "Reason": "r"}})
    assert doc["Sources"]["ARIA"]["State"] == "Down"
    assert doc["Sources"]["ARIA"]["LastErrorClass"] == "SourceUnreachable"
    assert doc["Sources"]["MIM"]["State"] == "Ok" and doc["Sources"]["MIM"]["LastContact"]
    assert [p.split(" ")[0] for p in doc["Problems"]] == ["source", "the", "3"]
    assert doc["JobsWaitingForOutage"] == {"SourceUnreachable": {"Jobs": 2, "Reason": "r"}}
    health.source_ok("ARIA")
    doc = health.document(["ARIA"], scheduler_alive=True, export_worker_alive=None, workers_alive=4, workers=4,
                          started=True, waiting={})
    assert doc["Sources"]["ARIA"]["State"] == "Ok" and doc["Ok"] is True

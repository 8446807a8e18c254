"""Durable job queue: leases, retries, politeness, crash safety (no servers needed)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

import apsw
import pytest

from rtharvest.store.db import Database, DatabaseError, register_schema
from rtharvest.store.jobqueue import (
    EnqueueItem,
    HarvestState,
    InvalidTransition,
    JobQueue,
    JobState,
    OwnerKind,
    RetryPolicy,
    SourceLimits,
    UnknownHarvest,
    UnknownJob,
)

CHILD = Path(__file__).with_name("queue_crash_child.py")


class FakeClock:
    """Epoch seconds that move only when told to."""

    def __init__(self, start: float = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set_utc(self, hour: int, minute: int = 0) -> None:
        """Move forward to the next hour:minute (UTC); time never goes backwards."""
        day = datetime.fromtimestamp(self.now, UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
        target = day.timestamp()
        while target <= self.now:
            target += 86400
        self.now = target


def utc_time(ts: float) -> dtime:
    return datetime.fromtimestamp(ts, UTC).time()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(str(tmp_path / "queue.db"))
    yield database
    database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_queue(db: Database, clock: FakeClock, **kw: Any) -> JobQueue:
    kw.setdefault("policy", RetryPolicy(jitter=0.0))
    return JobQueue(db, clock=clock, local_time=utc_time, **kw)


@pytest.fixture
def q(db: Database, clock: FakeClock) -> JobQueue:
    return make_queue(db, clock)


# -- database layer ---------------------------------------------------------------------------------


def test_database_pragmas_and_validation(db: Database, tmp_path: Path) -> None:
    assert db.scalar("PRAGMA journal_mode") == "wal"
    assert db.scalar("PRAGMA foreign_keys") == 1
    assert db.scalar("PRAGMA synchronous") == 1  # NORMAL
    full = Database(str(tmp_path / "full.db"), synchronous="FULL")
    assert full.scalar("PRAGMA synchronous") == 2
    full.close()
    with pytest.raises(ValueError):
        Database(":memory:")
    with pytest.raises(ValueError):
        off: Any = "OFF"
        Database(str(tmp_path / "x.db"), synchronous=off)


def test_transaction_rollback_and_savepoint(db: Database) -> None:
    db.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError), db.transaction():
        db.execute("INSERT INTO t VALUES (?)", (1,))
        raise RuntimeError("boom")
    assert db.scalar("SELECT count(*) FROM t") == 0
    with db.transaction():
        db.execute("INSERT INTO t VALUES (?)", (1,))
        with pytest.raises(RuntimeError), db.transaction():
            db.execute("INSERT INTO t VALUES (?)", (2,))
            raise RuntimeError("inner")
        assert db.in_transaction
    assert db.query("SELECT x FROM t") == [(1,)]
    assert not db.in_transaction


def test_schema_registry(db: Database) -> None:
    db.register_schema("test_tracking", 1, ["CREATE TABLE tracking (uid TEXT PRIMARY KEY)"])
    db.register_schema("test_tracking", 2, ["ALTER TABLE tracking ADD COLUMN seen REAL"])
    assert db.schema_version("test_tracking") == 2
    db.execute("INSERT INTO tracking (uid, seen) VALUES (?, ?)", ("1.2.3", 1.0))
    # Same step again: no-op; a changed released step: refused.
    register_schema("test_tracking", 1, ["CREATE TABLE tracking (uid TEXT PRIMARY KEY)"])
    with pytest.raises(DatabaseError):
        register_schema("test_tracking", 1, ["CREATE TABLE other (x)"])
    assert db.migrate() == []


def test_connections_per_thread_and_close(db: Database) -> None:
    conns: list[object] = []

    def grab() -> None:
        conns.append(db.connection())

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in conns}) == 3
    assert db.connection() is db.connection()
    db.close()
    with pytest.raises(DatabaseError):
        db.connection()


# -- harvests, enqueue, dedupe ----------------------------------------------------------------------


def test_harvest_lifecycle_and_dedupe(q: JobQueue) -> None:
    h = q.create_harvest("ARIA", "prostate 2012-2022", {"From": "20120101"})
    assert h.state == HarvestState.RUNNING and h.params == {"From": "20120101"}
    assert q.get_harvest(h.id) == h
    assert len(h.id) == 16

    jid, created = q.enqueue(h.id, "move", "ARIA", {"uid": "1.2.3"}, "move:1.2.3")
    assert created
    assert q.enqueue(h.id, "move", "ARIA", {"uid": "1.2.3"}, "move:1.2.3") == (jid, False)
    # Dedupe is per harvest: another harvest gets its own job.
    h2 = q.create_harvest("ARIA")
    assert q.enqueue(h2.id, "move", "ARIA", {"uid": "1.2.3"}, "move:1.2.3")[1]
    # Derived dedupe keys: same kind/source/payload -> same job.
    a = q.enqueue(h.id, "find", "MIM", {"b": 1, "a": 2})
    assert q.enqueue(h.id, "find", "MIM", {"a": 2, "b": 1}) == (a[0], False)

    items = [EnqueueItem(h.id, "move", "ARIA", {"i": i}, f"k{i % 50}") for i in range(200)]
    results = q.enqueue_many(items)
    assert sum(created for _, created in results) == 50
    assert len({jid for jid, _ in results}) == 50
    assert q.progress(h.id).total == 52

    with pytest.raises(UnknownHarvest, match="unknown harvest"):
        q.enqueue("nope", "move", "ARIA", {}, "k")
    with pytest.raises(UnknownJob):
        q.get_job(999999)
    assert [x.id for x in q.list_harvests()] == [h2.id, h.id] or {x.id for x in q.list_harvests()} == {
        h.id,
        h2.id,
    }


def test_dedupe_under_concurrency(db: Database, clock: FakeClock) -> None:
    q = make_queue(db, clock)
    h = q.create_harvest("ARIA")
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def producer() -> None:
        for i in range(100):
            r = q.enqueue(h.id, "move", "ARIA", {"i": i}, f"k{i}")
            with lock:
                results.append(r)

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(c for _, c in results) == 100
    assert db.scalar("SELECT count(*) FROM jobs") == 100


def test_claim_order_priority_then_oldest(q: JobQueue, clock: FakeClock) -> None:
    h = q.create_harvest("ARIA")
    low, _ = q.enqueue(h.id, "move", "ARIA", {}, "low")
    clock.advance(1)
    old, _ = q.enqueue(h.id, "move", "ARIA", {}, "old", priority=5)
    clock.advance(1)
    new, _ = q.enqueue(h.id, "move", "ARIA", {}, "new", priority=5)
    q.limits["ARIA"] = SourceLimits(max_concurrent=10)
    order = [q.claim("w", 60) for _ in range(3)]
    assert [j.id if j else None for j in order] == [old, new, low]
    assert q.claim("w", 60) is None


def test_claim_kinds_filter(q: JobQueue) -> None:
    h = q.create_harvest("ARIA")
    q.enqueue(h.id, "find", "ARIA", {}, "f")
    m, _ = q.enqueue(h.id, "move", "ARIA", {}, "m")
    job = q.claim("w", 60, kinds=["move"])
    assert job is not None and job.id == m
    assert q.claim("w", 60, kinds=["store"]) is None


# -- completion -------------------------------------------------------------------------------------


def test_completion_follow_ups_and_reopen(q: JobQueue) -> None:
    h = q.create_harvest("ARIA")
    jid, _ = q.enqueue(h.id, "plan", "ARIA", {}, "plan")
    job = q.claim("w", 60)
    assert job is not None
    q.complete(job.id, "w", follow_ups=[EnqueueItem(h.id, "move", "ARIA", {"n": 1}, "m1")])
    assert q.get_harvest(h.id).state == HarvestState.RUNNING  # the follow-up is pending
    child = q.claim("w", 60)
    assert child is not None and child.kind == "move"
    q.complete(child.id, "w", note="3 instances")
    assert q.get_job(child.id).note == "3 instances"
    assert q.is_harvest_finished(h.id)
    assert q.get_harvest(h.id).state == HarvestState.COMPLETED
    # A duplicate enqueue into a completed harvest changes nothing; a new job reopens it.
    assert q.enqueue(h.id, "move", "ARIA", {"n": 1}, "m1") == (child.id, False)
    assert q.get_harvest(h.id).state == HarvestState.COMPLETED
    q.enqueue(h.id, "move", "ARIA", {"n": 2}, "m2")
    assert q.get_harvest(h.id).state == HarvestState.RUNNING
    assert q.progress(h.id).as_contract() == {
        "JobsTotal": 3,
        "JobsDone": 2,
        "JobsPending": 1,
        "JobsRunning": 0,
        "JobsFailed": 0,
    }


def test_lost_lease_cannot_complete(q: JobQueue, clock: FakeClock) -> None:
    h = q.create_harvest("ARIA")
    q.enqueue(h.id, "move", "ARIA", {}, "k")
    job = q.claim("w1", 10)
    assert job is not None
    with pytest.raises(InvalidTransition, match="not leased by w2"):
        q.complete(job.id, "w2")
    q.heartbeat(job.id, "w1", 10)
    clock.advance(11)
    again = q.claim("w2", 10)  # the expired lease is reclaimed inside claim
    assert again is not None and again.id == job.id and again.attempts == 2
    with pytest.raises(InvalidTransition, match="lease was lost"):
        q.complete(job.id, "w1")
    with pytest.raises(InvalidTransition):
        q.heartbeat(job.id, "w1", 10)
    q.complete(job.id, "w2")
    with pytest.raises(InvalidTransition):
        q.complete(job.id, "w2")  # done once only


def test_expired_but_unreclaimed_lease_may_still_complete(q: JobQueue, clock: FakeClock) -> None:
    h = q.create_harvest("ARIA")
    q.enqueue(h.id, "move", "ARIA", {}, "k")
    job = q.claim("w1", 10)
    assert job is not None
    clock.advance(60)
    assert q.complete(job.id, "w1").state == JobState.DONE


def test_release_gives_attempt_back(q: JobQueue) -> None:
    h = q.create_harvest("ARIA")
    q.enqueue(h.id, "move", "ARIA", {}, "k")
    job = q.claim("w", 60)
    assert job is not None and job.attempts == 1
    released = q.release(job.id, "w")
    assert released.state == JobState.PENDING and released.attempts == 0 and released.lease_owner is None


# -- retries ----------------------------------------------------------------------------------------


def test_attempts_cap_and_exponential_backoff(db: Database, clock: FakeClock) -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=5.0, factor=2.0, max_delay=600.0, jitter=0.0)
    q = make_queue(db, clock, policy=policy)
    h = q.create_harvest("ARIA")
    jid, _ = q.enqueue(h.id, "move", "ARIA", {}, "k")
    delays = []
    for attempt in range(1, 11):
        job = q.claim("w", 60)
        assert job is not None and job.id == jid and job.attempts == attempt
        failed = q.fail(jid, "w", "association rejected", dimse_status=0xA700)
        if attempt < 10:
            assert failed.state == JobState.WAITING
            delay = failed.next_attempt_at - clock.now
            delays.append(delay)
            # Not claimable before the backoff has passed, claimable right after.
            clock.advance(delay - 0.001)
            assert q.claim("w", 60) is None
            clock.advance(0.001)
        else:
            assert failed.state == JobState.FAILED
            assert failed.dimse_status == 0xA700
            assert "gave up after 10 attempts" in (failed.last_error or "")
    assert delays == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    clock.advance(10_000)
    assert q.claim("w", 60) is None  # capped: never again by itself
    assert q.get_harvest(h.id).state == HarvestState.COMPLETED  # failed jobs do not keep it open
    # Manual intervention: another 10 attempts, and the harvest runs again.
    retried = q.retry(jid)
    assert retried.state == JobState.PENDING and retried.attempts == 0 and retried.max_attempts == 10
    assert q.get_harvest(h.id).state == HarvestState.RUNNING
    assert q.claim("w", 60) is not None
    with pytest.raises(InvalidTransition, match="only failed jobs"):
        q.retry(jid)


def test_jitter_stays_within_bounds_and_cap() -> None:
    policy = RetryPolicy(base_delay=10, factor=3, max_delay=100, jitter=0.2)
    rng = random.Random(1)
    for attempts in range(1, 30):
        d = policy.delay(attempts, rng)
        nominal = min(100.0, 10 * 3 ** (attempts - 1))
        assert nominal * 0.8 - 1e-9 <= d <= min(100.0, nominal * 1.2) + 1e-9
    assert policy.delay(10_000) == 100.0  # no float overflow


def test_non_retryable_fails_at_once(q: JobQueue) -> None:
    h = q.create_harvest("ARIA")
    jid, _ = q.enqueue(h.id, "move", "ARIA", {}, "k")
    q.claim("w", 60)
    job = q.fail(jid, "w", "SOP instance 1.2.3 not found at ARIA", dimse_status=0xA701, retryable=False)
    assert job.state == JobState.FAILED and job.attempts == 1
    assert job.last_error == "SOP instance 1.2.3 not found at ARIA"
    assert [j.id for j in q.list_jobs(state="Failed")] == [jid]


def test_policy_validation() -> None:
    bad: dict[str, Any]
    for bad in (
        {"max_attempts": 0},
        {"base_delay": -1},
        {"factor": 0.5},
        {"max_delay": 1, "base_delay": 5},
        {"jitter": 1.0},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    with pytest.raises(ValueError):
        SourceLimits(max_concurrent=0)
    with pytest.raises(ValueError):
        SourceLimits(quiet_hours=(dtime(1), dtime(1)))


# -- stale leases -----------------------------------------------------------------------------------


def test_recover_stale_leases(q: JobQueue, clock: FakeClock) -> None:
    h = q.create_harvest("ARIA")
    q.limits["ARIA"] = SourceLimits(max_concurrent=10)
    for i in range(3):
        q.enqueue(h.id, "move", "ARIA", {}, f"k{i}")
    a = q.claim("nodeA:1:0", 100)
    b = q.claim("nodeB:1:0", 100)
    c = q.claim("nodeA:1:1", 1000)
    assert a and b and c
    clock.advance(101)
    assert q.recover_stale_leases() == 2  # a and b expired, c has not
    assert q.get_job(c.id).state == JobState.LEASED
    assert q.recover_stale_leases(owner_prefix="nodeA:") == 1  # nodeA restarted: its leases are dead
    assert q.counts(h.id)[JobState.PENDING] == 3
    assert q.get_job(a.id).attempts == 1  # the interrupted attempt counts


def test_poison_job_reaches_cap_through_expiries(db: Database, clock: FakeClock) -> None:
    q = make_queue(db, clock, policy=RetryPolicy(max_attempts=3, jitter=0.0))
    h = q.create_harvest("ARIA")
    jid, _ = q.enqueue(h.id, "move", "ARIA", {}, "k")
    for _ in range(3):
        job = q.claim("w", 10)
        assert job is not None
        clock.advance(11)  # the worker "crashed" while running it
    assert q.claim("w", 10) is None
    job = q.get_job(jid)
    assert job.state == JobState.FAILED and "expired after 3 attempts" in (job.last_error or "")


# -- politeness -------------------------------------------------------------------------------------


def test_per_source_concurrency_limit(db: Database, clock: FakeClock) -> None:
    q = make_queue(
        db, clock, limits={"ARIA": SourceLimits(max_concurrent=2)}, default_limits=SourceLimits(max_concurrent=1)
    )
    h = q.create_harvest("ARIA")
    for i in range(5):
        q.enqueue(h.id, "move", "ARIA", {}, f"a{i}", priority=10)
        q.enqueue(h.id, "move", "MIM", {}, f"m{i}")
    claimed = [q.claim(f"w{i}", 60) for i in range(5)]
    sources = Counter(j.source for j in claimed if j is not None)
    assert sources == {"ARIA": 2, "MIM": 1}
    assert claimed[3] is None and claimed[4] is None
    first_aria = next(j for j in claimed if j is not None and j.source == "ARIA")
    q.complete(first_aria.id, first_aria.lease_owner or "")
    nxt = q.claim("w9", 60)
    assert nxt is not None and nxt.source == "ARIA"
    assert q.claim("w10", 60) is None


def test_per_source_limit_holds_across_threads(db: Database) -> None:
    q = JobQueue(db, limits={"ARIA": SourceLimits(max_concurrent=2)})
    h = q.create_harvest("ARIA")
    q.enqueue_many(EnqueueItem(h.id, "move", "ARIA", {}, f"k{i}") for i in range(60))
    active = 0
    peak = 0
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal active, peak
        while not q.is_harvest_finished(h.id):
            job = q.claim(f"w{n}", 30)
            if job is None:
                time.sleep(0.001)
                continue
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.002)
            with lock:
                active -= 1
            q.complete(job.id, f"w{n}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2
    assert q.counts(h.id)[JobState.DONE] == 60


@pytest.mark.parametrize(
    ("window", "inside", "outside"),
    [
        ((dtime(9), dtime(17)), [(9, 0), (12, 0), (16, 59)], [(8, 59), (17, 0), (23, 0)]),
        ((dtime(22), dtime(6)), [(22, 0), (23, 59), (0, 0), (5, 59)], [(6, 0), (12, 0), (21, 59)]),
    ],
)
def test_quiet_hours(
    db: Database,
    clock: FakeClock,
    window: tuple[dtime, dtime],
    inside: list[tuple[int, int]],
    outside: list[tuple[int, int]],
) -> None:
    q = make_queue(db, clock, limits={"ARIA": SourceLimits(max_concurrent=5, quiet_hours=window)})
    h = q.create_harvest("ARIA")
    q.enqueue(h.id, "move", "ARIA", {}, "a")
    q.enqueue(h.id, "move", "MIM", {}, "m")  # MIM has no quiet hours
    for hour, minute in inside:
        clock.set_utc(hour, minute)
        job = q.claim("w", 60)
        assert job is not None and job.source == "MIM", (hour, minute)
        q.release(job.id, "w")
    for hour, minute in outside:
        clock.set_utc(hour, minute)
        job = q.claim("w", 60, kinds=["move"])
        assert job is not None
        # Both are eligible outside the window: take them all, then give them back.
        other = q.claim("w", 60)
        assert other is not None and {job.source, other.source} == {"ARIA", "MIM"}, (hour, minute)
        q.release(job.id, "w")
        q.release(other.id, "w")


def test_default_quiet_hours_allow_only_configured_sources(db: Database, clock: FakeClock) -> None:
    q = make_queue(
        db,
        clock,
        limits={"AUXPACS": SourceLimits(max_concurrent=1)},
        default_limits=SourceLimits(max_concurrent=2, quiet_hours=(dtime(20), dtime(8))),
    )
    h = q.create_harvest("ARIA")
    q.enqueue(h.id, "move", "ARIA", {}, "a")
    q.enqueue(h.id, "move", "AUXPACS", {}, "x")
    clock.set_utc(23)
    job = q.claim("w", 60)
    assert job is not None and job.source == "AUXPACS"
    assert q.claim("w", 60) is None
    clock.set_utc(9)
    job2 = q.claim("w", 60)
    assert job2 is not None and job2.source == "ARIA"


# -- harvest control --------------------------------------------------------------------------------


def test_pause_resume_cancel(q: JobQueue) -> None:
    h = q.create_harvest("ARIA")
    q.limits["ARIA"] = SourceLimits(max_concurrent=10)
    for i in range(4):
        q.enqueue(h.id, "move", "ARIA", {}, f"k{i}")
    running = q.claim("w", 60)
    assert running is not None
    assert q.pause(h.id).state == HarvestState.PAUSED
    assert q.pause(h.id).state == HarvestState.PAUSED  # idempotent
    assert q.claim("w", 60) is None
    q.complete(running.id, "w")  # a leased job finishes while paused
    assert q.resume(h.id).state == HarvestState.RUNNING
    second = q.claim("w", 60)
    assert second is not None
    cancelled = q.cancel(h.id)
    assert cancelled.state == HarvestState.CANCELLED
    counts = q.counts(h.id)
    assert counts[JobState.CANCELLED] == 2 and counts[JobState.LEASED] == 1 and counts[JobState.DONE] == 1
    assert q.claim("w", 60) is None
    # The running job's retryable failure does not bring it back; its follow-ups are recorded cancelled.
    assert q.fail(second.id, "w", "timeout").state == JobState.CANCELLED
    jid, created = q.enqueue(h.id, "move", "ARIA", {}, "late")
    assert created and q.get_job(jid).state == JobState.CANCELLED
    with pytest.raises(InvalidTransition, match="Cancelled"):
        q.resume(h.id)
    with pytest.raises(UnknownHarvest):
        q.pause("0123456789abcdef")


def test_empty_harvest_completion(q: JobQueue) -> None:
    h = q.create_harvest("ARIA")
    assert q.is_harvest_finished(h.id)
    assert q.update_completion(h.id).state == HarvestState.COMPLETED
    with pytest.raises(InvalidTransition):
        q.pause(h.id)


# -- injection --------------------------------------------------------------------------------------

INJECTIONS = [
    "'; DROP TABLE jobs; --",
    "\" OR 1=1 --",
    "x' OR '1'='1",
    "Running' OR state != '",
    "%",
    "_",
    "1); DELETE FROM harvests; --",
    "\x00",
    "ARIA\"]",
]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_injection_strings_are_data(q: JobQueue, db: Database, clock: FakeClock, evil: str) -> None:
    h = q.create_harvest("ARIA", label=evil, params={"PatientIDs": [evil]})
    jid, _ = q.enqueue(h.id, evil, evil, {"uid": evil}, evil)
    q.enqueue(h.id, "move", "ARIA", {}, "other")
    assert q.list_jobs(harvest_id=evil) == []
    assert q.get_harvest(h.id).label == evil
    with pytest.raises(ValueError):
        q.list_jobs(state=evil)
    with pytest.raises(ValueError):
        q.list_harvests(state=evil)
    with pytest.raises(UnknownHarvest):
        q.get_harvest(evil)
    with pytest.raises(UnknownHarvest):
        q.cancel(evil)
    assert q.counts(evil) == dict.fromkeys(JobState, 0)
    assert q.claim(evil, 60, kinds=[evil]) is not None  # the evil kind is just a kind
    assert q.find_job(h.id, evil) is not None
    q.limits[evil] = SourceLimits(max_concurrent=1, quiet_hours=(dtime(0), dtime(23, 59)))
    assert q.claim("w", 60, kinds=[evil]) is None
    assert q.recover_stale_leases(owner_prefix=evil) == 1  # the prefix is compared literally
    assert q.recover_stale_leases(owner_prefix="%") == 0
    assert db.scalar("SELECT count(*) FROM jobs") == 2
    assert db.scalar("SELECT count(*) FROM harvests") == 1
    assert q.get_job(jid).payload == {"uid": evil}


# -- concurrency: threads and processes ---------------------------------------------------------------


def test_threads_never_claim_the_same_job(db: Database) -> None:
    q = JobQueue(db, default_limits=SourceLimits(max_concurrent=100))
    h = q.create_harvest("ARIA")
    n_jobs = 600
    q.enqueue_many(EnqueueItem(h.id, "move", f"S{i % 3}", {"i": i}, f"k{i}") for i in range(n_jobs))
    claims: list[tuple[int, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(n: int) -> None:
        owner = f"w{n}"
        try:
            start.wait()
            while True:
                job = q.claim(owner, 60)
                if job is None:
                    return
                with lock:
                    claims.append((job.id, owner))
                q.complete(job.id, owner)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = Counter(jid for jid, _ in claims)
    assert len(ids) == n_jobs and max(ids.values()) == 1
    assert len({owner for _, owner in claims}) > 1  # the work really was shared
    assert q.counts(h.id)[JobState.DONE] == n_jobs
    assert db.scalar("SELECT max(attempts) FROM jobs") == 1


def _parse_log(path: Path) -> list[tuple[str, int, int, str]]:
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")
    complete_lines = lines[:-1]  # the last piece is "" or a line cut by SIGKILL
    out = []
    for line in complete_lines:
        verb, job, attempt, owner = line.split(" ")
        out.append((verb, int(job), int(attempt), owner))
    return out


def _spawn(db_path: Path, log: Path, node: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), "--db", str(db_path), "--log", str(log), "--node", node, *extra],
        stderr=subprocess.PIPE,
    )


def _await_claim(log: Path, proc: subprocess.Popen[bytes], deadline_s: float = 60.0) -> bool:
    """Wait until ``proc`` has logged a claim; False if it exited first."""
    marker = f":{proc.pid}:"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if any(verb == "claim" and marker in owner for verb, _, _, owner in _parse_log(log)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"process {proc.pid} claimed nothing within {deadline_s} s")


def _seed_parents(db_path: Path, n_parents: int) -> str:
    setup = Database(str(db_path))
    q = JobQueue(setup)
    h = q.create_harvest("ARIA")
    q.enqueue_many(EnqueueItem(h.id, "parent", f"S{i % 2}", {"i": i}, f"parent:{i}") for i in range(n_parents))
    setup.close()
    return h.id


def test_two_processes_never_claim_the_same_job(tmp_path: Path) -> None:
    db_path, log = tmp_path / "q.db", tmp_path / "log.txt"
    hid = _seed_parents(db_path, 150)
    procs = [_spawn(db_path, log, f"p{i}", "--threads", "2", "--work-ms", "1") for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    entries = _parse_log(log)
    claims = Counter(job for verb, job, _, _ in entries if verb == "claim")
    done = Counter(job for verb, job, _, _ in entries if verb == "done")
    assert len(claims) == 150 * 3 and max(claims.values()) == 1
    assert done == claims
    nodes = {owner.split(":")[0] for verb, _, _, owner in entries if verb == "claim"}
    assert nodes == {"p0", "p1"}  # both processes took part
    db = Database(str(db_path))
    q = JobQueue(db)
    assert q.counts(hid)[JobState.DONE] == 450
    assert q.get_harvest(hid).state == HarvestState.COMPLETED
    db.close()


def test_sigkill_mid_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("RTH_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    n_parents, n_children = 300, 2
    db_path, log = tmp_path / "q.db", tmp_path / "log.txt"
    hid = _seed_parents(db_path, n_parents)
    args = ("--recover", "--threads", "3", "--work-ms", "5", "--children", str(n_children))
    kills = 0
    for _ in range(6):
        proc = _spawn(db_path, log, "child", *args)
        # Kill while this process works (its first claim is in the log), at a random moment after it: a
        # fixed delay would land in interpreter start-up on a loaded machine and interrupt nothing.
        if not _await_claim(log, proc):
            break
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    final = _spawn(db_path, log, "child", *args)
    _, err = final.communicate(timeout=180)
    assert final.returncode == 0, f"seed={seed}: {err.decode()}"
    assert kills >= 3, f"seed={seed}: the run finished before enough kills"

    db = Database(str(db_path))
    q = JobQueue(db)
    total = n_parents * (1 + n_children)
    # Nothing lost: every parent and every child it discovered exists once (dedupe) and is done.
    assert db.scalar("SELECT count(*) FROM jobs") == total, f"seed={seed}"
    assert q.counts(hid) == {**dict.fromkeys(JobState, 0), JobState.DONE: total}, f"seed={seed}"
    assert db.scalar("SELECT count(DISTINCT dedupe_key) FROM jobs") == total
    assert q.get_harvest(hid).state == HarvestState.COMPLETED

    entries = _parse_log(log)
    done = Counter(job for verb, job, _, _ in entries if verb == "done")
    # Nothing duplicated: complete() succeeded at most once per job...
    assert max(done.values()) == 1, f"seed={seed}"
    # ...and by the lease holder of the final attempt recorded in the database.
    rows = {jid: (attempts, note) for jid, attempts, note in db.query("SELECT id, attempts, note FROM jobs")}
    for verb, job, attempt, owner in entries:
        if verb == "done":
            assert rows[job] == (attempt, owner), f"seed={seed}: job {job}"
    # A job can be done in the database but missing from the log only if a kill fell between the commit
    # and the log write: at most one per worker thread per kill.
    assert total - len(done) <= kills * 3, f"seed={seed}"
    # Kills interrupted work: some jobs ran more than once, and no run was claimed twice. A lease recovered
    # from a killed process gives its attempt back (a crash is not the source's failure) and counts a crash,
    # so the attempt number repeats across processes: a run is identified by its owner.
    claims = Counter((job, owner) for verb, job, _, owner in entries if verb == "claim")
    assert max(claims.values()) == 1, f"seed={seed}"
    # A run claimed by a killed process and not logged done was either running at the kill (its lease was
    # recovered and counted as a crash) or committed just before it (the job's note is that owner).
    crashes = dict(db.query("SELECT id, crashes FROM jobs"))
    finished = {(job, owner) for verb, job, _, owner in entries if verb == "done"}
    interrupted = [(job, owner) for job, owner in claims if (job, owner) not in finished and rows[job][1] != owner]
    assert interrupted, f"seed={seed}: no kill hit a running job"
    assert all(crashes[job] >= 1 for job, _ in interrupted), f"seed={seed}: an interrupted run counted no crash"
    assert db.scalar("SELECT max(attempts) FROM jobs") == 1, f"seed={seed}: a crash spent an attempt"
    db.close()


def test_busy_writer_times_out_cleanly(tmp_path: Path) -> None:
    path = str(tmp_path / "q.db")
    a = Database(path)
    b = Database(path, busy_timeout=0.2)
    qb = JobQueue(b)
    h = qb.create_harvest("ARIA")
    with a.transaction():  # another writer holds the lock
        t0 = time.monotonic()
        with pytest.raises(apsw.BusyError):
            qb.enqueue(h.id, "move", "ARIA", {}, "k")
        assert time.monotonic() - t0 < 2
    assert qb.enqueue(h.id, "move", "ARIA", {}, "k")[1]  # nothing half-done
    a.close()
    b.close()


# -- job owners ---------------------------------------------------------------------------------------


def test_an_export_owns_its_jobs_and_is_no_harvest(q: JobQueue) -> None:
    """Jobs carry their owner's kind: a harvest's are harvests', an export's are an export's, and asking an
    export's job for its harvest is an error rather than an export ID passed off as a harvest ID."""
    harvest = q.create_harvest("ARIA", seed=lambda h: [EnqueueItem(h, "RetrieveInstance", "ARIA", {"n": 1})])
    export = q.create_owner(OwnerKind.EXPORT, "CENTRAL", "export of h",
                            seed=lambda e: [EnqueueItem(e, "ExportSend", "CENTRAL", {"Export": e})])
    assert harvest.owner_kind is OwnerKind.HARVEST and export.owner_kind is OwnerKind.EXPORT
    assert q.get_harvest(export.id).owner_kind is OwnerKind.EXPORT
    (hjob,) = q.list_jobs(harvest_id=harvest.id)
    (ejob,) = q.list_jobs(harvest_id=export.id)
    assert hjob.owner_kind is OwnerKind.HARVEST and hjob.harvest_id == hjob.owner_id == harvest.id
    assert ejob.owner_kind is OwnerKind.EXPORT and ejob.owner_id == export.id
    with pytest.raises(ValueError, match="belongs to an export"):
        _ = ejob.harvest_id


def test_an_existing_export_queue_migrates_to_export_owners(tmp_path: Path, clock: FakeClock) -> None:
    """A queue written before jobs had owner kinds (the owner_kind columns absent): on opening, its rows
    are harvests' except the owners of export send/verify jobs, which become exports."""
    path = str(tmp_path / "old.db")
    db = Database(path)
    old = make_queue(db, clock)
    harvest = old.create_harvest("ARIA", seed=lambda h: [EnqueueItem(h, "RetrieveInstance", "ARIA", {"n": 1})])
    export = old.create_harvest("CENTRAL", seed=lambda e: [EnqueueItem(e, "ExportSend", "CENTRAL", {"Export": e}),
                                                           EnqueueItem(e, "ExportVerify", "CENTRAL", {"Export": e})])
    with db.transaction():  # back to the file as it was before the owner step
        db.execute("ALTER TABLE jobs DROP COLUMN owner_kind")
        db.execute("ALTER TABLE harvests DROP COLUMN owner_kind")
        db.execute("DELETE FROM rth_schema WHERE name = 'jobqueue_owner'")
    db.close()
    db = Database(path)
    try:
        q = make_queue(db, clock)
        assert db.schema_version("jobqueue_owner") == 1
        assert q.get_harvest(harvest.id).owner_kind is OwnerKind.HARVEST
        assert q.get_harvest(export.id).owner_kind is OwnerKind.EXPORT
        assert {j.owner_kind for j in q.list_jobs(harvest_id=export.id)} == {OwnerKind.EXPORT}
        assert [j.harvest_id for j in q.list_jobs(harvest_id=harvest.id)] == [harvest.id]
        # A job enqueued later for the migrated export is the export's too.
        q.enqueue(export.id, "ExportSend", "CENTRAL", {"again": 1})
        assert {j.owner_kind for j in q.list_jobs(harvest_id=export.id)} == {OwnerKind.EXPORT}
    finally:
        db.close()

"""Politeness per contacted source: the gate around every DIMSE operation, quiet hours in a
time zone, jobs given back until a source may be contacted, and searches that would scan a whole source."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path

import pytest

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import (
    CriterionKind,
    FindReferencing,
    FindSeriesInFrameOfReference,
    FindTreatmentRecords,
    Hop,
    Operation,
    ReferenceCriterion,
    RetrieveInstance,
    Role,
)
from rtharvest.core.strategies import unbounded_search
from rtharvest.dimse.politeness import SourceGate, SourceUnavailable
from rtharvest.harvest.ingest import HarvestRouting
from rtharvest.store.db import Database
from rtharvest.store.jobqueue import JobQueue, JobState, RetryPolicy, SourceLimits

# 2024-05-01 12:00 UTC is 14:00 in Zurich (CEST) and 00:00 (May 2) in Auckland (NZST, UTC+12).
NOON_UTC = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()


def utc_time(ts: float) -> dtime:
    return datetime.fromtimestamp(ts, UTC).time()


class Clock:
    def __init__(self, now: float = NOON_UTC) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- quiet hours in a time zone -----------------------------------------------------------------------


def test_quiet_hours_are_read_in_the_sources_time_zone() -> None:
    zurich = SourceLimits(quiet_hours=(dtime(13, 30), dtime(15)), time_zone="Europe/Zurich")
    # 12:00 UTC is 14:00 in Zurich: quiet there, although 12:00 is outside 13:30-15:00.
    assert zurich.quiet_at(NOON_UTC, utc_time)
    assert not SourceLimits(quiet_hours=(dtime(13, 30), dtime(15))).quiet_at(NOON_UTC, utc_time)
    # Quiet until 15:00 Zurich = 13:00 UTC.
    assert zurich.quiet_until(NOON_UTC, utc_time) == NOON_UTC + 3600
    wraps = SourceLimits(quiet_hours=(dtime(22), dtime(6)), time_zone="Pacific/Auckland")
    assert wraps.quiet_until(NOON_UTC, utc_time) == NOON_UTC + 6 * 3600  # 00:00 -> 06:00 local
    assert SourceLimits(quiet_hours=(dtime(22), dtime(6))).quiet_until(NOON_UTC, utc_time) is None


def test_queue_honours_each_sources_time_zone(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "q.db"))
    try:
        clock = Clock()
        q = JobQueue(db, RetryPolicy(jitter=0.0), clock=clock, local_time=utc_time, limits={
            "ARIA": SourceLimits(quiet_hours=(dtime(13, 30), dtime(15)), time_zone="Europe/Zurich"),
            "MIM": SourceLimits(quiet_hours=(dtime(13, 30), dtime(15))),  # machine time (UTC here)
        })
        h = q.create_harvest("ARIA")
        q.enqueue(h.id, "find", "ARIA", {}, "a")
        q.enqueue(h.id, "find", "MIM", {}, "m")
        job = q.claim("w", 60)
        assert job is not None and job.source == "MIM"
        assert q.claim("w", 60) is None  # ARIA is quiet in Zurich
        clock.now += 3600  # 15:00 in Zurich
        other = q.claim("w", 60)
        assert other is not None and other.source == "ARIA"
    finally:
        db.close()


def test_release_until_keeps_a_job_back_and_says_why(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "q.db"))
    try:
        clock = Clock()
        q = JobQueue(db, RetryPolicy(jitter=0.0), clock=clock, local_time=utc_time)
        h = q.create_harvest("ARIA")
        q.enqueue(h.id, "find", "ARIA", {}, "a")
        job = q.claim("w", 60)
        assert job is not None and job.attempts == 1
        released = q.release(job.id, "w", not_before=clock.now + 600, note="waiting: quiet hours of source MIM")
        assert released.state is JobState.PENDING and released.attempts == 0
        assert released.last_error == "waiting: quiet hours of source MIM"
        assert q.claim("w", 60) is None
        clock.now += 600
        assert q.claim("w", 60) is not None
    finally:
        db.close()


# -- the gate -------------------------------------------------------------------------------------------


def test_gate_never_lets_more_than_max_concurrent_operations_reach_a_source() -> None:
    gate = SourceGate({"MIM": SourceLimits(max_concurrent=1)}, SourceLimits(max_concurrent=3))
    inside = {"MIM": 0, "PACS": 0}
    peak = {"MIM": 0, "PACS": 0}
    lock = threading.Lock()
    start = threading.Barrier(6)

    def work(source: str) -> None:
        start.wait()
        for _ in range(20):
            with gate.slot(source):
                with lock:
                    inside[source] += 1
                    peak[source] = max(peak[source], inside[source])
                threading.Event().wait(0.002)
                with lock:
                    inside[source] -= 1

    threads = [threading.Thread(target=work, args=(s,)) for s in ("MIM", "MIM", "MIM", "PACS", "PACS", "PACS")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak["MIM"] == 1
    assert 1 < peak["PACS"] <= 3
    activity = gate.activity()
    assert activity["MIM"].peak == 1 and activity["MIM"].total == 60 and activity["MIM"].open == 0
    assert activity["MIM"].waited > 0


def test_gate_refuses_a_quiet_source_and_says_until_when() -> None:
    clock = Clock()
    gate = SourceGate({"MIM": SourceLimits(quiet_hours=(dtime(11), dtime(13)))}, SourceLimits(),
                      clock=clock, local_time=utc_time)
    with pytest.raises(SourceUnavailable) as info:
        with gate.slot("MIM"):
            pytest.fail("a quiet source was contacted")
    assert info.value.until == NOON_UTC + 3600
    assert "quiet hours of source MIM until 2024-05-01T13:00Z" in info.value.reason
    with gate.slot("PACS"):  # other sources are not affected
        pass
    assert "MIM" not in gate.activity()


def test_waiting_for_a_slot_calls_back_and_stops() -> None:
    gate = SourceGate({"MIM": SourceLimits(max_concurrent=1)}, SourceLimits())
    stop = threading.Event()
    calls: list[int] = []

    def waiting() -> None:
        calls.append(1)
        stop.set()

    with gate.slot("MIM"):
        with pytest.raises(SourceUnavailable, match="stopping"):
            with gate.slot("MIM", waiting=waiting, stop=stop):
                pytest.fail("two operations at once")
    assert calls


# -- which sources an operation contacts, and searches that are never sent -----------------------------


def _records_of_plan(pid: str | None, study: str | None = None) -> FindReferencing:
    return FindReferencing("RTRECORD", pid, study, ReferenceCriterion(CriterionKind.PLAN, ("1.2.3",)),
                           Role.PLAN_RECORD, Hop.PLAN_RECORD)


def test_records_of_a_plan_are_searched_at_the_source_too() -> None:
    routing = HarvestRouting("h", HarvestWindow("20240101", "20240131"), "ARIA", ("PACS", "MIM"))
    assert routing.sources_of(_records_of_plan("P1")) == ("ARIA", "PACS", "MIM")
    assert routing.source_for(_records_of_plan("P1")) == "ARIA"
    assert routing.sources_of(FindTreatmentRecords(routing.window, None)) == ("ARIA",)
    dose = FindReferencing("RTDOSE", "P1", "1.2", ReferenceCriterion(CriterionKind.PLAN, ("1.2.3",)), Role.DOSE,
                           Hop.PLAN_DOSE)
    assert routing.sources_of(dose) == ("PACS", "MIM")
    listed = HarvestRouting("h", routing.window, "ARIA", ("MIM", "ARIA"))
    assert listed.sources_of(_records_of_plan("P1")) == ("MIM", "ARIA")  # the user's order is kept


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (_records_of_plan(None), "no PatientID and no study"),
        (_records_of_plan(""), "every RTRECORD of the source"),
        (FindSeriesInFrameOfReference("", "1.2.9", (), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR),
         "every series of the source"),
        (FindSeriesInFrameOfReference("P1", "", (), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR),
         "no FrameOfReferenceUID"),
    ],
)
def test_searches_with_an_empty_key_are_not_sent(op: Operation, reason: str) -> None:
    why = unbounded_search(op)
    assert why is not None and reason in why


@pytest.mark.parametrize(
    "op",
    [
        _records_of_plan("P1"),
        _records_of_plan(None, study="1.2.840.1"),  # bounded by the study (as a dose search is)
        FindSeriesInFrameOfReference("P1", "1.2.9", (), Role.PLANNING_FOR_SERIES, Hop.SERIES_FOR),
        RetrieveInstance("1.2.3", None, None, None, "RTPLAN", Role.PLAN, Hop.RECORD_PLAN),
    ],
)
def test_bounded_searches_are_sent(op: Operation) -> None:
    assert unbounded_search(op) is None


def test_leases_are_extended_while_an_operation_runs(tmp_path: Path) -> None:
    """A C-MOVE that outlasts the lease it started with keeps its job: the maintenance thread extends it."""
    from rtharvest.harvest.harvester import Harvester
    from rtharvest.harvest.ingest import Ingest
    from rtharvest.store.eventlog import EventLog
    from rtharvest.store.tracking import Tracker

    from .fakes import FakeStore

    db = Database(str(tmp_path / "q.db"))
    try:
        clock = Clock()
        q = JobQueue(db, RetryPolicy(jitter=0.0), clock=clock, local_time=utc_time)
        h = q.create_harvest("ARIA")
        q.enqueue(h.id, "move", "ARIA", {}, "a")
        job = q.claim("w0", 30)
        assert job is not None and job.lease_expires_at == clock.now + 30
        # Real but idle collaborators: only the queue takes part in extending leases.
        tracker, events = Tracker(db), EventLog(db)
        ingest = Ingest(db, q, tracker, events, lambda _: None, lambda _: None)
        harvester = Harvester(q, tracker, events, ingest, FakeStore(), {}, lambda _: None, lease_seconds=30)
        harvester._in_operation[job.id] = ("w0", time.monotonic() - 11)  # a third of the lease ago
        clock.now += 25  # the move still runs, 5 s before the lease would expire
        harvester.extend_leases()
        [leased] = q.list_jobs(harvest_id=h.id, state="leased")
        assert leased.lease_expires_at == clock.now + 30
        # Not again until another third of the lease has passed.
        clock.now += 1
        harvester.extend_leases()
        [leased] = q.list_jobs(harvest_id=h.id, state="leased")
        assert leased.lease_expires_at == clock.now - 1 + 30
    finally:
        db.close()

"""Event log: filters, paging, retention, logging handler (no servers needed)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rtharvest.store.db import Database
from rtharvest.store.eventlog import Event, EventLog, EventLogHandler, Level, NewEvent, parse_since

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(str(tmp_path / "log.db"))
    yield database
    database.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log(db: Database, clock: Clock) -> EventLog:
    return EventLog(db, clock=clock)


def test_write_and_query_filters(log: EventLog, clock: Clock) -> None:
    a = log.write(Level.INFO, "planner", "harvest started", harvest_id="h1", source="ARIA")
    clock.now += 10
    b = log.write("warning", "retriever", "C-MOVE failed", harvest_id="h1", job_id=7, source="MIM",
                  sop_uid="1.2.3", series_uid="1.2", dimse_status=0xA701)
    clock.now += 10
    c = log.write(Level.ERROR, "retriever", "giving up", harvest_id="h2", job_id=8, source="ARIA")
    clock.now += 10
    d = log.write(Level.DEBUG, "store", "stored", harvest_id="h2")

    assert [e.id for e in log.query()] == [d, c, b, a]  # newest first
    assert [e.id for e in log.query(min_level="warning")] == [c, b]
    assert [e.id for e in log.query(min_level=Level.ERROR)] == [c]
    assert [e.id for e in log.query(harvest_id="h1")] == [b, a]
    assert [e.id for e in log.query(component="retriever")] == [c, b]
    assert [e.id for e in log.query(source="ARIA")] == [c, a]
    assert [e.id for e in log.query(job_id=7)] == [b]
    assert [e.id for e in log.query(harvest_id="h1", min_level="warn")] == [b]
    assert [e.id for e in log.query(limit=2)] == [d, c]
    assert [e.id for e in log.query(limit=2, before_id=c)] == [b, a]
    assert log.count() == 4 and log.count(harvest_id="h2") == 2 and log.count(min_level="error") == 1

    ev = log.query(job_id=7)[0]
    assert ev == Event(b, T0 + 10, Level.WARNING, "retriever", "C-MOVE failed", "h1", 7, "MIM", "1.2.3",
                       "1.2", 0xA701)
    assert ev.iso == "2024-05-01T12:00:10.000Z"
    assert ev.as_json()["DimseStatus"] == 0xA701 and ev.as_json()["Level"] == "WARNING"
    assert "Job" not in log.query(harvest_id="h1")[-1].as_json()


def test_since_forms(log: EventLog, clock: Clock) -> None:
    ids = []
    for i in range(5):
        clock.now = T0 + i * 3600
        ids.append(log.write("info", "c", f"e{i}"))
    cutoff = datetime(2024, 5, 1, 14, 0, tzinfo=UTC)
    expected = [ids[4], ids[3], ids[2]]
    for since in (
        cutoff,
        cutoff.replace(tzinfo=None),  # naive = UTC
        cutoff.timestamp(),
        int(cutoff.timestamp()),
        "2024-05-01T14:00:00Z",
        "2024-05-01T16:00:00+02:00",
        "2024-05-01T14:00:00",
        str(cutoff.timestamp()),
    ):
        assert [e.id for e in log.query(since=since)] == expected, since
    assert log.query(since="2030-01-01") == []
    assert len(log.query(since="2024-05-01")) == 5
    with pytest.raises(ValueError, match="ISO 8601"):
        log.query(since="yesterday")
    assert parse_since(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=5)) == 5.0


def test_level_parsing() -> None:
    assert Level.parse("WARN") is Level.WARNING
    assert Level.parse("critical") is Level.ERROR
    assert Level.parse(logging.CRITICAL) is Level.ERROR
    assert Level.parse(15) is Level.DEBUG
    with pytest.raises(ValueError, match="unknown log level"):
        Level.parse("loud")


def test_write_many_and_purge(log: EventLog, clock: Clock) -> None:
    n = log.write_many(
        NewEvent("info", "bulk", f"e{i}", harvest_id="h", time=T0 - 86400 * (i % 10)) for i in range(1000)
    )
    assert n == 1000 and log.count() == 1000
    clock.now = T0
    removed = log.purge(retention_days=5, batch=64)  # several batches
    assert removed == 400  # ages 6..9 days, 100 each (exactly 5 days old is kept)
    assert log.count() == 600
    assert all(e.time >= T0 - 5 * 86400 for e in log.query(limit=1000))
    assert log.purge(retention_days=0) == 500  # events stamped exactly "now" stay
    assert log.count() == 100
    with pytest.raises(ValueError):
        log.purge(-1)


def test_long_messages_are_truncated(log: EventLog) -> None:
    log.write("info", "c", "x" * 100_000)
    assert len(log.query()[0].message) == 4000


INJECTIONS = ["'; DROP TABLE events; --", "\" OR 1=1 --", "x' OR '1'='1", "%", "_", "\x00", ") OR (1=1"]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_injection_strings_are_data(log: EventLog, db: Database, evil: str) -> None:
    log.write("info", evil, evil, harvest_id=evil, source=evil, sop_uid=evil, series_uid=evil)
    log.write("error", "other", "other", harvest_id="h", source="ARIA")
    assert [e.message for e in log.query(harvest_id=evil)] == [evil]
    assert [e.message for e in log.query(component=evil)] == [evil]
    assert [e.message for e in log.query(source=evil)] == [evil]
    assert log.query(harvest_id=evil + "x") == []
    bads: list[dict[str, Any]] = [{"min_level": evil}, {"since": evil}, {"limit": evil}, {"before_id": evil}]
    for bad in bads:
        with pytest.raises(ValueError):
            log.query(**bad)
    assert db.scalar("SELECT count(*) FROM events") == 2


def test_handler_routes_records_with_ids(log: EventLog) -> None:
    logger = logging.getLogger("rtharvest.test_handler")
    logger.setLevel(logging.DEBUG)
    handler = EventLogHandler(log, level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        logger.info("harvest %s started", "h1", extra={"harvest_id": "h1", "source": "ARIA"})
        logger.warning("C-MOVE failed", extra={"harvest_id": "h1", "job_id": 3, "sop_uid": "1.2.3",
                                               "dimse_status": 0xA702, "component": "retriever"})
        try:
            raise ConnectionError("association aborted")
        except ConnectionError:
            logger.exception("retrieve crashed", extra={"job_id": "4"})
        logger.critical("disk full")
        assert handler.wait_flushed(10)
    finally:
        logger.removeHandler(handler)
        handler.close()
    events = log.query(limit=10)
    assert [e.level for e in events] == [Level.ERROR, Level.ERROR, Level.WARNING, Level.INFO]
    crit, exc, warn, info = events
    assert info.message == "harvest h1 started" and info.component == "test_handler"
    assert info.harvest_id == "h1" and info.source == "ARIA"
    assert warn.component == "retriever" and warn.job_id == 3 and warn.dimse_status == 0xA702
    assert warn.sop_uid == "1.2.3"
    assert exc.message == "retrieve crashed [ConnectionError: association aborted]" and exc.job_id == 4
    assert crit.message == "disk full"
    assert handler.dropped == 0 and handler.errors == 0


def test_handler_never_blocks_or_raises_when_db_is_locked(tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    holder = Database(path)
    db = Database(path, busy_timeout=0.3)
    log = EventLog(db)
    handler = EventLogHandler(log, max_queue=50, batch=10)
    logger = logging.getLogger("rtharvest.test_locked")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        with holder.transaction():  # another writer holds the lock for a while
            holder.execute("CREATE TABLE IF NOT EXISTS lockme (x)")
            t0 = datetime.now(UTC)
            for i in range(500):
                logger.warning("event %d", i)
            elapsed = (datetime.now(UTC) - t0).total_seconds()
            assert elapsed < 0.5  # emit only queues
            assert handler.dropped > 0  # the bounded queue overflowed: dropped, counted
        assert handler.wait_flushed(10)
        logger.warning("after the lock")
        assert handler.wait_flushed(10)
    finally:
        logger.removeHandler(handler)
        handler.close()
    stored = log.count()
    assert stored + handler.dropped == 501
    assert log.query(limit=1)[0].message == "after the lock"
    holder.close()
    db.close()


def test_handler_survives_bad_records(log: EventLog) -> None:
    handler = EventLogHandler(log)
    record = logging.LogRecord("rtharvest.x", logging.INFO, __file__, 1, "%d", ("not a number",), None)
    handler.emit(record)  # getMessage() raises inside: counted, not raised
    assert handler.errors == 1
    handler.close()
    handler.emit(logging.LogRecord("rtharvest.x", logging.INFO, __file__, 1, "late", None, None))
    assert handler.dropped == 1


def test_concurrent_writers(log: EventLog) -> None:
    def writer(n: int) -> None:
        for i in range(200):
            log.write("info", f"w{n}", f"{i}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.count() == 800
    assert log.count(component="w2") == 200

"""Searchable event log in the harvester's SQLite file.

One row per event: time, level, component, message and the identifiers an operator filters by (harvest,
job, source, SOP/series UID, DIMSE status). Indexed for the filters of ``GET /rtharvest/log``; millions
of rows stay fast because every query walks an index newest-first and stops at ``limit``.

**No PHI in messages.** The API takes identifiers as separate fields precisely so that messages never
need to quote a dataset: write ``"C-MOVE failed"`` with ``sop_uid=...``, ``dimse_status=0xA701``, never a
patient name, birth date or free text copied from a DICOM header. UIDs and the harvest's own ids are the
only identifying data the log is meant to hold; PatientID, when needed, belongs in the manifest, not here.

:class:`EventLogHandler` routes :mod:`logging` records of the ``rtharvest`` logger into the table without
ever blocking or raising into the caller (a DICOM callback must answer its C-STORE quickly).
"""

from __future__ import annotations

import logging
import queue
import threading
import time as _time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from types import TracebackType
from typing import Any

import apsw
from pydicom.errors import InvalidDicomError

from ..background import BackgroundLoop
from .db import Database, register_schema

__all__ = ["Event", "EventLog", "EventLogHandler", "Level", "NewEvent", "PhiSafeFormatter", "exception_summary",
           "parse_since"]

#: Exceptions whose messages cannot quote a dataset, so they are shown in full:
#:
#: * ``apsw.Error``: SQLite's own texts ("database is locked", "UNIQUE constraint failed: rth_objects.sop_uid")
#:   name our schema's tables, columns and constraints; SQLite never puts a bound value in a message (and
#:   apsw's binding errors are ``TypeError``, not ``apsw.Error``).
#: * ``InvalidDicomError``: pydicom raises it with fixed texts about the file's structure (no preamble or
#:   'DICM' prefix, implicit/explicit VR mismatch), never with an element's value.
#: * ``OSError`` (connection errors, timeouts, ``urllib`` errors): the operating system's text, an HTTP
#:   status line or a URL of a configured peer, and for a file the path; the plugin opens only configured
#:   paths (database, configuration) and reads stored instances through Orthanc, never a path built from a
#:   dataset.
#:
#: Any other exception may quote what it failed on: pydicom's value errors do ("Invalid value for VR DA:
#: '19700101'"), a ``KeyError`` is its key (a PatientID used as one), a ``ValueError`` of ``int()`` or of
#: an enum quotes the text. Those show their type only.
_MESSAGE_KEPT: tuple[type[BaseException], ...] = (apsw.Error, InvalidDicomError, OSError)


def exception_summary(exc: BaseException) -> str:
    """``exc`` as a job error, an event or a log line may show it: the type, and the message only when the
    type's messages cannot carry dataset values (PHI); see ``_MESSAGE_KEPT``."""
    name = type(exc).__name__
    if isinstance(exc, _MESSAGE_KEPT):
        text = str(exc)[:300]
        return f"{name}: {text}" if text else name
    return f"{name} (message withheld: it may quote the dataset)"


class PhiSafeFormatter(logging.Formatter):
    """A formatter whose tracebacks keep every frame (file, line, code) but end with
    :func:`exception_summary` instead of the exception's message (Orthanc's log holds no PHI either)."""

    def formatException(self, ei: tuple[type[BaseException], BaseException, TracebackType | None]  # noqa: N802
                        | tuple[None, None, None]) -> str:
        exc = ei[1]
        if exc is None:
            return ""
        chain: list[BaseException] = []
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            chain.append(current)
            current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        parts = []
        for item in reversed(chain):  # the oldest first, as Python prints them
            frames = "".join(traceback.format_tb(item.__traceback__))
            parts.append(f"Traceback (most recent call last):\n{frames}{exception_summary(item)}")
        return "\n\nDuring the handling of the above exception, another occurred:\n\n".join(parts)


class Level(IntEnum):
    """Severity, with the numeric values of :mod:`logging` (so ``level >= WARNING`` works in SQL)."""

    DEBUG = logging.DEBUG
    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR

    @classmethod
    def parse(cls, value: Level | str | int) -> Level:
        """``Level.WARNING``, ``"warning"``, ``"WARN"``, ``30``: all mean WARNING."""
        if isinstance(value, Level):
            return value
        if isinstance(value, int):
            return cls.from_logging(value)
        text = str(value).strip().upper()
        aliases = {"WARN": "WARNING", "ERR": "ERROR", "CRITICAL": "ERROR", "FATAL": "ERROR"}
        text = aliases.get(text, text)
        try:
            return cls[text]
        except KeyError:
            raise ValueError(
                f"unknown log level {value!r}; expected one of {', '.join(m.name.lower() for m in cls)}"
            ) from None

    @classmethod
    def from_logging(cls, levelno: int) -> Level:
        """Map any :mod:`logging` level number to the nearest level at or below it."""
        for member in (cls.ERROR, cls.WARNING, cls.INFO):
            if levelno >= member:
                return member
        return cls.DEBUG


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(value: datetime | float | int | str) -> float:
    """Epoch seconds of ``value``: a datetime (naive means UTC), epoch seconds, or an ISO 8601 string
    (``2024-05-01``, ``2024-05-01T12:00:00Z``, ``...+02:00``; no zone means UTC)."""
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"cannot read {value!r} as a time; use ISO 8601 (2024-05-01T12:00:00Z) or epoch seconds"
            ) from None
        return parse_since(dt)
    raise ValueError(f"cannot read {value!r} as a time")


@dataclass(frozen=True)
class Event:
    """One stored event. ``time`` is epoch seconds; :attr:`iso` gives ISO 8601 UTC."""

    id: int
    time: float
    level: Level
    component: str
    message: str
    harvest_id: str | None = None
    job_id: int | None = None
    source: str | None = None
    sop_uid: str | None = None
    series_uid: str | None = None
    dimse_status: int | None = None
    #: Where the fault is (a :class:`rtharvest.harvest.faults.FaultClass` value) for events about a failure.
    fault: str | None = None

    @property
    def iso(self) -> str:
        """``time`` as ISO 8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
        return _iso(self.time)

    def as_json(self) -> dict[str, Any]:
        """The event as the REST ``log`` route shows it (None fields omitted)."""
        out: dict[str, Any] = {
            "ID": self.id,
            "Time": self.iso,
            "Level": self.level.name,
            "Component": self.component,
            "Message": self.message,
        }
        for key, value in (
            ("Harvest", self.harvest_id),
            ("Job", self.job_id),
            ("Source", self.source),
            ("SOPInstanceUID", self.sop_uid),
            ("SeriesInstanceUID", self.series_uid),
            ("DimseStatus", self.dimse_status),
            ("FaultClass", self.fault),
        ):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class NewEvent:
    """An event to write with :meth:`EventLog.write_many` (``time=None``: now)."""

    level: Level | str
    component: str
    message: str
    harvest_id: str | None = None
    job_id: int | None = None
    source: str | None = None
    sop_uid: str | None = None
    series_uid: str | None = None
    dimse_status: int | None = None
    time: float | None = None
    fault: str | None = None


register_schema(
    "eventlog",
    1,
    [
        # No foreign keys: the log must accept events about anything (a harvest not created yet, a
        # deleted one) and an insert must never fail on a constraint.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,
            level INTEGER NOT NULL,
            component TEXT NOT NULL,
            message TEXT NOT NULL,
            harvest_id TEXT,
            job_id INTEGER,
            source TEXT,
            sop_uid TEXT,
            series_uid TEXT,
            dimse_status INTEGER
        )""",
        # Newest-first per filter: (filter column, id) lets "WHERE x = ? ORDER BY id DESC LIMIT n" read
        # n index entries. ids grow with time (single writer at a time), so id order is time order.
        "CREATE INDEX events_harvest ON events (harvest_id, id)",
        "CREATE INDEX events_level ON events (level, id)",
        "CREATE INDEX events_component ON events (component, id)",
        "CREATE INDEX events_source ON events (source, id)",
        "CREATE INDEX events_job ON events (job_id, id)",
        "CREATE INDEX events_sop ON events (sop_uid)",
        # since= and retention purge.
        "CREATE INDEX events_time ON events (time)",
    ],
)

# Where a failure is (rtharvest.harvest.faults.FaultClass), so the log can be filtered by it.
register_schema("eventlog_fault", 1, ["ALTER TABLE events ADD COLUMN fault TEXT"])

_EVENT_COLUMNS = (
    "id, time, level, component, message, harvest_id, job_id, source, sop_uid, series_uid, dimse_status, fault"
)
_INSERT = (
    "INSERT INTO events (time, level, component, message, harvest_id, job_id, source, sop_uid,"
    " series_uid, dimse_status, fault) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _row_to_event(row: tuple[Any, ...]) -> Event:
    return Event(
        id=int(row[0]),
        time=float(row[1]),
        level=Level.from_logging(int(row[2])),
        component=row[3],
        message=row[4],
        harvest_id=row[5],
        job_id=None if row[6] is None else int(row[6]),
        source=row[7],
        sop_uid=row[8],
        series_uid=row[9],
        dimse_status=None if row[10] is None else int(row[10]),
        fault=row[11],
    )


_MAX_MESSAGE = 4000  # characters; a runaway message (a dumped dataset) must not bloat the file


class EventLog:
    """The ``events`` table of a :class:`~rtharvest.store.db.Database`. Safe to share between threads."""

    def __init__(self, db: Database, clock: Callable[[], float] = _time.time) -> None:
        self.db = db
        self.clock = clock
        db.migrate()

    def _params(self, ev: NewEvent) -> tuple[Any, ...]:
        return (
            self.clock() if ev.time is None else float(ev.time),
            int(Level.parse(ev.level)),
            str(ev.component),
            str(ev.message)[:_MAX_MESSAGE],
            ev.harvest_id,
            None if ev.job_id is None else int(ev.job_id),
            ev.source,
            ev.sop_uid,
            ev.series_uid,
            None if ev.dimse_status is None else int(ev.dimse_status),
            None if ev.fault is None else str(ev.fault),
        )

    def write(
        self,
        level: Level | str,
        component: str,
        message: str,
        *,
        harvest_id: str | None = None,
        job_id: int | None = None,
        source: str | None = None,
        sop_uid: str | None = None,
        series_uid: str | None = None,
        dimse_status: int | None = None,
        time: float | None = None,
        fault: str | None = None,
    ) -> int:
        """Store one event (committed on return); returns its id. Identifiers go in the keyword
        fields, never into ``message`` (see the module docstring on PHI)."""
        ev = NewEvent(level, component, message, harvest_id, job_id, source, sop_uid, series_uid,
                      dimse_status, time, fault)
        with self.db.transaction():
            self.db.execute(_INSERT, self._params(ev))
            return self.db.last_insert_rowid()

    def write_many(self, events: Iterable[NewEvent]) -> int:
        """Store several events in one transaction (one commit); returns how many."""
        params = [self._params(ev) for ev in events]
        if params:
            with self.db.transaction():
                self.db.executemany(_INSERT, params)
        return len(params)

    @staticmethod
    def _where(
        min_level: Level | str | int | None,
        harvest_id: str | None,
        since: datetime | float | int | str | None,
        component: str | None,
        source: str | None,
        job_id: int | None,
        before_id: int | None,
    ) -> tuple[str, list[Any]]:
        # Only constant fragments are joined; every value is a bound parameter. Building the clause
        # list (rather than "(? IS NULL OR col = ?)") lets SQLite pick the matching index.
        clauses: list[str] = []
        params: list[Any] = []
        if min_level is not None:
            clauses.append("level >= ?")
            params.append(int(Level.parse(min_level)))
        if harvest_id is not None:
            clauses.append("harvest_id = ?")
            params.append(str(harvest_id))
        if since is not None:
            # ids grow with time, but SQLite cannot know it: walking ids newest-first with only
            # "time >= ?" would scan the whole table when fewer than `limit` events match. The lower
            # id bound (exact: the smallest id among matching times, read from the time index) lets
            # the scan stop there.
            t = parse_since(since)
            clauses.append("time >= ? AND id >= coalesce((SELECT min(id) FROM events WHERE time >= ?), 1 << 62)")
            params.extend((t, t))
        if component is not None:
            clauses.append("component = ?")
            params.append(str(component))
        if source is not None:
            clauses.append("source = ?")
            params.append(str(source))
        if job_id is not None:
            clauses.append("job_id = ?")
            params.append(int(job_id))
        if before_id is not None:
            clauses.append("id < ?")
            params.append(int(before_id))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        return where, params

    def query(
        self,
        min_level: Level | str | int | None = None,
        harvest_id: str | None = None,
        since: datetime | float | int | str | None = None,
        component: str | None = None,
        source: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
        job_id: int | None = None,
    ) -> list[Event]:
        """Events newest first. ``before_id`` pages backwards: pass the smallest id of the previous page.

        ``min_level`` keeps events at or above that level; ``since`` is a datetime, epoch seconds or
        ISO 8601 string. Bad values raise :class:`ValueError` with a message fit for a 400 answer.
        """
        lim = int(limit)
        if lim < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        where, params = self._where(min_level, harvest_id, since, component, source, job_id, before_id)
        rows = self.db.query(
            "SELECT " + _EVENT_COLUMNS + " FROM events" + where  # noqa: S608 - constant fragments only
            + " ORDER BY id DESC LIMIT ?",
            [*params, lim],
        )
        return [_row_to_event(r) for r in rows]

    def count(
        self,
        min_level: Level | str | int | None = None,
        harvest_id: str | None = None,
        since: datetime | float | int | str | None = None,
        component: str | None = None,
        source: str | None = None,
        job_id: int | None = None,
    ) -> int:
        """Number of events matching the same filters as :meth:`query` (all events by default)."""
        where, params = self._where(min_level, harvest_id, since, component, source, job_id, None)
        return int(self.db.scalar("SELECT count(*) FROM events" + where, params, 0))  # noqa: S608

    def purge(self, retention_days: float, batch: int = 5000) -> int:
        """Delete events older than ``retention_days``; returns how many.

        Deletes in batches of ``batch`` rows, one short transaction each, so purging millions of rows
        never holds the write lock long enough to stall the queue's workers.
        """
        if retention_days < 0:
            raise ValueError("retention_days must be >= 0")
        cutoff = self.clock() - retention_days * 86400.0
        total = 0
        while True:
            with self.db.transaction():
                n = self.db.execute(
                    "DELETE FROM events WHERE id IN"
                    " (SELECT id FROM events WHERE time < ? ORDER BY time LIMIT ?)",
                    (cutoff, int(batch)),
                )
            total += n
            if n < batch:
                return total


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


# Attributes of a LogRecord that carry our identifiers (passed with extra={...}).
_ID_FIELDS = ("harvest_id", "job_id", "source", "sop_uid", "series_uid", "dimse_status")


class EventLogHandler(logging.Handler):
    """A :mod:`logging` handler that stores records in an :class:`EventLog`.

    Usage::

        handler = EventLogHandler(eventlog)
        logging.getLogger("rtharvest").addHandler(handler)
        log.warning("C-MOVE failed", extra={"harvest_id": h, "sop_uid": uid, "dimse_status": 0xA702})

    ``emit`` only puts the record on a bounded in-memory queue; a background thread writes batches in
    one transaction each. The caller (possibly a DICOM callback holding the GIL) is never blocked by a
    locked database and never sees an exception. When the queue is full (database locked for long, or a
    log storm) records are dropped and counted in :attr:`dropped`; :attr:`errors` counts failed writes.

    ``component`` is the ``extra={"component": ...}`` value, else the logger name without its
    ``rtharvest.`` prefix. Exception text is reduced to :func:`exception_summary` (tracebacks go to
    Orthanc's own log, not this table, through :class:`PhiSafeFormatter`).
    """

    def __init__(
        self,
        eventlog: EventLog,
        level: int = logging.INFO,
        *,
        max_queue: int = 10000,
        batch: int = 500,
    ) -> None:
        super().__init__(level)
        self.eventlog = eventlog
        self.batch = batch
        self.dropped = 0
        self.errors = 0
        self.last_error: str | None = None
        self._queue: queue.Queue[NewEvent | None] = queue.Queue(maxsize=max_queue)
        self._pending = 0  # put but not yet written (for flush)
        self._pending_lock = threading.Condition()
        self._stopped = False
        self._writer = BackgroundLoop("rtharvest-eventlog", self._run, on_stop=self._post_end)
        self._writer.start()

    def _to_event(self, record: logging.LogRecord) -> NewEvent:
        attrs = record.__dict__
        component = attrs.get("component")
        if not component:
            name = record.name
            component = name[len("rtharvest."):] if name.startswith("rtharvest.") else name
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} [{exception_summary(exc)}]"
        ids: dict[str, Any] = {}
        for key in _ID_FIELDS:
            value = attrs.get(key)
            if value is not None:
                ids[key] = value
        job_id = ids.get("job_id")
        status = _as_int(ids.get("dimse_status"))
        return NewEvent(
            level=Level.from_logging(record.levelno),
            component=str(component),
            message=message,
            harvest_id=None if ids.get("harvest_id") is None else str(ids["harvest_id"]),
            job_id=_as_int(job_id),
            source=None if ids.get("source") is None else str(ids["source"]),
            sop_uid=None if ids.get("sop_uid") is None else str(ids["sop_uid"]),
            series_uid=None if ids.get("series_uid") is None else str(ids["series_uid"]),
            dimse_status=status,
            time=record.created,
        )

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record; never blocks, never raises."""
        try:
            if self._stopped:
                self.dropped += 1
                return
            event = self._to_event(record)
            with self._pending_lock:
                self._queue.put_nowait(event)
                self._pending += 1
        except queue.Full:
            self.dropped += 1
        except Exception as exc:  # a log call must never break the caller
            self.errors += 1
            self.last_error = exception_summary(exc)

    def _post_end(self) -> None:
        """Queue the end mark: the writer writes what is before it, then ends."""
        try:
            self._queue.put(None, timeout=5.0)
        except queue.Full:  # pragma: no cover - writer stuck on a locked database
            pass

    def _run(self) -> bool:
        """The writer loop's one pass: write queued records in batches until the end mark (returns False
        then, and the loop ends)."""
        while True:
            item = self._queue.get()
            stop = item is None
            events: list[NewEvent] = [] if item is None else [item]
            # Gather what else is queued (up to batch) so a burst costs one commit.
            while len(events) < self.batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                events.append(nxt)
            if events:
                try:
                    self.eventlog.write_many(events)
                except Exception as exc:  # e.g. BusyError after busy_timeout: drop, count
                    self.errors += 1
                    self.dropped += len(events)
                    self.last_error = exception_summary(exc)
                with self._pending_lock:
                    self._pending -= len(events)
                    self._pending_lock.notify_all()
            if stop:
                return False

    def flush(self) -> None:
        """Wait (up to 10 s) until every queued record is written or dropped."""
        self.wait_flushed(10.0)

    def wait_flushed(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written (or dropped); ``False`` on timeout."""
        deadline = _time.monotonic() + timeout
        with self._pending_lock:
            while self._pending > 0:
                remaining = deadline - _time.monotonic()
                if remaining <= 0 or not self._writer.alive:
                    return False
                self._pending_lock.wait(remaining)
        return True

    def close(self) -> None:
        """Write what is queued, stop the writer thread, detach."""
        if not self._stopped:
            self._stopped = True
            self._writer.stop(15.0)
        super().close()

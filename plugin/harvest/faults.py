"""Where a fault is: the classes job errors, events and ``GET /rtharvest/status`` name, and the health
monitor that decides them.

A failed C-MOVE says only that the source's sub-operations failed (DIMSE 0xC000, 0xA702...). The source
may be fine: when Orthanc's index (PostgreSQL) is down or its disk is full, the harvester's own C-STORE SCP
refuses what the source sends. So a failure is blamed by *checking*, not by reading the status:

* the store first (:meth:`HealthMonitor.store_fault`): Orthanc's index answers an index query over loopback
  within :data:`PROBE_TIMEOUT_S`, the storage directory exists and has ``MinFreeStorageMB`` free;
* then the source, when it could not be connected to (unreachable): a C-ECHO. A source that does not
  answer it is down; one that answers it failed this one operation. A refusal (association rejected) or a
  source that accepts and never answers is *up*: those spend attempts and end as manual-intervention items.

A store fault or a source that is down is an *outage*: the job waits (``JobState.WAITING``, the reason
and the fault class in its ``LastError``/``FaultClass``) without spending an attempt, with a backoff that
grows up to ``OutageBackoffMaxSeconds``, and resumes by itself. Everything else spends an attempt as before.

The monitor's state is what the status route shows; it is refreshed by a background probe and by the
workers, and reading it never calls Orthanc (the route answers while the index is down).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..dimse.base import SourceError, SourceErrorKind

__all__ = [
    "PROBE_TIMEOUT_S",
    "FaultClass",
    "HealthMonitor",
    "Outage",
    "SourceHealth",
    "StoreCheck",
    "fault_of_source_error",
]

#: How long an index probe over loopback may take before the index counts as unavailable.
PROBE_TIMEOUT_S = 5.0
#: An index probe younger than this is reused (many workers fail together in an outage, and a probe of an
#: index that is down takes up to :data:`PROBE_TIMEOUT_S`). The disk is checked afresh every time.
STORE_CHECK_TTL_S = 5.0


class FaultClass(StrEnum):
    """Where a failure is (stored with the job as ``FaultClass``, and in events)."""

    #: Orthanc's index (PostgreSQL, or the SQLite index file) does not answer.
    STORE_INDEX = "StoreIndex"
    #: The storage directory is missing or not writable.
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    #: The storage has less free space than ``MinFreeStorageMB``.
    DISK_FULL = "DiskFull"
    #: The harvester's own REST API on 127.0.0.1 refused or failed (Orthanc itself, not a source).
    LOOPBACK = "Loopback"
    #: The source refused or aborted the association.
    SOURCE_REFUSED = "SourceRefused"
    #: The source did not answer in time.
    SOURCE_TIMEOUT = "SourceTimeout"
    #: No connection to the source (nothing listens, network down).
    SOURCE_UNREACHABLE = "SourceUnreachable"
    #: The source answered with a failure status for this operation (it is up).
    SOURCE_FAILURE = "SourceFailure"
    #: The object is not at the source, or the request cannot succeed (no retry helps).
    NOT_AVAILABLE = "NotAvailable"
    #: A bug or an unexpected error in the harvester.
    INTERNAL = "Internal"

    @property
    def is_store(self) -> bool:
        """A fault of the harvester's own store (index, disk, loopback): no source is to blame."""
        return self in (FaultClass.STORE_INDEX, FaultClass.STORAGE_UNAVAILABLE, FaultClass.DISK_FULL,
                        FaultClass.LOOPBACK)


def fault_of_source_error(exc: SourceError) -> FaultClass:
    """The class of a source's error as the source reported it (before any health check)."""
    if exc.kind is SourceErrorKind.REFUSED:
        return FaultClass.SOURCE_REFUSED
    if exc.kind is SourceErrorKind.TIMEOUT:
        return FaultClass.SOURCE_TIMEOUT
    if exc.kind is SourceErrorKind.UNREACHABLE:
        return FaultClass.SOURCE_UNREACHABLE
    if exc.kind in (SourceErrorKind.NOT_FOUND, SourceErrorKind.BAD_REQUEST):
        return FaultClass.NOT_AVAILABLE
    if "harvester REST API" in exc.detail or "loopback credential" in exc.detail:
        return FaultClass.LOOPBACK
    return FaultClass.SOURCE_FAILURE


class Outage(Exception):
    """A job cannot run now because of an outage; it waits without spending an attempt."""

    def __init__(self, fault: FaultClass, reason: str) -> None:
        super().__init__(f"{fault.value}: {reason}")
        self.fault = fault
        self.reason = reason


@dataclass(frozen=True)
class StoreCheck:
    """One check of the harvester's store."""

    at: float
    fault: FaultClass | None
    detail: str
    free_bytes: int | None
    total_bytes: int | None


@dataclass(frozen=True)
class _IndexProbe:
    """The last probe of Orthanc's index (shared by the workers for ``STORE_CHECK_TTL_S``)."""

    at: float
    fault: FaultClass | None
    detail: str


@dataclass
class SourceHealth:
    """What the harvester last saw of one source."""

    last_contact: float | None = None
    last_error_at: float | None = None
    last_error_class: FaultClass | None = None
    last_error: str | None = None
    #: True after a failed C-ECHO, until the next successful operation.
    down: bool = False


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class HealthMonitor:
    """The harvester's view of its store and sources (thread-safe).

    ``index_probe()`` asks Orthanc's index one cheap question over loopback and raises on failure (a
    :class:`~rtharvest.edge.loopback.LoopbackError`, ``timed_out`` or with an HTTP status, when the index does
    not answer; ``status`` 0 and not timed out when nothing listens on the loopback port).
    """

    storage_directory: Path
    min_free_bytes: int
    store_index: str = "SQLite"
    index_probe: Callable[[], None] | None = None
    clock: Callable[[], float] = time.time
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _store: StoreCheck | None = field(default=None, repr=False)
    _index: _IndexProbe | None = field(default=None, repr=False)
    _sources: dict[str, SourceHealth] = field(default_factory=dict, repr=False)
    _probe_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- the store -------------------------------------------------------------------------------------

    def check_disk(self) -> tuple[FaultClass | None, str, int | None, int | None]:
        """Free space and presence of the storage directory (a ``statvfs``: never blocks on the index)."""
        path = self.storage_directory
        try:
            usage = shutil.disk_usage(path)
        except OSError as exc:
            return FaultClass.STORAGE_UNAVAILABLE, f"storage directory {path} unavailable ({exc.strerror})", None, None
        if not os.access(path, os.W_OK):
            return (FaultClass.STORAGE_UNAVAILABLE, f"storage directory {path} is not writable", usage.free,
                    usage.total)
        if usage.free < self.min_free_bytes:
            return (FaultClass.DISK_FULL, f"storage {path} has {usage.free // 2**20} MB free, less than "
                    f"MinFreeStorageMB ({self.min_free_bytes // 2**20} MB): no move starts until space is freed",
                    usage.free, usage.total)
        return None, "", usage.free, usage.total

    def check_store(self, max_age: float = STORE_CHECK_TTL_S) -> StoreCheck:
        """Check the store now: the disk every time, the index only when its last probe is older than
        ``max_age`` (at most one probe at a time).

        The disk check is a ``statvfs`` (microseconds), so it is never reused: a move must not start on the
        word of a check made before the disk filled up (``MinFreeStorageMB`` would then hold only seconds
        later, and a harvest can store a great deal in those seconds). Only the index probe, a loopback
        call of up to :data:`PROBE_TIMEOUT_S`, is shared between the workers.
        """
        fault, detail, free, total = self.check_disk()
        if fault is None and self.index_probe is not None:
            fault, detail = self._index_state(max_age)
        check = StoreCheck(self.clock(), fault, detail, free, total)
        with self._lock:
            self._store = check
        return check

    def _index_state(self, max_age: float) -> tuple[FaultClass | None, str]:
        """The index's state: the last probe's if younger than ``max_age``, else a new probe's."""
        with self._lock:
            cached = self._index
        if cached is not None and self.clock() - cached.at < max_age:
            return cached.fault, cached.detail
        with self._probe_lock:
            with self._lock:
                cached = self._index
            if cached is not None and self.clock() - cached.at < max_age:
                return cached.fault, cached.detail  # another thread probed while this one waited
            fault, detail = self._probe_index()
            with self._lock:
                self._index = _IndexProbe(self.clock(), fault, detail)
            return fault, detail

    def _probe_index(self) -> tuple[FaultClass | None, str]:
        assert self.index_probe is not None
        try:
            self.index_probe()
        except Exception as exc:
            status = getattr(exc, "status", None)
            timed_out = bool(getattr(exc, "timed_out", False))
            if status == 0 and not timed_out:
                return FaultClass.LOOPBACK, f"the harvester's own REST API on 127.0.0.1 does not answer ({exc})"
            what = f"no answer within {PROBE_TIMEOUT_S:g} s" if timed_out else str(exc)
            return FaultClass.STORE_INDEX, (f"Orthanc's index ({self.store_index}) is unavailable: {what}; "
                                            "arriving instances cannot be stored")
        return None, ""

    def store_fault(self, max_age: float = STORE_CHECK_TTL_S) -> Outage | None:
        """The store's outage now, if any (the disk checked now; the index's last probe if younger than
        ``max_age``)."""
        check = self.check_store(max_age)
        return None if check.fault is None else Outage(check.fault, check.detail)

    def last_store_check(self) -> StoreCheck | None:
        """The latest check, without checking (what the status route shows)."""
        with self._lock:
            return self._store

    # -- sources ---------------------------------------------------------------------------------------

    def source_ok(self, source: str) -> None:
        """An operation with ``source`` succeeded."""
        with self._lock:
            health = self._sources.setdefault(source, SourceHealth())
            health.last_contact = self.clock()
            health.down = False

    def source_error(self, source: str, fault: FaultClass, message: str, *, down: bool = False) -> None:
        """An operation with ``source`` failed for ``fault``; ``down``: the source does not even answer a C-ECHO."""
        with self._lock:
            health = self._sources.setdefault(source, SourceHealth())
            health.last_error_at = self.clock()
            health.last_error_class = fault
            health.last_error = message
            health.down = down

    def source_snapshot(self) -> dict[str, SourceHealth]:
        """A copy of every source's health."""
        with self._lock:
            return {name: SourceHealth(h.last_contact, h.last_error_at, h.last_error_class, h.last_error, h.down)
                    for name, h in self._sources.items()}

    # -- the status route ------------------------------------------------------------------------------

    def document(self, sources: list[str], *, scheduler_alive: bool | None, export_worker_alive: bool | None,
                 workers_alive: int, workers: int, started: bool, waiting: dict[str, Any]) -> dict[str, Any]:
        """The ``Health`` section of ``GET /rtharvest/status``: never calls Orthanc (answers in an outage).

        ``waiting``: jobs held back per fault class (from the queue).
        """
        problems: list[str] = []
        check = self.last_store_check()
        store_state = "Unknown" if check is None else ("Ok" if check.fault is None else check.fault.value)
        index_state = "Unknown" if check is None else (
            "Unavailable" if check.fault in (FaultClass.STORE_INDEX, FaultClass.LOOPBACK) else "Ok")
        if check is not None and check.fault is not None:
            problems.append(f"{check.fault.value}: {check.detail}")
        doc: dict[str, Any] = {
            "StoreIndex": {"Kind": self.store_index, "State": index_state,
                           "CheckedAt": None if check is None else _iso(check.at),
                           "Error": check.detail if check is not None and check.fault is not None else None},
            "Storage": {"Path": str(self.storage_directory), "State": store_state,
                        "FreeBytes": None if check is None else check.free_bytes,
                        "TotalBytes": None if check is None else check.total_bytes,
                        "MinFreeBytes": self.min_free_bytes},
        }
        if index_state == "Unavailable":
            doc["StoreIndex"]["CannotKnow"] = (
                "what the store holds: a manifest that must read a stored object answers 503 until the index is back, "
                "and arrivals cannot be stored; harvests, jobs, schedules, exports' state and the log are the "
                "harvester's own and current")
        snapshot = self.source_snapshot()
        doc_sources: dict[str, Any] = {}
        for name in sources:
            h = snapshot.get(name, SourceHealth())
            state = "Unknown" if h.last_contact is None and h.last_error_at is None else "Ok"
            if h.down:
                state = "Down"
            elif h.last_error_at is not None and (h.last_contact is None or h.last_error_at > h.last_contact):
                state = "Failing"
            doc_sources[name] = {"State": state, "LastContact": _iso(h.last_contact),
                                 "LastErrorAt": _iso(h.last_error_at),
                                 "LastErrorClass": h.last_error_class.value if h.last_error_class else None,
                                 "LastError": h.last_error}
            if state == "Down":
                problems.append(f"source {name} is down ({h.last_error_class.value if h.last_error_class else '?'}):"
                                f" {h.last_error}")
        doc["Sources"] = doc_sources
        doc["Scheduler"] = {"Alive": scheduler_alive}
        doc["ExportWorker"] = {"Alive": export_worker_alive}
        doc["Workers"] = {"Alive": workers_alive, "Configured": workers}
        if started and scheduler_alive is False:
            problems.append("the scheduler thread is not running: schedules do not fire")
        if started and export_worker_alive is False:
            problems.append("the export worker is not running: exports do not progress")
        if started and workers_alive < workers:
            problems.append(f"{workers_alive} of {workers} harvest workers running")
        doc["JobsWaitingForOutage"] = waiting
        doc["Problems"] = problems
        doc["Ok"] = not problems
        return doc

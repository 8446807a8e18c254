"""Durable job queue of the harvester: harvests, jobs, leases, retries and politeness to sources.

Every state transition is one SQLite transaction committed before the method returns, so a crash
(SIGKILL, power switch) never loses an enqueued job and never lets one run twice *concurrently*:

* ``enqueue`` is idempotent per ``(harvest_id, dedupe_key)`` (UNIQUE constraint), so re-running the job
  that produced follow-ups after a crash cannot duplicate them.
* ``claim`` picks and leases a job in one ``BEGIN IMMEDIATE`` transaction: two workers (threads or
  processes) are serialised on SQLite's write lock and can never lease the same job.
* a lease has an expiry; a worker that died leaves a lease that expires and is reclaimed by
  :meth:`JobQueue.claim` or :meth:`JobQueue.recover_stale_leases`. The work itself is therefore
  *at least once*: harvest jobs must be idempotent (re-retrieving an instance Orthanc already has is).

Job life cycle (``JobState``)::

    pending --claim--> leased --complete--> done
       ^                 |  \\--fail (retryable, attempts left)--> waiting --(backoff due)--> leased
       |                 |  \\--defer (an outage: source down, store unavailable)--> waiting (attempt given back)
       |                 |   \\-fail (not retryable / cap reached)--> failed --retry--> pending
       +----release------+
    pending/waiting --cancel harvest--> cancelled

An attempt is counted when a job is *claimed*, not when it fails. :meth:`JobQueue.release` gives the
attempt back (clean shutdown). A lease recovered because the harvester itself died (a restart declares
the previous run's leases dead: :meth:`JobQueue.recover_stale_leases` with ``owner_prefix``) also gives
the attempt back — the source did nothing wrong — and counts a *crash* instead: attempts count what the
source did, crashes what the harvester did. A job whose execution kills the process every time (a poison
job) still ends, FAILED once it spent :attr:`RetryPolicy.max_crashes`, with a message that says so.

Harvest states are the exact strings of the REST contract (``Running``, ``Paused``, ``Completed``,
``Cancelled``; REST also shows ``Waiting``, a ``Running`` harvest whose open jobs all wait for an outage:
computed by ``HarvestService``, never stored). Only jobs of ``Running`` harvests are claimed. A harvest
becomes ``Completed`` when no job is pending, waiting or leased (failed jobs stay listed for manual
intervention) and goes back to ``Running`` when a job is enqueued into it or a failed job is retried.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time as _time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from .db import Database, register_schema

__all__ = [
    "CRASH_BUDGET_SPENT",
    "EnqueueItem",
    "Harvest",
    "HarvestProgress",
    "HarvestState",
    "InvalidTransition",
    "Job",
    "JobQueue",
    "JobState",
    "OwnerKind",
    "QueueError",
    "RetryPolicy",
    "SourceLimits",
    "UnknownHarvest",
    "UnknownJob",
]


# -- states and records -----------------------------------------------------------------------------


class JobState(StrEnum):
    """Where a job is in its life cycle (stored as the lowercase value)."""

    PENDING = "pending"
    LEASED = "leased"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def parse(cls, value: JobState | str) -> JobState:
        """Accept a member or its value in any case (``"Failed"`` from a REST query)."""
        if isinstance(value, JobState):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown job state {value!r}; expected one of {', '.join(s.value for s in cls)}"
            ) from None


class OwnerKind(StrEnum):
    """What owns a job (and the owner row its state lives in): a harvest, or an export of one.

    The queue treats both alike (state, retries, leases, completion); the kind says whose job it is, so an
    export's jobs are never mistaken for a harvest's.
    """

    HARVEST = "harvest"
    EXPORT = "export"


class HarvestState(StrEnum):
    """Harvest state, spelled as in the REST contract."""

    RUNNING = "Running"
    PAUSED = "Paused"
    COMPLETED = "Completed"
    CANCELLED = "Cancelled"

    @classmethod
    def parse(cls, value: HarvestState | str) -> HarvestState:
        """Accept a member or its value in any case."""
        if isinstance(value, HarvestState):
            return value
        for member in cls:
            if member.value.lower() == str(value).lower():
                return member
        raise ValueError(
            f"unknown harvest state {value!r}; expected one of {', '.join(s.value for s in cls)}"
        )


# Jobs that still have work ahead of them: a harvest with any of these is not finished.
_OPEN_STATES = (JobState.PENDING.value, JobState.WAITING.value, JobState.LEASED.value)

# Harvest transitions allowed through set_harvest_state (same-state requests are accepted as no-ops).
_HARVEST_TRANSITIONS: dict[HarvestState, frozenset[HarvestState]] = {
    HarvestState.RUNNING: frozenset({HarvestState.PAUSED, HarvestState.COMPLETED, HarvestState.CANCELLED}),
    HarvestState.PAUSED: frozenset({HarvestState.RUNNING, HarvestState.CANCELLED}),
    HarvestState.COMPLETED: frozenset({HarvestState.RUNNING}),
    HarvestState.CANCELLED: frozenset(),
}


class QueueError(Exception):
    """Base class of the queue's errors."""


class UnknownHarvest(QueueError, LookupError):
    """No harvest has this id."""

    def __init__(self, harvest_id: str) -> None:
        super().__init__(f"unknown harvest {harvest_id!r}; list harvests with GET /rtharvest/harvests")
        self.harvest_id = harvest_id


class UnknownJob(QueueError, LookupError):
    """No job has this id."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"unknown job {job_id!r}; list jobs with GET /rtharvest/jobs")
        self.job_id = job_id


class InvalidTransition(QueueError):
    """The requested transition is not allowed from the current state (or the lease was lost)."""


@dataclass(frozen=True)
class Job:
    """A job as stored. Times are epoch seconds (the queue's clock)."""

    id: int
    #: The owner's ID: a harvest's or an export's (see ``owner_kind``).
    owner_id: str
    kind: str
    source: str
    payload: dict[str, Any]
    dedupe_key: str
    priority: int
    state: JobState
    attempts: int
    max_attempts: int
    next_attempt_at: float
    lease_owner: str | None
    lease_expires_at: float | None
    last_error: str | None
    dimse_status: int | None
    created_at: float
    updated_at: float
    note: str | None = None
    #: Times the harvester stopped (crash, kill) while this job was leased; not counted in ``attempts``.
    crashes: int = 0
    #: Where the last failure was (a :class:`rtharvest.harvest.faults.FaultClass` value), cleared on success.
    fault: str | None = None
    #: Consecutive times the job was held back by an outage (its backoff grows with it); 0 after a success.
    outages: int = 0
    owner_kind: OwnerKind = OwnerKind.HARVEST

    @property
    def harvest_id(self) -> str:
        """The harvest this job belongs to (read-only alias of ``owner_id``, for harvest-owned jobs only)."""
        if self.owner_kind is not OwnerKind.HARVEST:
            raise ValueError(f"job {self.id} belongs to an {self.owner_kind.value}, not a harvest")
        return self.owner_id


@dataclass(frozen=True)
class Harvest:
    """A harvest as stored."""

    id: str
    source: str
    label: str
    params: dict[str, Any]
    state: HarvestState
    created_at: float
    updated_at: float
    #: Whether this owner row is a harvest or an export (an export's state lives in the same table).
    owner_kind: OwnerKind = OwnerKind.HARVEST


@dataclass(frozen=True)
class HarvestProgress:
    """Job counts of one harvest. ``running`` counts leased jobs."""

    total: int
    done: int
    pending: int
    running: int
    failed: int
    waiting: int
    cancelled: int

    def as_contract(self) -> dict[str, int]:
        """The ``Progress`` object of ``GET /rtharvest/harvests/{id}`` (waiting jobs count as pending)."""
        return {
            "JobsTotal": self.total,
            "JobsDone": self.done,
            "JobsPending": self.pending + self.waiting,
            "JobsRunning": self.running,
            "JobsFailed": self.failed,
        }


@dataclass(frozen=True)
class EnqueueItem:
    """One job to enqueue (for :meth:`JobQueue.enqueue_many` and ``complete(..., follow_ups=...)``)."""

    harvest_id: str
    kind: str
    source: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    dedupe_key: str | None = None
    priority: int = 0


# -- policy -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how fast a failing job is retried.

    Delay before attempt ``n + 1`` after ``n`` failed attempts: ``base_delay * factor ** (n - 1)``, capped
    at ``max_delay``, times a random factor in ``[1 - jitter, 1 + jitter]`` (and capped again) so that
    jobs that failed together (a source restart) do not all come back in the same second.
    """

    max_attempts: int = 10
    #: Harvester restarts a job may live through (its lease recovered as dead) before it fails for good.
    max_crashes: int = 50
    base_delay: float = 5.0
    factor: float = 2.0
    max_delay: float = 600.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if not isinstance(self.max_crashes, int) or self.max_crashes < 1:
            raise ValueError(f"max_crashes must be an integer >= 1, got {self.max_crashes!r}")
        if self.base_delay < 0:
            raise ValueError(f"base_delay must be >= 0 seconds, got {self.base_delay!r}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")
        if self.max_delay < self.base_delay:
            raise ValueError(f"max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``attempts`` (>= 1) failed attempts."""
        n = max(1, attempts)
        # Cap the exponent before computing: factor ** 10_000 would overflow a float.
        try:
            raw = self.base_delay * self.factor ** (n - 1)
        except OverflowError:
            raw = self.max_delay
        base = min(self.max_delay, raw)
        if self.jitter and rng is not None:
            base *= 1 + rng.uniform(-self.jitter, self.jitter)
        return max(0.0, min(self.max_delay, base))


@dataclass(frozen=True)
class SourceLimits:
    """Politeness towards one source (a DICOM modality).

    ``max_concurrent``: leased jobs at once against this source, over all workers and processes.
    ``quiet_hours``: ``(start, end)`` daily window during which no job for this source is started and
    no association to it is opened (jobs already talking to it finish their current operation).
    ``end < start`` wraps midnight: ``(22:00, 06:00)``. ``time_zone``: the IANA zone the times are
    in (``None``: the queue's local time, by default the machine's).
    """

    max_concurrent: int = 2
    quiet_hours: tuple[dtime, dtime] | None = None
    time_zone: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_concurrent, int) or self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {self.max_concurrent!r}")
        if self.quiet_hours is not None:
            start, end = self.quiet_hours
            if not isinstance(start, dtime) or not isinstance(end, dtime):
                raise ValueError("quiet_hours must be a pair of datetime.time")
            if start == end:
                raise ValueError("quiet_hours start and end are equal: say None for no quiet hours")

    def is_quiet(self, now: dtime) -> bool:
        """Whether ``now`` (local time of day) is inside the quiet window: ``start <= now < end``."""
        if self.quiet_hours is None:
            return False
        start, end = self.quiet_hours
        now = now.replace(tzinfo=None)
        if start < end:
            return start <= now < end
        return now >= start or now < end  # wraps midnight

    def _zone(self) -> ZoneInfo | None:
        return ZoneInfo(self.time_zone) if self.time_zone else None

    def time_of_day(self, ts: float, local_time: Callable[[float], dtime]) -> dtime:
        """Time of day at epoch ``ts`` in this source's time zone (``local_time`` when it has none)."""
        zone = self._zone()
        return datetime.fromtimestamp(ts, zone).time() if zone is not None else local_time(ts)

    def quiet_at(self, ts: float, local_time: Callable[[float], dtime]) -> bool:
        """Whether epoch ``ts`` falls in the quiet hours."""
        return self.quiet_hours is not None and self.is_quiet(self.time_of_day(ts, local_time))

    def quiet_until(self, ts: float, local_time: Callable[[float], dtime]) -> float | None:
        """Epoch seconds when the quiet hours around ``ts`` end, or None when ``ts`` is not quiet."""
        if self.quiet_hours is None or not self.quiet_at(ts, local_time):
            return None
        now = self.time_of_day(ts, local_time)
        end = self.quiet_hours[1]
        # Seconds from now to the next ``end`` on the wall clock (within a day; DST shifts are absorbed
        # by the caller checking again when the moment comes).
        seconds = ((end.hour * 3600 + end.minute * 60) - (now.hour * 3600 + now.minute * 60 + now.second)) % 86400
        return ts + float(seconds or 86400)


def _local_time_of(ts: float) -> dtime:
    return datetime.fromtimestamp(ts).time()


# -- schema -----------------------------------------------------------------------------------------

register_schema(
    "jobqueue",
    1,
    [
        """CREATE TABLE harvests (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            params TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL CHECK (state IN ('Running', 'Paused', 'Completed', 'Cancelled')),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            harvest_id TEXT NOT NULL REFERENCES harvests(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            source TEXT NOT NULL,
            payload TEXT NOT NULL DEFAULT '{}',
            dedupe_key TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'leased', 'waiting', 'done', 'failed', 'cancelled')),
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            lease_owner TEXT,
            lease_expires_at REAL,
            last_error TEXT,
            dimse_status INTEGER,
            note TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (harvest_id, dedupe_key)
        )""",
        # claim(): walk runnable jobs already in claim order and stop at the first eligible one. Partial,
        # so the done/failed millions of a long harvest do not weigh on it.
        """CREATE INDEX jobs_runnable ON jobs (priority DESC, next_attempt_at, id)
            WHERE state IN ('pending', 'waiting')""",
        # claim(): leased jobs per source (politeness) and expired leases; both tiny partial indexes.
        "CREATE INDEX jobs_leased_source ON jobs (source) WHERE state = 'leased'",
        "CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE state = 'leased'",
        # counts/progress/list per harvest and state; is_harvest_finished.
        "CREATE INDEX jobs_harvest_state ON jobs (harvest_id, state)",
        "CREATE INDEX jobs_state ON jobs (state)",
        "CREATE INDEX harvests_created ON harvests (created_at)",
    ],
)
# A schema of its own (not "jobqueue" version 2), so it cannot collide with other additions to the queue.
register_schema("jobqueue_crashes", 1, ["ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0"])
# Where a failure is, and how often in a row an outage held the job back (see JobQueue.defer).
register_schema("jobqueue_faults", 1, ["ALTER TABLE jobs ADD COLUMN fault TEXT",
                                       "ALTER TABLE jobs ADD COLUMN outages INTEGER NOT NULL DEFAULT 0"])

# Who owns a job: until this step every owner row was taken for a harvest, though an export service's
# queue holds exports. Existing rows are harvests, except those whose jobs are an export's send or verify
# (the export service's job kinds, named here once for this step): their owner is an export.
register_schema("jobqueue_owner", 1, [
    "ALTER TABLE harvests ADD COLUMN owner_kind TEXT NOT NULL DEFAULT 'harvest'"
    " CHECK (owner_kind IN ('harvest', 'export'))",
    "ALTER TABLE jobs ADD COLUMN owner_kind TEXT NOT NULL DEFAULT 'harvest'"
    " CHECK (owner_kind IN ('harvest', 'export'))",
    "UPDATE jobs SET owner_kind = 'export' WHERE kind IN ('ExportSend', 'ExportVerify')",
    "UPDATE harvests SET owner_kind = 'export' WHERE id IN (SELECT harvest_id FROM jobs WHERE owner_kind = 'export')",
])

#: ``last_error`` prefix of a job failed because the harvester kept dying while running it (the manifest
#: reports it as the harvester's failure, never the source's).
CRASH_BUDGET_SPENT = "harvester stopped"

_JOB_COLUMNS = (
    "id, harvest_id, kind, source, payload, dedupe_key, priority, state, attempts, max_attempts,"
    " next_attempt_at, lease_owner, lease_expires_at, last_error, dimse_status, created_at, updated_at,"
    " note, crashes, fault, outages, owner_kind"
)
_HARVEST_COLUMNS = "id, source, label, params, state, created_at, updated_at, owner_kind"

# Statements are constants: the only variable parts are bound parameters.
_SELECT_JOB = "SELECT " + _JOB_COLUMNS + " FROM jobs WHERE id = ?"  # noqa: S608 - constant text
_SELECT_HARVEST = "SELECT " + _HARVEST_COLUMNS + " FROM harvests WHERE id = ?"  # noqa: S608

# The claim: runnable, due, harvest running, kind wanted, source neither saturated nor quiet. Lists are
# passed as one JSON array parameter and expanded with json_each, so the statement text never changes
# (one cached prepared statement) and no value is ever spliced into it.
_CLAIM_PICK = (
    "SELECT j.id FROM jobs AS j INDEXED BY jobs_runnable"
    " JOIN harvests AS h ON h.id = j.harvest_id"
    " WHERE j.state IN ('pending', 'waiting') AND j.next_attempt_at <= :now AND h.state = 'Running'"
    "  AND (:kinds IS NULL OR j.kind IN (SELECT value FROM json_each(:kinds)))"
    "  AND j.source NOT IN (SELECT value FROM json_each(:blocked))"
    "  AND (:allowed IS NULL OR j.source IN (SELECT value FROM json_each(:allowed)))"
    " ORDER BY j.priority DESC, j.next_attempt_at, j.id LIMIT 1"
)


def _returning_job(sql: str) -> str:
    """``sql`` (a constant UPDATE) returning the job's columns in :data:`_JOB_COLUMNS` order."""
    return sql + " RETURNING " + _JOB_COLUMNS


_CLAIM_SET = _returning_job(
    "UPDATE jobs SET state = 'leased', attempts = attempts + 1, lease_owner = :owner,"
    " lease_expires_at = :expires, updated_at = :now WHERE id = :id"
)


def _default_dedupe_key(kind: str, source: str, payload: Mapping[str, Any]) -> str:
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(f"{kind}\x00{source}\x00{canon}".encode()).hexdigest()[:32]
    return f"{kind}:{digest}"


def _row_to_job(row: tuple[Any, ...]) -> Job:
    return Job(
        id=int(row[0]),
        owner_id=row[1],
        kind=row[2],
        source=row[3],
        payload=json.loads(row[4]) if row[4] else {},
        dedupe_key=row[5],
        priority=int(row[6]),
        state=JobState(row[7]),
        attempts=int(row[8]),
        max_attempts=int(row[9]),
        next_attempt_at=float(row[10]),
        lease_owner=row[11],
        lease_expires_at=None if row[12] is None else float(row[12]),
        last_error=row[13],
        dimse_status=None if row[14] is None else int(row[14]),
        created_at=float(row[15]),
        updated_at=float(row[16]),
        note=row[17],
        crashes=int(row[18]),
        fault=row[19],
        outages=int(row[20]),
        owner_kind=OwnerKind(row[21]),
    )


def _row_to_harvest(row: tuple[Any, ...]) -> Harvest:
    return Harvest(
        id=row[0],
        source=row[1],
        label=row[2],
        params=json.loads(row[3]) if row[3] else {},
        state=HarvestState(row[4]),
        created_at=float(row[5]),
        updated_at=float(row[6]),
        owner_kind=OwnerKind(row[7]),
    )


# -- the queue --------------------------------------------------------------------------------------


class JobQueue:
    """Harvests and their jobs in a :class:`~rtharvest.store.db.Database`.

    ``limits`` maps source names to their :class:`SourceLimits`; other sources get ``default_limits``.
    ``clock`` gives epoch seconds (inject a fake one in tests); ``local_time`` turns epoch seconds into
    the local time of day used for quiet hours (default: the machine's local time zone).
    Safe to share between threads; several processes may open queues on the same file.
    """

    def __init__(
        self,
        db: Database,
        policy: RetryPolicy | None = None,
        limits: Mapping[str, SourceLimits] | None = None,
        default_limits: SourceLimits | None = None,
        clock: Callable[[], float] = _time.time,
        local_time: Callable[[float], dtime] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.policy = policy or RetryPolicy()
        self.limits: dict[str, SourceLimits] = dict(limits or {})
        self.default_limits = default_limits or SourceLimits()
        self.clock = clock
        self.local_time = local_time or _local_time_of
        self._rng = rng or random.Random()
        db.migrate()  # in case this module was imported after the Database was opened

    def limits_for(self, source: str) -> SourceLimits:
        """The politeness settings that apply to ``source``."""
        return self.limits.get(source, self.default_limits)

    # -- harvests ----------------------------------------------------------------------------------

    def create_harvest(
        self, source: str, label: str = "", params: Mapping[str, Any] | None = None,
        seed: Callable[[str], Iterable[EnqueueItem]] | None = None,
    ) -> Harvest:
        """Create a ``Running`` harvest with a fresh random id (16 hex digits).

        ``seed(harvest_id)`` gives its first jobs, enqueued in the same transaction: a crash can never
        leave a harvest Running without jobs.
        """
        return self.create_owner(OwnerKind.HARVEST, source, label, params, seed)

    def create_owner(
        self, owner_kind: OwnerKind, source: str, label: str = "", params: Mapping[str, Any] | None = None,
        seed: Callable[[str], Iterable[EnqueueItem]] | None = None,
    ) -> Harvest:
        """Create a ``Running`` owner of jobs (a harvest, or an export: ``source`` is then its destination)
        with a fresh random id; its jobs carry its kind. See :meth:`create_harvest`."""
        if not source:
            raise ValueError(f"an {owner_kind.value} needs a source" if owner_kind is OwnerKind.EXPORT
                             else "a harvest needs a source (a DicomModalities name)")
        now = self.clock()
        params_json = json.dumps(dict(params or {}), sort_keys=True, default=str)
        while True:
            hid = secrets.token_hex(8)
            with self.db.transaction():
                if self.db.query_one("SELECT 1 FROM harvests WHERE id = ?", (hid,)) is not None:
                    continue  # 2**64 ids: practically never, but never overwrite
                self.db.execute(
                    "INSERT INTO harvests (id, source, label, params, state, created_at, updated_at, owner_kind)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (hid, source, label or "", params_json, HarvestState.RUNNING.value, now, now, owner_kind.value),
                )
                if seed is not None:
                    self._enqueue_in_tx(seed(hid))
                    self._update_completion(hid)
            return Harvest(hid, source, label or "", json.loads(params_json), HarvestState.RUNNING, now, now,
                           owner_kind)

    def get_harvest(self, harvest_id: str) -> Harvest:
        """The harvest, or :class:`UnknownHarvest`."""
        row = self.db.query_one(_SELECT_HARVEST, (harvest_id,))
        if row is None:
            raise UnknownHarvest(harvest_id)
        return _row_to_harvest(row)

    def list_harvests(
        self, state: HarvestState | str | None = None, limit: int = 1000, offset: int = 0
    ) -> list[Harvest]:
        """Harvests, newest first, optionally of one state."""
        st = None if state is None else HarvestState.parse(state).value
        rows = self.db.query(
            "SELECT " + _HARVEST_COLUMNS + " FROM harvests"  # noqa: S608 - constant text
            " WHERE (:st IS NULL OR state = :st) ORDER BY created_at DESC, rowid DESC"
            " LIMIT :limit OFFSET :offset",
            {"st": st, "limit": _nonneg(limit, "limit"), "offset": _nonneg(offset, "offset")},
        )
        return [_row_to_harvest(r) for r in rows]

    def _harvest_state(self, harvest_id: str) -> HarvestState:
        value = self.db.scalar("SELECT state FROM harvests WHERE id = ?", (harvest_id,))
        if value is None:
            raise UnknownHarvest(harvest_id)
        return HarvestState(value)

    def _write_harvest_state(self, harvest_id: str, state: HarvestState) -> None:
        self.db.execute(
            "UPDATE harvests SET state = ?, updated_at = ? WHERE id = ?",
            (state.value, self.clock(), harvest_id),
        )

    def set_harvest_state(self, harvest_id: str, state: HarvestState | str) -> Harvest:
        """Move a harvest to ``state`` if the transition is allowed (same state: no-op).

        Allowed: Running -> Paused/Completed/Cancelled, Paused -> Running/Cancelled, Completed ->
        Running. Cancelling also cancels the harvest's pending and waiting jobs (leased ones finish).
        Resuming re-checks completion (a harvest with nothing left becomes Completed).
        """
        target = HarvestState.parse(state)
        with self.db.transaction():
            current = self._harvest_state(harvest_id)
            if target != current:
                if target not in _HARVEST_TRANSITIONS[current]:
                    raise InvalidTransition(
                        f"harvest {harvest_id} is {current.value}; it cannot become {target.value}"
                    )
                if target == HarvestState.COMPLETED and not self._finished(harvest_id):
                    raise InvalidTransition(
                        f"harvest {harvest_id} still has pending, waiting or running jobs"
                    )
                self._write_harvest_state(harvest_id, target)
                if target == HarvestState.CANCELLED:
                    now = self.clock()
                    self.db.execute(
                        "UPDATE jobs SET state = 'cancelled', updated_at = ?"
                        " WHERE harvest_id = ? AND state IN ('pending', 'waiting')",
                        (now, harvest_id),
                    )
                elif target == HarvestState.RUNNING:
                    self._update_completion(harvest_id)
            return self.get_harvest(harvest_id)

    def pause(self, harvest_id: str) -> Harvest:
        """Stop starting jobs of this harvest (running ones finish). Pausing a paused harvest is a no-op."""
        return self.set_harvest_state(harvest_id, HarvestState.PAUSED)

    def resume(self, harvest_id: str) -> Harvest:
        """Let a paused harvest run again (it may become Completed at once if nothing is left)."""
        return self.set_harvest_state(harvest_id, HarvestState.RUNNING)

    def cancel(self, harvest_id: str) -> Harvest:
        """Cancel a harvest and its pending/waiting jobs; leased jobs finish and record their outcome."""
        return self.set_harvest_state(harvest_id, HarvestState.CANCELLED)

    def _finished(self, harvest_id: str) -> bool:
        row = self.db.query_one(
            "SELECT 1 FROM jobs WHERE harvest_id = ? AND state IN (?, ?, ?) LIMIT 1",
            (harvest_id, *_OPEN_STATES),
        )
        return row is None

    def has_pending(self) -> bool:
        """Whether any job waits to run (pending or waiting, due or not, of any harvest)."""
        return self.db.query_one("SELECT 1 FROM jobs WHERE state IN ('pending', 'waiting') LIMIT 1") is not None

    def is_harvest_finished(self, harvest_id: str) -> bool:
        """No job of the harvest is pending, waiting or leased."""
        self._harvest_state(harvest_id)
        return self._finished(harvest_id)

    def _update_completion(self, harvest_id: str) -> bool:
        if self._harvest_state(harvest_id) == HarvestState.RUNNING and self._finished(harvest_id):
            self._write_harvest_state(harvest_id, HarvestState.COMPLETED)
            return True
        return False

    def update_completion(self, harvest_id: str) -> Harvest:
        """Move a Running harvest with nothing left to do to Completed; returns the harvest.

        Called automatically after complete/fail/cancel; call it yourself after a harvest's planning
        step if it enqueued nothing.
        """
        with self.db.transaction():
            self._update_completion(harvest_id)
            return self.get_harvest(harvest_id)

    # -- enqueue -----------------------------------------------------------------------------------

    def enqueue(
        self,
        harvest_id: str,
        kind: str,
        source: str,
        payload: Mapping[str, Any] | None = None,
        dedupe_key: str | None = None,
        priority: int = 0,
    ) -> tuple[int, bool]:
        """Add a job; returns ``(job_id, created)``.

        The same ``(harvest_id, dedupe_key)`` yields the existing job and ``created=False`` whatever its
        state. ``dedupe_key=None`` derives one from kind, source and payload. Enqueueing into a Completed
        harvest sets it back to Running; into a Cancelled harvest the job is recorded as cancelled (a
        worker finishing its last job after a cancel must not crash on its follow-ups).
        """
        item = EnqueueItem(harvest_id, kind, source, payload or {}, dedupe_key, priority)
        return self.enqueue_many([item])[0]

    def enqueue_many(self, items: Iterable[EnqueueItem]) -> list[tuple[int, bool]]:
        """Enqueue several jobs in ONE transaction (one commit: far faster than one by one)."""
        with self.db.transaction():
            return self._enqueue_in_tx(items)

    def _enqueue_in_tx(self, items: Iterable[EnqueueItem]) -> list[tuple[int, bool]]:
        now = self.clock()
        results: list[tuple[int, bool]] = []
        states: dict[str, HarvestState] = {}
        for item in items:
            if not item.kind or not item.source:
                raise ValueError("a job needs a kind and a source")
            state = states.get(item.harvest_id)
            if state is None:
                state = self._harvest_state(item.harvest_id)
                if state == HarvestState.COMPLETED:
                    self._write_harvest_state(item.harvest_id, HarvestState.RUNNING)
                    state = HarvestState.RUNNING
                states[item.harvest_id] = state
            job_state = JobState.CANCELLED if state == HarvestState.CANCELLED else JobState.PENDING
            payload = dict(item.payload)
            key = item.dedupe_key or _default_dedupe_key(item.kind, item.source, payload)
            row = self.db.query_one(
                "INSERT INTO jobs (harvest_id, kind, source, payload, dedupe_key, priority, state,"
                " attempts, max_attempts, next_attempt_at, created_at, updated_at, owner_kind)"
                " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10, ?11,"
                "  (SELECT owner_kind FROM harvests WHERE id = ?1))"  # a job is of its owner's kind
                " ON CONFLICT (harvest_id, dedupe_key) DO NOTHING RETURNING id",
                (
                    item.harvest_id,
                    item.kind,
                    item.source,
                    json.dumps(payload, sort_keys=True, default=str),
                    key,
                    int(item.priority),
                    job_state.value,
                    self.policy.max_attempts,
                    now,
                    now,
                    now,
                ),
            )
            if row is not None:
                results.append((int(row[0]), True))
            else:
                existing = self.db.scalar(
                    "SELECT id FROM jobs WHERE harvest_id = ? AND dedupe_key = ?", (item.harvest_id, key)
                )
                results.append((int(existing), False))
        # A harvest reopened above but whose items were all duplicates of finished jobs: close it again.
        for hid, state in states.items():
            if state == HarvestState.RUNNING:
                self._update_completion(hid)
        return results

    # -- claim / lease -----------------------------------------------------------------------------

    def _blocked_sources(self, now: float) -> tuple[list[str], list[str] | None]:
        """Sources not to start a job for now, and (if the default is quiet) the only allowed ones."""
        blocked: set[str] = set()
        for source, leased in self.db.query(
            "SELECT source, count(*) FROM jobs WHERE state = 'leased' GROUP BY source"
        ):
            if leased >= self.limits_for(source).max_concurrent:
                blocked.add(source)
        allowed: list[str] | None = None
        for source, lim in self.limits.items():
            if lim.quiet_at(now, self.local_time):
                blocked.add(source)
        if self.default_limits.quiet_at(now, self.local_time):
            # Every source without its own limits is quiet: only explicitly configured ones may run.
            allowed = [s for s, lim in self.limits.items() if s not in blocked]
        return sorted(blocked), allowed

    def claim(
        self, owner: str, lease_seconds: float = 300.0, kinds: Iterable[str] | None = None
    ) -> Job | None:
        """Lease the next job for ``owner``, or ``None`` if nothing is eligible now.

        One IMMEDIATE transaction: expired leases are reclaimed, then the highest-priority, oldest-due
        pending/waiting job is taken whose harvest is Running, whose kind is in ``kinds`` (if given),
        and whose source is below its concurrency limit and outside its quiet hours. Its attempts are
        incremented and it becomes LEASED by ``owner`` until ``now + lease_seconds``; extend with
        :meth:`heartbeat`.
        """
        if not owner:
            raise ValueError("claim needs an owner (e.g. 'host:pid:thread')")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        kinds_json = None if kinds is None else json.dumps(sorted(set(kinds)))
        with self.db.transaction():
            now = self.clock()
            self._reclaim_expired(now)
            blocked, allowed = self._blocked_sources(now)
            if allowed is not None and not allowed:
                return None
            job_id = self.db.scalar(
                _CLAIM_PICK,
                {
                    "now": now,
                    "kinds": kinds_json,
                    "blocked": json.dumps(blocked),
                    "allowed": None if allowed is None else json.dumps(allowed),
                },
            )
            if job_id is None:
                return None
            row = self.db.query_one(
                _CLAIM_SET, {"owner": owner, "expires": now + lease_seconds, "now": now, "id": job_id}
            )
            assert row is not None  # we hold the write lock: the row cannot have vanished
            return _row_to_job(row)

    def _reclaim_expired(self, now: float, owner_prefix: str | None = None) -> int:
        """Expired (or declared dead) leases: back to pending, or failed once a budget is spent.

        A lease that merely *expired* (its worker may be alive but stuck on a source) counts as the attempt
        it was: failed at the attempts cap. A lease *declared dead* (``owner_prefix``: its process is known
        to be gone) gives the attempt back and counts a crash instead: failed at ``max_crashes``. Jobs of
        cancelled harvests become cancelled instead.
        """
        expired = {
            int(r[0])
            for r in self.db.query(
                "SELECT id FROM jobs WHERE state = 'leased' AND lease_expires_at <= ?", (now,)
            )
        }
        dead: set[int] = set()
        if owner_prefix is not None:
            # Compared in Python, not with LIKE/substr: no wildcard or NUL in a prefix can widen the match.
            dead = {
                int(jid)
                for jid, owner in self.db.query("SELECT id, lease_owner FROM jobs WHERE state = 'leased'")
                if isinstance(owner, str) and owner.startswith(owner_prefix)
            }
        expired -= dead
        if not expired and not dead:
            return 0  # the common case costs one probe of a tiny partial index
        n = 0
        if expired:
            n += self.db.execute(
                "UPDATE jobs SET"
                " state = CASE"
                "   WHEN (SELECT state FROM harvests WHERE id = jobs.harvest_id) = 'Cancelled' THEN 'cancelled'"
                "   WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,"
                " last_error = CASE WHEN attempts >= max_attempts"
                "   THEN 'lease of ' || coalesce(lease_owner, '?') || ' expired after ' || attempts"
                "        || ' attempts (worker stuck?); attempts cap reached' ELSE last_error END,"
                " next_attempt_at = :now, lease_owner = NULL, lease_expires_at = NULL, updated_at = :now"
                " WHERE state = 'leased' AND id IN (SELECT value FROM json_each(:ids))",
                {"now": now, "ids": json.dumps(sorted(expired))},
            )
        if dead:
            n += self.db.execute(
                "UPDATE jobs SET crashes = crashes + 1, attempts = max(attempts - 1, 0),"
                " state = CASE"
                "   WHEN (SELECT state FROM harvests WHERE id = jobs.harvest_id) = 'Cancelled' THEN 'cancelled'"
                "   WHEN crashes + 1 >= :max_crashes THEN 'failed' ELSE 'pending' END,"
                " last_error = CASE WHEN crashes + 1 >= :max_crashes"
                "   THEN :prefix || ' ' || (crashes + 1) || ' times while running this job (crash budget'"
                "        || ' spent; not a failure of the source: find what stops the harvester)'"
                "   ELSE last_error END,"
                " next_attempt_at = :now, lease_owner = NULL, lease_expires_at = NULL, updated_at = :now"
                " WHERE state = 'leased' AND id IN (SELECT value FROM json_each(:ids))",
                {"now": now, "ids": json.dumps(sorted(dead)), "max_crashes": self.policy.max_crashes,
                 "prefix": CRASH_BUDGET_SPENT},
            )
        return n

    def recover_stale_leases(self, owner_prefix: str | None = None) -> int:
        """Return expired leases to pending (failed if the attempts cap is spent); call on startup.

        ``owner_prefix``: additionally reclaim every lease whose owner starts with it, expired or not —
        pass this process's node name on startup when its previous incarnation is known to be dead
        (e.g. the only Orthanc using this file restarted), so its jobs do not wait for the lease expiry.
        ``""`` reclaims every lease (this process holds the database alone and its workers have not started).
        Returns the number of jobs reclaimed. Harvests left with nothing to do are completed.
        """
        with self.db.transaction():
            n = self._reclaim_expired(self.clock(), owner_prefix)
            if n:
                for (hid,) in self.db.query("SELECT id FROM harvests WHERE state = 'Running'"):
                    self._update_completion(hid)
            return n

    def _leased_job(self, job_id: int, owner: str) -> Job:
        """The job, checked to be leased by ``owner`` (an expired but not reclaimed lease still counts:
        the work was done and nobody else has it)."""
        row = self.db.query_one(_SELECT_JOB, (job_id,))
        if row is None:
            raise UnknownJob(job_id)
        job = _row_to_job(row)
        if job.state != JobState.LEASED or job.lease_owner != owner:
            holder = f" by {job.lease_owner}" if job.lease_owner else ""
            raise InvalidTransition(
                f"job {job_id} is {job.state.value}{holder}, not leased by {owner}: the lease was lost "
                "(expired and reclaimed, or the harvest was cancelled); drop the result"
            )
        return job

    def heartbeat(self, job_id: int, owner: str, lease_seconds: float = 300.0) -> float:
        """Extend ``owner``'s lease to ``now + lease_seconds``; returns the new expiry.

        Raises :class:`InvalidTransition` if the lease was lost: the worker should stop that job.
        """
        with self.db.transaction():
            self._leased_job(job_id, owner)
            expires = self.clock() + lease_seconds
            self.db.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE id = ?",
                (expires, self.clock(), job_id),
            )
            return expires

    def complete(
        self,
        job_id: int,
        owner: str,
        note: str | None = None,
        follow_ups: Iterable[EnqueueItem] = (),
    ) -> Job:
        """Mark a leased job DONE.

        ``follow_ups`` are enqueued in the same transaction, so a crash can never record the job as done
        while losing the jobs it discovered. (Enqueueing them *before* completing is equally safe,
        thanks to dedupe; completing first and enqueueing after is not.)
        """
        with self.db.transaction():
            job = self._leased_job(job_id, owner)
            if follow_ups:
                self._enqueue_in_tx(follow_ups)
            now = self.clock()
            row = self.db.query_one(
                _returning_job(
                    # A success clears the previous attempts' error (their history stays in the log).
                    "UPDATE jobs SET state = 'done', lease_owner = NULL, lease_expires_at = NULL,"
                    " last_error = NULL, dimse_status = NULL, fault = NULL, outages = 0,"
                    " note = ?, updated_at = ? WHERE id = ?"
                ),
                (note, now, job_id),
            )
            assert row is not None
            self._update_completion(job.owner_id)
            return _row_to_job(row)

    def fail(
        self,
        job_id: int,
        owner: str,
        error: str,
        dimse_status: int | None = None,
        retryable: bool = True,
        fault: str | None = None,
    ) -> Job:
        """Record a failed attempt of a leased job.

        Retryable with attempts left: WAITING until the backoff delay has passed. Otherwise (not
        retryable, e.g. the object does not exist at the source; or the attempts cap reached): FAILED
        with ``error`` as the reason, a manual-intervention item that :meth:`retry` can restart.
        ``error`` must not contain PHI: name objects by UID.
        """
        with self.db.transaction():
            job = self._leased_job(job_id, owner)
            now = self.clock()
            harvest_state = self._harvest_state(job.owner_id)
            if not retryable or job.attempts >= job.max_attempts:
                state, next_at = JobState.FAILED, now
                if retryable:
                    error = f"{error} (gave up after {job.attempts} attempts)"
            elif harvest_state == HarvestState.CANCELLED:
                state, next_at = JobState.CANCELLED, now
            else:
                state, next_at = JobState.WAITING, now + self.policy.delay(job.attempts, self._rng)
            row = self.db.query_one(
                _returning_job(
                    "UPDATE jobs SET state = ?, next_attempt_at = ?, last_error = ?, dimse_status = ?,"
                    " fault = ?, outages = 0, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
                    " WHERE id = ?"
                ),
                (state.value, next_at, error, dimse_status, fault, now, job_id),
            )
            assert row is not None
            self._update_completion(job.owner_id)
            return _row_to_job(row)

    def release(self, job_id: int, owner: str, not_before: float | None = None, note: str | None = None) -> Job:
        """Give a leased job back without counting the attempt (clean shutdown, quiet hours began).

        ``not_before`` (epoch seconds) keeps it from being claimed earlier (e.g. the end of a source's
        quiet hours); ``note`` replaces its last error so the jobs list says why it waits.
        """
        with self.db.transaction():
            job = self._leased_job(job_id, owner)
            now = self.clock()
            cancelled = self._harvest_state(job.owner_id) == HarvestState.CANCELLED
            due = now if not_before is None else max(now, not_before)
            row = self.db.query_one(
                _returning_job(
                    "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), lease_owner = NULL,"
                    " lease_expires_at = NULL, next_attempt_at = ?, last_error = coalesce(?, last_error),"
                    " updated_at = ? WHERE id = ?"
                ),
                (
                    (JobState.CANCELLED if cancelled else JobState.PENDING).value,
                    due if not_before is not None else min(job.next_attempt_at, now),
                    note,
                    now,
                    job_id,
                ),
            )
            assert row is not None
            if cancelled:
                self._update_completion(job.owner_id)
            return _row_to_job(row)

    def defer(self, job_id: int, owner: str, fault: str, reason: str, max_delay: float) -> Job:
        """Hold a leased job back for an outage (a source down, the store unavailable) without spending
        the attempt: WAITING, due after a backoff that doubles with each consecutive outage of this job
        (``policy.base_delay`` first) up to ``max_delay``; ``reason`` becomes its last error and ``fault``
        its fault class, so the jobs list and the harvest say why it waits. It resumes by itself."""
        with self.db.transaction():
            job = self._leased_job(job_id, owner)
            now = self.clock()
            cancelled = self._harvest_state(job.owner_id) == HarvestState.CANCELLED
            outages = job.outages + 1
            try:
                raw = max(self.policy.base_delay, 1.0) * 2.0 ** (outages - 1)
            except OverflowError:
                raw = max_delay
            delay = min(max_delay, raw)
            if self.policy.jitter:
                delay *= 1 + self._rng.uniform(-self.policy.jitter, self.policy.jitter)
            row = self.db.query_one(
                _returning_job(
                    "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), lease_owner = NULL,"
                    " lease_expires_at = NULL, next_attempt_at = ?, last_error = ?, fault = ?, outages = ?,"
                    " updated_at = ? WHERE id = ?"
                ),
                ((JobState.CANCELLED if cancelled else JobState.WAITING).value, now + max(0.0, delay), reason,
                 fault, outages, now, job_id),
            )
            assert row is not None
            if cancelled:
                self._update_completion(job.owner_id)
            return _row_to_job(row)

    def outage_waits(self, harvest_id: str | None = None) -> dict[str, tuple[int, str]]:
        """Open jobs held back by an outage, per fault class: (count, the latest reason).

        A held job that has come due and is being tried again (leased) still counts until the attempt ends:
        its ``outages`` count goes back to 0 only when it succeeds or fails for another reason. Otherwise a
        harvest would flicker between Running and Waiting each time one of its held jobs is looked at again.
        """
        rows = self.db.query(
            "SELECT fault, count(*), max(updated_at), (SELECT last_error FROM jobs AS k WHERE k.fault = j.fault"
            "  AND k.state IN ('waiting', 'leased') AND k.outages > 0 AND (:h IS NULL OR k.harvest_id = :h)"
            "  ORDER BY k.updated_at DESC LIMIT 1)"
            " FROM jobs AS j WHERE state IN ('waiting', 'leased') AND outages > 0 AND fault IS NOT NULL"
            " AND (:h IS NULL OR harvest_id = :h) GROUP BY fault",
            {"h": harvest_id},
        )
        return {str(fault): (int(n), str(reason or "")) for fault, n, _, reason in rows}

    def retry(self, job_id: int) -> Job:
        """Give a FAILED job another ``policy.max_attempts`` attempts, due now.

        The harvest goes back to Running if it was Completed. The last error is kept for reference until
        the next attempt overwrites it. Jobs of cancelled harvests cannot be retried.
        """
        with self.db.transaction():
            row = self.db.query_one(_SELECT_JOB, (job_id,))
            if row is None:
                raise UnknownJob(job_id)
            job = _row_to_job(row)
            if job.state != JobState.FAILED:
                raise InvalidTransition(f"job {job_id} is {job.state.value}; only failed jobs can be retried")
            hstate = self._harvest_state(job.owner_id)
            if hstate == HarvestState.CANCELLED:
                raise InvalidTransition(f"job {job_id} belongs to cancelled harvest {job.owner_id}")
            if hstate == HarvestState.COMPLETED:
                self._write_harvest_state(job.owner_id, HarvestState.RUNNING)
            now = self.clock()
            row = self.db.query_one(
                _returning_job(
                    "UPDATE jobs SET state = 'pending', attempts = 0, crashes = 0, max_attempts = ?,"
                    " next_attempt_at = ?, updated_at = ? WHERE id = ?"
                ),
                (self.policy.max_attempts, now, now, job_id),
            )
            assert row is not None
            return _row_to_job(row)

    # -- reading -----------------------------------------------------------------------------------

    def get_job(self, job_id: int) -> Job:
        """The job, or :class:`UnknownJob`."""
        row = self.db.query_one(_SELECT_JOB, (job_id,))
        if row is None:
            raise UnknownJob(job_id)
        return _row_to_job(row)

    def find_job(self, harvest_id: str, dedupe_key: str) -> Job | None:
        """The job enqueued under ``dedupe_key`` in this harvest, if any."""
        row = self.db.query_one(
            "SELECT " + _JOB_COLUMNS + " FROM jobs WHERE harvest_id = ? AND dedupe_key = ?",  # noqa: S608
            (harvest_id, dedupe_key),
        )
        return None if row is None else _row_to_job(row)

    def list_jobs(
        self,
        harvest_id: str | None = None,
        state: JobState | str | None = None,
        limit: int = 100,
        offset: int = 0,
        kind: str | None = None,
    ) -> list[Job]:
        """Jobs by id (oldest first), filtered by harvest, state and kind; ``state`` is validated."""
        # Only constant fragments are joined and every value is bound. Building the WHERE clause (rather
        # than "(? IS NULL OR col = ?)") lets SQLite walk jobs_state / jobs_harvest_state in id order:
        # "the 100 failed jobs" must not scan millions of done ones.
        clauses: list[str] = []
        params: list[Any] = []
        if harvest_id is not None:
            clauses.append("harvest_id = ?")
            params.append(str(harvest_id))
        if state is not None:
            clauses.append("state = ?")
            params.append(JobState.parse(state).value)
        if kind is not None:
            clauses.append("kind = ?")
            params.append(str(kind))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        params += [_nonneg(limit, "limit"), _nonneg(offset, "offset")]
        rows = self.db.query(
            "SELECT " + _JOB_COLUMNS + " FROM jobs" + where + " ORDER BY id LIMIT ? OFFSET ?",  # noqa: S608
            params,
        )
        return [_row_to_job(r) for r in rows]

    def counts(self, harvest_id: str | None = None) -> dict[JobState, int]:
        """Number of jobs in each state (every state present, zeros included)."""
        result = dict.fromkeys(JobState, 0)
        if harvest_id is None:
            rows = self.db.query("SELECT state, count(*) FROM jobs GROUP BY state")
        else:
            rows = self.db.query(
                "SELECT state, count(*) FROM jobs WHERE harvest_id = ? GROUP BY state", (harvest_id,)
            )
        for state, n in rows:
            result[JobState(state)] = int(n)
        return result

    def progress(self, harvest_id: str) -> HarvestProgress:
        """Job counts of one harvest (:class:`UnknownHarvest` if it does not exist)."""
        self._harvest_state(harvest_id)
        c = self.counts(harvest_id)
        return HarvestProgress(
            total=sum(c.values()),
            done=c[JobState.DONE],
            pending=c[JobState.PENDING],
            running=c[JobState.LEASED],
            failed=c[JobState.FAILED],
            waiting=c[JobState.WAITING],
            cancelled=c[JobState.CANCELLED],
        )

    def next_due_in(self, kinds: Iterable[str] | None = None) -> float | None:
        """Seconds until the earliest pending/waiting job of a Running harvest is due (0 if one is due
        now), ``None`` if there is none: lets idle workers sleep just long enough. Ignores politeness."""
        kinds_json = None if kinds is None else json.dumps(sorted(set(kinds)))
        at = self.db.scalar(
            "SELECT min(j.next_attempt_at) FROM jobs AS j JOIN harvests AS h ON h.id = j.harvest_id"
            " WHERE j.state IN ('pending', 'waiting') AND h.state = 'Running'"
            " AND (:kinds IS NULL OR j.kind IN (SELECT value FROM json_each(:kinds)))",
            {"kinds": kinds_json},
        )
        return None if at is None else max(0.0, float(at) - self.clock())


def _nonneg(value: int, name: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return n

"""Schedules as the plugin keeps them: stored definitions and runs, REST documents, the thread that fires.

Definitions come from ``RtHarvest.Schedules`` in orthanc.json (synchronised at every start) and from
``POST /rtharvest/schedules``; both live in the harvester's SQLite database with every run, so schedules
and what they covered survive restarts. The rule of when and what to harvest is :func:`schedule.decide`;
this module only feeds it and starts the ordinary harvest it asks for. A run and the harvest it starts are
recorded in one transaction, keyed by (schedule, slot): a slot never fires twice, even after a crash.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

from ..background import BackgroundLoop
from ..core.schedule import (
    Decision,
    Run,
    RunState,
    Schedule,
    ScheduleError,
    covered_to,
    decide,
    future_from,
    parse_schedule,
)
from ..edge.config import HarvesterConfig
from ..store.db import Database, register_schema
from ..store.eventlog import EventLog, Level
from ..store.jobqueue import JobQueue
from ..web.httpapi import ApiError
from .harvests import HarvestService

log = logging.getLogger("rtharvest.schedules")

register_schema(
    "schedules",
    1,
    [
        """CREATE TABLE rth_schedules (
            id TEXT PRIMARY KEY,
            definition TEXT NOT NULL,
            origin TEXT NOT NULL CHECK (origin IN ('config', 'api')),
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE rth_schedule_runs (
            schedule_id TEXT NOT NULL,
            slot REAL NOT NULL,
            harvest_id TEXT NOT NULL,
            window_from TEXT NOT NULL,
            window_to TEXT NOT NULL,
            fired_at REAL NOT NULL,
            PRIMARY KEY (schedule_id, slot)
        )""",
    ],
)

Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    """The real time (UTC)."""
    return datetime.now(UTC)


def fixed_clock(iso: str) -> Clock:
    """A clock stopped at ``iso`` (``RtHarvest.ScheduleNow``: tests and dry runs)."""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"ScheduleNow needs a time zone offset (e.g. \"2030-01-02T01:30:00Z\"), got {iso!r}")
    return lambda: moment


def _ymd(day: date) -> str:
    return day.strftime("%Y%m%d")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ScheduleService:
    """Stores schedules and their runs; starts the harvests :func:`decide` asks for."""

    def __init__(self, db: Database, harvests: HarvestService, queue: JobQueue, events: EventLog,
                 sources: Sequence[str], *, clock: Clock = wall_clock,
                 quiet_sources: Callable[[datetime], frozenset[str]] = lambda _now: frozenset()) -> None:
        self.db = db
        self.harvests = harvests
        self.queue = queue
        self.events = events
        self.sources = tuple(sources)
        self.clock = clock
        self.quiet_sources = quiet_sources
        self._lock = threading.Lock()
        db.migrate()

    @classmethod
    def from_config(cls, config: HarvesterConfig, db: Database, harvests: HarvestService, queue: JobQueue,
                    events: EventLog) -> ScheduleService:
        """The service for a validated configuration, its ``RtHarvest.Schedules`` synchronised.

        A run starts only when the queue would run its jobs: quiet hours are the queue's own rule.

        Raises:
            ScheduleError: a schedule of the configuration is invalid.
        """
        def quiet_sources(now: datetime) -> frozenset[str]:
            # Each source's quiet hours in its own TimeZone (the queue's local time when it has none).
            return frozenset(name for name in config.modalities
                             if queue.limits_for(name).quiet_at(now.timestamp(), queue.local_time))

        clock = fixed_clock(config.schedule_now) if config.schedule_now else wall_clock
        service = cls(db, harvests, queue, events, list(config.modalities), clock=clock, quiet_sources=quiet_sources)
        service.sync_config(config.schedules)
        return service

    # -- definitions --------------------------------------------------------------------------------

    def sync_config(self, definitions: Sequence[Mapping[str, Any]]) -> None:
        """Make the ``config`` schedules exactly ``definitions`` (RtHarvest.Schedules), keeping their runs.

        Raises:
            ScheduleError: a definition is invalid or names a schedule twice.
        """
        parsed = [parse_schedule(d, self.sources, where=f"RtHarvest.Schedules[{i}]")
                  for i, d in enumerate(definitions)]
        names = [s.id for s in parsed]
        if len(set(names)) != len(names):
            raise ScheduleError("RtHarvest.Schedules: each schedule needs its own Name")
        # Slots before a schedule was defined never fire; "defined" is on the scheduler's clock.
        now = self.clock().timestamp()
        with self.db.transaction():
            for schedule in parsed:
                row = self.db.query_one("SELECT origin FROM rth_schedules WHERE id = ?", (schedule.id,))
                if row is not None and row[0] != "config":
                    raise ScheduleError(f"RtHarvest.Schedules: {schedule.id!r} is also a schedule created over "
                                        "REST; rename one of them")
                self.db.execute(
                    "INSERT INTO rth_schedules (id, definition, origin, created_at) VALUES (?, ?, 'config', ?)"
                    " ON CONFLICT (id) DO UPDATE SET definition = excluded.definition",
                    (schedule.id, json.dumps(schedule.definition()), now))
            gone = [r[0] for r in self.db.query("SELECT id FROM rth_schedules WHERE origin = 'config'")
                    if r[0] not in names]
            for schedule_id in gone:
                self._delete(schedule_id)

    def create(self, body: Mapping[str, Any]) -> Schedule:
        """``POST /rtharvest/schedules``: 400 for a bad definition, 409 for a name in use."""
        try:
            schedule = parse_schedule(body, self.sources, where="body", default_id=f"schedule-{uuid.uuid4().hex[:8]}",
                                      created_at=self.clock())
        except ScheduleError as exc:
            raise ApiError(400, str(exc)) from None
        with self.db.transaction():
            if self.db.query_one("SELECT 1 FROM rth_schedules WHERE id = ?", (schedule.id,)) is not None:
                raise ApiError(409, f"a schedule named {schedule.id!r} exists; delete it first or choose another Name")
            self.db.execute("INSERT INTO rth_schedules (id, definition, origin, created_at) VALUES (?, ?, 'api', ?)",
                            (schedule.id, json.dumps(schedule.definition()), schedule.created_at.timestamp()))
        self.events.write(Level.INFO, "schedules", f"schedule {schedule.id} created: daily at "
                          f"{schedule.at:%H:%M} {schedule.time_zone} from {schedule.source}")
        warning = future_from(schedule, self.clock())
        if warning is not None:
            self.events.write(Level.WARNING, "schedules", f"schedule {schedule.id}: {warning}")
        return self.get(schedule.id)

    def delete(self, schedule_id: str) -> None:
        """``DELETE /rtharvest/schedules/{id}``: its harvests stay; a config schedule is refused (409)."""
        origin = self._origin(schedule_id)
        if origin == "config":
            raise ApiError(409, f"schedule {schedule_id!r} is defined in orthanc.json (RtHarvest.Schedules): remove "
                           "it there and restart Orthanc")
        with self.db.transaction():
            self._delete(schedule_id)
        self.events.write(Level.INFO, "schedules", f"schedule {schedule_id} deleted (its harvests are kept)")

    def _delete(self, schedule_id: str) -> None:
        self.db.execute("DELETE FROM rth_schedule_runs WHERE schedule_id = ?", (schedule_id,))
        self.db.execute("DELETE FROM rth_schedules WHERE id = ?", (schedule_id,))

    def _origin(self, schedule_id: str) -> str:
        row = self.db.query_one("SELECT origin FROM rth_schedules WHERE id = ?", (schedule_id,))
        if row is None:
            raise ApiError(404, f"unknown schedule {schedule_id!r}; list schedules with GET /rtharvest/schedules")
        return str(row[0])

    def get(self, schedule_id: str) -> Schedule:
        """The schedule, or ApiError 404."""
        row = self.db.query_one("SELECT definition, created_at FROM rth_schedules WHERE id = ?", (schedule_id,))
        if row is None:
            raise ApiError(404, f"unknown schedule {schedule_id!r}; list schedules with GET /rtharvest/schedules")
        return self._load(row[0], row[1])

    def all(self) -> list[Schedule]:
        """Every schedule, by name."""
        rows = self.db.query("SELECT definition, created_at FROM rth_schedules ORDER BY id")
        return [self._load(r[0], r[1]) for r in rows]

    def _load(self, definition: str, created_at: float) -> Schedule:
        # Stored definitions were valid when written; a source removed from orthanc.json since then is
        # reported when the schedule fires, not here (the schedule must stay listable and deletable).
        body = json.loads(definition)
        return parse_schedule(body, [body["Source"], *body.get("LookupSources", [])],
                              created_at=datetime.fromtimestamp(created_at, UTC))

    # -- runs ---------------------------------------------------------------------------------------

    def runs(self, schedule_id: str) -> list[Run]:
        """Every run of a schedule, oldest first, with its harvest's current state."""
        rows = self.db.query("SELECT slot, window_from, window_to, harvest_id FROM rth_schedule_runs"
                             " WHERE schedule_id = ? ORDER BY slot", (schedule_id,))
        return [Run(datetime.fromtimestamp(r[0], UTC), datetime.strptime(r[1], "%Y%m%d").date(),
                    datetime.strptime(r[2], "%Y%m%d").date(), r[3], self._state(r[3])) for r in rows]

    def _state(self, harvest_id: str) -> RunState:
        try:
            return RunState(self.harvests.visible_state(self.queue.get_harvest(harvest_id)))
        except LookupError:
            return RunState.UNKNOWN

    def tick(self) -> datetime:
        """Fire every schedule that is due now; returns when the next one may be due."""
        with self._lock:  # one firing pass at a time: two runs of one schedule never start together
            now = self.clock()
            quiet = self.quiet_sources(now)
            next_check = None
            for schedule in self.all():
                decision = decide(schedule, self.runs(schedule.id), now, quiet)
                if decision.fire:
                    self._fire(schedule, decision)
                next_check = decision.next_check if next_check is None else min(next_check, decision.next_check)
            return next_check or now.replace(microsecond=0)

    def _fire(self, schedule: Schedule, decision: Decision) -> None:
        assert decision.window is not None and decision.slot is not None
        start, end = decision.window
        missing = [s for s in schedule.sources if s not in self.sources]
        if missing:
            self.events.write(Level.ERROR, "schedules", f"schedule {schedule.id} cannot run: source(s) "
                              f"{', '.join(missing)} no longer configured (DicomModalities)")
            return
        body = {"Source": schedule.source, "LookupSources": list(schedule.lookup_sources), "From": _ymd(start),
                "To": _ymd(end), "Label": schedule.label or f"schedule {schedule.id} {_ymd(start)}-{_ymd(end)}"}
        try:
            with self.db.transaction():
                harvest = self.harvests.start(body)
                self.db.execute(
                    "INSERT INTO rth_schedule_runs (schedule_id, slot, harvest_id, window_from, window_to, fired_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (schedule.id, decision.slot.timestamp(), harvest.id, _ymd(start), _ymd(end),
                     wall_clock().timestamp()))
        except (ApiError, ScheduleError) as exc:
            self.events.write(Level.ERROR, "schedules", f"schedule {schedule.id} could not start its run: {exc}")
            return
        self.events.write(Level.INFO, "schedules", f"schedule {schedule.id} started its run for "
                          f"{_iso(decision.slot)}: window {_ymd(start)}-{_ymd(end)}", harvest_id=harvest.id,
                          source=schedule.source)

    # -- documents ----------------------------------------------------------------------------------

    def document(self, schedule: Schedule, runs_limit: int = 20) -> dict[str, Any]:
        """A schedule as REST shows it: its definition, what it covered, its runs and its next run."""
        runs = self.runs(schedule.id)
        decision = decide(schedule, runs, self.clock(), self.quiet_sources(self.clock()))
        covered = covered_to(runs)
        doc = schedule.definition()
        doc.update({
            "ID": schedule.id,
            "Origin": self._origin(schedule.id),
            "CreatedAt": _iso(schedule.created_at),
            "CoveredTo": _ymd(covered) if covered else None,
            "NextRun": _iso(decision.next_check) if not decision.fire else _iso(self.clock()),
            "Waiting": decision.reason if decision.reason not in ("not due", "due") else None,
            "Runs": [{"Harvest": r.harvest_id, "Slot": _iso(r.slot), "From": _ymd(r.window_from),
                      "To": _ymd(r.window_to), "State": r.state.value} for r in runs[-runs_limit:]],
        })
        warning = future_from(schedule, self.clock()) if covered is None else None
        doc["Warnings"] = [warning] if warning else []
        return doc


class ScheduleRunner:
    """The thin loop: ask the service to fire what is due, sleep until the next check (at most a minute)."""

    def __init__(self, service: ScheduleService, max_sleep: float = 60.0) -> None:
        self.service = service
        self.max_sleep = max_sleep
        self._next_wait = max_sleep
        # The pass always reports "no more work": the wait is the time to the next check, clamped.
        self._loop = BackgroundLoop("rtharvest-schedules", self._pass, lambda: self._next_wait)

    def start(self) -> None:
        """Start firing (a run missed while Orthanc was down fires on the first pass)."""
        self._loop.start()

    def wake(self) -> None:
        """Look again now (a schedule was created or a run finished)."""
        self._loop.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and join."""
        self._loop.stop(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._loop.alive

    def _pass(self) -> bool:
        self._next_wait = self.max_sleep  # if the pass fails
        next_check = self.service.tick()
        wait = (next_check - self.service.clock()).total_seconds()
        self._next_wait = min(max(wait, 1.0), self.max_sleep)
        return False

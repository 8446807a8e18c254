"""Recurring incremental harvests: what a schedule is, and when and what it harvests next.

A schedule runs once a day at a wall-clock time in an explicit time zone (``"At": "01:00"``,
``"TimeZone": "Europe/Zurich"``). Each run is an ordinary harvest of the treatment-record window from the
end of the last *completed* window, minus ``OverlapDays`` (records that reach the source late: a fraction
recorded on Friday and approved on Monday), up to yesterday in the schedule's time zone. Re-harvesting
the overlap costs queries but moves nothing: every retrieve looks in the store first.

:func:`decide` is the whole rule, a pure function of the schedule, its runs so far and "now"; the
thread that acts on it (:mod:`rtharvest.harvest.schedules`) only reads the clock, the runs and quiet hours.

* The *slot* of a moment is the latest scheduled time at or before it. A slot fires once: a run missed
  while Orthanc was down runs once when it comes back (not once per missed night), and a schedule
  created after today's time first runs at the next one.
* Two runs of one schedule never overlap: while a run is Running or Paused the next waits.
* A run never starts during the quiet hours of any of its sources; it waits for them to end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: How soon a schedule that waits (running run, quiet hours) looks again.
RECHECK = timedelta(minutes=1)
MAX_OVERLAP_DAYS = 3660
_NAME = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_DATE = re.compile(r"^\d{8}$")
FIELDS = ("Name", "Source", "LookupSources", "At", "TimeZone", "OverlapDays", "From", "Label")


class ScheduleError(ValueError):
    """A schedule definition is invalid (the message names the field and how to fix it)."""


class RunState(StrEnum):
    """What became of a run's harvest."""

    RUNNING = "Running"
    PAUSED = "Paused"
    COMPLETED = "Completed"
    CANCELLED = "Cancelled"
    #: The harvest is gone from the queue (deleted by hand): its window does not count as covered.
    UNKNOWN = "Unknown"

    @property
    def active(self) -> bool:
        """Whether the run still holds the schedule (the next one must wait)."""
        return self in (RunState.RUNNING, RunState.PAUSED)


@dataclass(frozen=True)
class Schedule:
    """One recurring harvest."""

    id: str
    source: str
    lookup_sources: tuple[str, ...]
    at: time
    time_zone: str
    overlap_days: int = 7
    #: First day of the first window (YYYYMMDD); None: the first run harvests yesterday only.
    first_from: date | None = None
    label: str = ""
    #: When the schedule was defined (UTC); slots before it never fire.
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's time zone."""
        return ZoneInfo(self.time_zone)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source a run talks to."""
        return tuple(dict.fromkeys((self.source, *self.lookup_sources)))

    def definition(self) -> dict[str, Any]:
        """The JSON definition (what ``parse_schedule`` reads back)."""
        doc: dict[str, Any] = {
            "Name": self.id, "Source": self.source, "LookupSources": list(self.lookup_sources),
            "At": self.at.strftime("%H:%M"), "TimeZone": self.time_zone, "OverlapDays": self.overlap_days,
            "From": self.first_from.strftime("%Y%m%d") if self.first_from else None, "Label": self.label,
        }
        return doc


@dataclass(frozen=True)
class Run:
    """One run of a schedule: the slot it was fired for, its window and its harvest's state."""

    slot: datetime
    window_from: date
    window_to: date
    harvest_id: str
    state: RunState


@dataclass(frozen=True)
class Decision:
    """What to do now: start ``window`` for ``slot``, or nothing before ``next_check``."""

    slot: datetime | None
    window: tuple[date, date] | None
    next_check: datetime
    reason: str

    @property
    def fire(self) -> bool:
        """Whether a run starts now."""
        return self.window is not None


def _at(day: date, at: time, zone: ZoneInfo) -> datetime:
    # A time skipped by a DST change (02:30 on the spring-forward night) resolves forward, per PEP 495.
    return datetime.combine(day, at, zone).astimezone(UTC)


def slot_at_or_before(schedule: Schedule, now: datetime) -> datetime:
    """The latest scheduled moment ``<= now`` (UTC)."""
    zone = schedule.zone
    today = now.astimezone(zone).date()
    slot = _at(today, schedule.at, zone)
    return slot if slot <= now else _at(today - timedelta(days=1), schedule.at, zone)


def slot_after(schedule: Schedule, moment: datetime) -> datetime:
    """The first scheduled moment ``> moment`` (UTC)."""
    zone = schedule.zone
    day = moment.astimezone(zone).date()
    for offset in range(3):
        slot = _at(day + timedelta(days=offset), schedule.at, zone)
        if slot > moment:
            return slot
    raise AssertionError("a daily schedule has a slot within three days")


def future_from(schedule: Schedule, now: datetime) -> str | None:
    """A warning when ``From`` is after yesterday in the schedule's zone: the first window ends yesterday,
    so nothing is harvested until the day after ``From`` (a typo such as 2030 for 2023 waits for years)."""
    if schedule.first_from is None:
        return None
    yesterday = now.astimezone(schedule.zone).date() - timedelta(days=1)
    if schedule.first_from <= yesterday:
        return None
    return (f"From {schedule.first_from:%Y%m%d} is in the future: nothing is harvested before "
            f"{schedule.first_from + timedelta(days=1):%Y-%m-%d} (each run harvests up to yesterday)")


def covered_to(runs: Sequence[Run]) -> date | None:
    """The end of the last completed window (None before the first completes)."""
    return max((r.window_to for r in runs if r.state is RunState.COMPLETED), default=None)


def decide(schedule: Schedule, runs: Sequence[Run], now: datetime, quiet_sources: frozenset[str] = frozenset()
           ) -> Decision:
    """When and what ``schedule`` harvests, given its ``runs`` so far, the time ``now`` (aware) and the
    sources in quiet hours at ``now``."""
    now = now.astimezone(UTC)
    slot = slot_at_or_before(schedule, now)
    last_slot = max((r.slot for r in runs), default=None)
    floor = last_slot if last_slot is not None else schedule.created_at
    if slot <= floor:
        return Decision(None, None, slot_after(schedule, max(floor, now)), "not due")
    active = [r for r in runs if r.state.active]
    if active:
        return Decision(None, None, now + RECHECK, f"waiting for run {active[0].harvest_id} to finish")
    quiet = [s for s in schedule.sources if s in quiet_sources]
    if quiet:
        return Decision(None, None, now + RECHECK, f"waiting for the quiet hours of {', '.join(quiet)} to end")
    yesterday = now.astimezone(schedule.zone).date() - timedelta(days=1)
    covered = covered_to(runs)
    if covered is not None:
        start = covered + timedelta(days=1) - timedelta(days=schedule.overlap_days)
    else:
        start = schedule.first_from or yesterday
    if start > yesterday:
        return Decision(None, None, slot_after(schedule, now), f"nothing to harvest: covered up to {covered}")
    return Decision(slot, (start, yesterday), slot_after(schedule, now), "due")


# -- parsing -----------------------------------------------------------------------------------------


def _parse_date(value: Any, where: str) -> date:
    if not isinstance(value, str) or not _DATE.match(value):
        raise ScheduleError(f"{where}: expected a date as \"YYYYMMDD\", got {value!r}")
    try:
        return datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise ScheduleError(f"{where}: {value!r} is not a calendar date") from None


def parse_schedule(body: Mapping[str, Any], sources: Sequence[str], *, where: str = "schedule",
                   default_id: str | None = None, created_at: datetime | None = None) -> Schedule:
    """Validate a schedule definition (``RtHarvest.Schedules[i]`` or a ``POST /rtharvest/schedules`` body).

    ``sources`` are the configured source names (DicomModalities).

    Raises:
        ScheduleError: naming the field and how to fix it.
    """
    if not isinstance(body, Mapping):
        raise ScheduleError(f"{where}: expected an object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ScheduleError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    name = body.get("Name", default_id)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScheduleError(f"{where}.Name: 1-64 letters, digits, '-' or '_' (it is the schedule's ID), "
                            f"got {name!r}")
    known = ", ".join(sorted(sources)) or "none configured"

    def source(value: Any, field_name: str) -> str:
        if not isinstance(value, str) or value not in sources:
            raise ScheduleError(f"{where}.{field_name}: {value!r} is not a configured source ({known})")
        return value

    if "Source" not in body:
        raise ScheduleError(f"{where}.Source is required: where treatment records are queried")
    main = source(body["Source"], "Source")
    lookup_raw = body.get("LookupSources") or [main]
    if not isinstance(lookup_raw, list):
        raise ScheduleError(f"{where}.LookupSources: expected a list of source names")
    lookup = tuple(dict.fromkeys(source(v, f"LookupSources[{i}]") for i, v in enumerate(lookup_raw)))
    at = body.get("At")
    if not isinstance(at, str) or not _HHMM.match(at):
        raise ScheduleError(f"{where}.At is required: the time of day as \"HH:MM\" (24 h), got {at!r}")
    zone = body.get("TimeZone")
    if not isinstance(zone, str) or not zone:
        raise ScheduleError(f"{where}.TimeZone is required: an IANA zone such as \"Europe/Zurich\" or \"UTC\"")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"{where}.TimeZone: unknown time zone {zone!r} (IANA names, e.g. "
                            "\"America/New_York\")") from None
    overlap = body.get("OverlapDays", 7)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= MAX_OVERLAP_DAYS:
        raise ScheduleError(f"{where}.OverlapDays: an integer from 0 to {MAX_OVERLAP_DAYS}, got {overlap!r}")
    first = body.get("From")
    label = body.get("Label") or ""
    if not isinstance(label, str) or len(label) > 200:
        raise ScheduleError(f"{where}.Label: a string of at most 200 characters")
    hours, minutes = at.split(":")
    return Schedule(
        id=name, source=main, lookup_sources=lookup, at=time(int(hours), int(minutes)), time_zone=zone,
        overlap_days=overlap, first_from=None if first is None else _parse_date(first, f"{where}.From"),
        label=label, created_at=created_at or datetime.now(UTC),
    )

"""The schedule rule (pure, injected clock) and the schedule service on a real database across restarts."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from rtharvest.core.schedule import (
    Run,
    RunState,
    Schedule,
    ScheduleError,
    decide,
    future_from,
    parse_schedule,
    slot_at_or_before,
)
from rtharvest.edge.config import ConfigError, load_config
from rtharvest.harvest.harvests import HarvestService
from rtharvest.harvest.schedules import ScheduleService
from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog
from rtharvest.store.jobqueue import JobQueue, SourceLimits
from rtharvest.store.tracking import Tracker
from rtharvest.web.httpapi import ApiError

ZURICH = "Europe/Zurich"  # UTC+1 in winter, UTC+2 in summer


def nightly(**changes: Any) -> Schedule:
    base: dict[str, Any] = {"id": "nightly", "source": "ARIA", "lookup_sources": ("ARIA", "MIM"), "at": time(1, 0),
                            "time_zone": ZURICH, "overlap_days": 3, "first_from": date(2029, 12, 1),
                            "created_at": datetime(2029, 12, 31, 12, 0, tzinfo=UTC)}
    base.update(changes)
    return Schedule(**base)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def run(slot: datetime, start: date, end: date, state: RunState = RunState.COMPLETED) -> Run:
    return Run(slot, start, end, "h-" + start.isoformat(), state)


def test_nightly_run_fires_once_at_the_local_time_with_the_first_window() -> None:
    schedule = nightly()
    # 00:59 in Zurich (23:59 UTC): not yet; the next check is the slot itself.
    before = decide(schedule, [], utc(2029, 12, 31, 23, 59))
    assert not before.fire and before.next_check == utc(2030, 1, 1, 0, 0)
    # 01:30 in Zurich: the run for tonight's 01:00 slot, from the configured first day to yesterday.
    due = decide(schedule, [], utc(2030, 1, 1, 0, 30))
    assert due.fire and due.slot == utc(2030, 1, 1, 0, 0)
    assert due.window == (date(2029, 12, 1), date(2029, 12, 31))
    # Once that slot has its run, nothing more today, whatever the run's state.
    done = [run(utc(2030, 1, 1, 0, 0), date(2029, 12, 1), date(2029, 12, 31))]
    later = decide(schedule, done, utc(2030, 1, 1, 22, 0))
    assert not later.fire and later.next_check == utc(2030, 1, 2, 0, 0)


def test_next_night_starts_at_the_end_of_the_last_completed_window_minus_the_overlap() -> None:
    runs = [run(utc(2030, 1, 1, 0, 0), date(2029, 12, 1), date(2029, 12, 31))]
    due = decide(nightly(overlap_days=3), runs, utc(2030, 1, 2, 0, 5))
    assert due.window == (date(2029, 12, 29), date(2030, 1, 1))  # 3 days of overlap for late records
    no_overlap = decide(nightly(overlap_days=0), runs, utc(2030, 1, 2, 0, 5))
    assert no_overlap.window == (date(2030, 1, 1), date(2030, 1, 1))


def test_a_cancelled_window_is_not_covered() -> None:
    runs = [run(utc(2030, 1, 1, 0, 0), date(2029, 12, 1), date(2029, 12, 31)),
            run(utc(2030, 1, 2, 0, 0), date(2029, 12, 29), date(2030, 1, 1), RunState.CANCELLED)]
    due = decide(nightly(), runs, utc(2030, 1, 3, 0, 5))
    assert due.window == (date(2029, 12, 29), date(2030, 1, 2))


def test_missed_nights_run_once_when_orthanc_comes_back() -> None:
    runs = [run(utc(2030, 1, 1, 0, 0), date(2029, 12, 1), date(2029, 12, 31))]
    back = utc(2030, 1, 5, 9, 0)  # down from the 2nd to the 5th: four slots missed
    due = decide(nightly(), runs, back)
    assert due.fire and due.slot == utc(2030, 1, 5, 0, 0)
    assert due.window == (date(2029, 12, 29), date(2030, 1, 4))  # the whole gap in one window
    start, end = due.window
    after = [*runs, run(due.slot, start, end, RunState.RUNNING)]
    assert not decide(nightly(), after, back).fire
    after[-1] = run(due.slot, *due.window)
    assert not decide(nightly(), after, back + timedelta(hours=3)).fire


def test_two_runs_of_one_schedule_never_overlap() -> None:
    runs = [run(utc(2030, 1, 1, 0, 0), date(2029, 12, 1), date(2029, 12, 31), RunState.RUNNING)]
    waiting = decide(nightly(), runs, utc(2030, 1, 2, 0, 5))
    assert not waiting.fire and "to finish" in waiting.reason
    paused = [run(utc(2030, 1, 1, 0, 0), date(2029, 12, 1), date(2029, 12, 31), RunState.PAUSED)]
    assert not decide(nightly(), paused, utc(2030, 1, 2, 0, 5)).fire
    # Once it completes, the waiting slot fires (once) from where it ended.
    finished = [run(utc(2030, 1, 1, 0, 0), date(2029, 12, 1), date(2029, 12, 31))]
    assert decide(nightly(), finished, utc(2030, 1, 2, 7, 0)).window == (date(2029, 12, 29), date(2030, 1, 1))


def test_quiet_hours_of_any_source_defer_the_run() -> None:
    due_at = utc(2030, 1, 1, 0, 30)
    assert not decide(nightly(), [], due_at, frozenset({"MIM"})).fire
    assert decide(nightly(), [], due_at, frozenset({"OTHER"})).fire


def test_a_new_schedule_waits_for_its_first_slot_and_first_harvests_yesterday() -> None:
    schedule = nightly(created_at=utc(2030, 1, 1, 14, 0), first_from=None)
    assert not decide(schedule, [], utc(2030, 1, 1, 15, 0)).fire
    due = decide(schedule, [], utc(2030, 1, 2, 1, 0))
    assert due.window == (date(2030, 1, 1), date(2030, 1, 1))


def test_time_zone_and_daylight_saving() -> None:
    # 01:00 in Zurich is 00:00 UTC in winter and 23:00 UTC the day before in summer.
    assert slot_at_or_before(nightly(), utc(2030, 7, 1, 12, 0)) == utc(2030, 6, 30, 23, 0)
    # 02:30 does not exist on the spring-forward night (31 March 2030): it resolves to 03:30 CEST.
    spring = nightly(at=time(2, 30))
    assert slot_at_or_before(spring, utc(2030, 3, 31, 12, 0)) == utc(2030, 3, 31, 1, 30)
    # 01:00 in New York is 06:00 UTC in winter: at 05:59 UTC tonight's slot has not come yet.
    new_york = nightly(time_zone="America/New_York")
    early = decide(new_york, [], utc(2030, 1, 1, 5, 59))
    assert not early.fire and early.next_check == utc(2030, 1, 1, 6, 0)
    assert decide(new_york, [], utc(2030, 1, 1, 6, 30)).window == (date(2029, 12, 1), date(2029, 12, 31))


@pytest.mark.parametrize(("body", "message"), [
    ({"Source": "ARIA", "At": "01:00"}, "TimeZone is required"),
    ({"Source": "ARIA", "At": "1am", "TimeZone": "UTC"}, "At is required"),
    ({"Source": "ARIA", "At": "01:00", "TimeZone": "Mars/Olympus"}, "unknown time zone"),
    ({"Source": "NOPE", "At": "01:00", "TimeZone": "UTC"}, "not a configured source"),
    ({"Source": "ARIA", "At": "01:00", "TimeZone": "UTC", "OverlapDays": -1}, "OverlapDays"),
    ({"Source": "ARIA", "At": "01:00", "TimeZone": "UTC", "From": "20300231"}, "not a calendar date"),
    ({"Source": "ARIA", "At": "01:00", "TimeZone": "UTC", "Every": "day"}, "unknown field"),
    ({"At": "01:00", "TimeZone": "UTC"}, "Source is required"),
])
def test_bad_definitions_name_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_schedule({"Name": "x", **body}, ["ARIA", "MIM"])


# -- the service on a real database, across restarts ---------------------------------------------------


def orthanc_config(tmp_path: Path, now: str, schedules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "DicomModalities": {"ARIA": ["ARIA", "127.0.0.1", 11112], "MIM": ["MIM", "127.0.0.1", 11113]},
        "RtHarvest": {"DatabasePath": str(tmp_path / "q.sqlite"), "Schedules": schedules, "ScheduleNow": now},
    }


class Plugin:
    """The services a (re)started plugin builds on its database, as app.build_runtime wires them."""

    def __init__(self, tmp_path: Path, now: str, schedules: list[dict[str, Any]],
                 limits: dict[str, SourceLimits] | None = None) -> None:
        config = load_config(orthanc_config(tmp_path, now, schedules))
        self.db = Database(str(config.database_path))
        self.db.migrate()
        self.queue = JobQueue(self.db, limits=limits)
        self.events = events = EventLog(self.db)
        self.schedules = ScheduleService.from_config(config, self.db, HarvestService(config, self.queue,
                                                     Tracker(self.db), events), self.queue, events)


NIGHTLY = {"Name": "nightly", "Source": "ARIA", "LookupSources": ["ARIA", "MIM"], "At": "01:00",
           "TimeZone": "UTC", "OverlapDays": 2, "From": "20300101"}


def test_schedules_and_their_runs_survive_restarts_and_a_missed_run_fires_once(tmp_path: Path) -> None:
    first = Plugin(tmp_path, "2030-01-04T23:00:00Z", [NIGHTLY])  # defined before the 5th's slot
    first.schedules.tick()
    assert first.queue.list_harvests() == []
    first.schedules.clock = lambda: datetime(2030, 1, 5, 1, 30, tzinfo=UTC)
    first.schedules.tick()
    first.schedules.tick()  # the same slot never fires twice
    [harvest] = first.queue.list_harvests()
    assert harvest.params["Window"]["From"] == "20300101" and harvest.params["Window"]["To"] == "20300104"
    assert harvest.params["LookupSources"] == ["ARIA", "MIM"]
    first.queue.cancel(harvest.id)  # nothing covered: the next run starts from the first day again
    first.schedules.create({"Name": "api-made", "Source": "MIM", "At": "03:00", "TimeZone": "UTC"})
    first.db.close()

    # Down for three nights; back at 09:00 on the 9th.
    second = Plugin(tmp_path, "2030-01-09T09:00:00Z", [NIGHTLY])
    assert [s.id for s in second.schedules.all()] == ["api-made", "nightly"]
    second.schedules.tick()
    second.schedules.tick()
    runs = second.schedules.runs("nightly")
    assert [(r.window_from, r.window_to) for r in runs] == [(date(2030, 1, 1), date(2030, 1, 4)),
                                                            (date(2030, 1, 1), date(2030, 1, 8))]
    assert [r.state for r in runs] == [RunState.CANCELLED, RunState.RUNNING]
    # The REST-made schedule (created on the 5th) ran once, for the 9th's 03:00 slot.
    [api_run] = second.schedules.runs("api-made")
    assert (api_run.window_from, api_run.window_to) == (date(2030, 1, 8), date(2030, 1, 8))
    doc = second.schedules.document(second.schedules.get("nightly"))
    assert doc["Origin"] == "config" and doc["CoveredTo"] is None and len(doc["Runs"]) == 2
    assert doc["Runs"][-1]["State"] == "Running" and doc["NextRun"] == "2030-01-10T01:00:00Z"
    with pytest.raises(ApiError) as refused:
        second.schedules.delete("nightly")
    assert refused.value.status == 409
    with pytest.raises(ApiError) as taken:
        second.schedules.create({"Name": "api-made", "Source": "MIM", "At": "03:00", "TimeZone": "UTC"})
    assert taken.value.status == 409
    second.schedules.delete("api-made")
    second.db.close()

    # Removed from orthanc.json: the config schedule goes, its harvests stay.
    third = Plugin(tmp_path, "2030-01-10T09:00:00Z", [])
    assert third.schedules.all() == []
    assert len(third.queue.list_harvests()) == 3
    third.db.close()


def test_bad_schedules_in_the_configuration_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"RtHarvest.Schedules\[0\].TimeZone"):
        load_config(orthanc_config(tmp_path, "2030-01-05T01:30:00Z", [{**NIGHTLY, "TimeZone": "Nowhere/X"}]))
    with pytest.raises(ConfigError, match="used twice"):
        load_config(orthanc_config(tmp_path, "2030-01-05T01:30:00Z", [NIGHTLY, NIGHTLY]))
    with pytest.raises(ConfigError, match="ScheduleNow"):
        load_config(orthanc_config(tmp_path, "2030-01-05 01:30", [NIGHTLY]))


def test_the_service_waits_for_the_quiet_hours_of_a_lookup_source_in_its_own_time_zone(tmp_path: Path) -> None:
    # MIM (a lookup source) is quiet 00:00-06:00 in Zurich (23:00-05:00 UTC in winter).
    quiet_mim = {"MIM": SourceLimits(1, (time(0, 0), time(6, 0)), ZURICH)}
    plugin = Plugin(tmp_path, "2030-01-04T12:00:00Z", [NIGHTLY], quiet_mim)
    plugin.schedules.clock = lambda: datetime(2030, 1, 5, 4, 59, tzinfo=UTC)  # 05:59 in Zurich: still quiet
    plugin.schedules.tick()
    assert plugin.queue.list_harvests() == []
    assert plugin.schedules.document(plugin.schedules.get("nightly"))["Waiting"].startswith("waiting for the quiet")
    plugin.schedules.clock = lambda: datetime(2030, 1, 5, 5, 1, tzinfo=UTC)  # 06:01 in Zurich
    plugin.schedules.tick()
    [harvest] = plugin.queue.list_harvests()
    assert harvest.params["Window"]["To"] == "20300104"
    plugin.db.close()


def test_the_service_starts_no_second_run_while_the_previous_one_is_still_running(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path, "2030-01-04T23:00:00Z", [NIGHTLY])
    plugin.schedules.clock = lambda: datetime(2030, 1, 5, 1, 30, tzinfo=UTC)
    plugin.schedules.tick()
    [first] = plugin.queue.list_harvests()
    assert [r.state for r in plugin.schedules.runs("nightly")] == [RunState.RUNNING]

    # The next night's slot comes while the first run still has work (its discovery job is pending).
    plugin.schedules.clock = lambda: datetime(2030, 1, 6, 1, 30, tzinfo=UTC)
    plugin.schedules.tick()
    assert [h.id for h in plugin.queue.list_harvests()] == [first.id]
    doc = plugin.schedules.document(plugin.schedules.get("nightly"))
    assert doc["Waiting"] == f"waiting for run {first.id} to finish"
    assert [r["State"] for r in doc["Runs"]] == ["Running"]
    # Paused by an operator is still unfinished: no run starts beside it either.
    plugin.queue.pause(first.id)
    plugin.schedules.tick()
    assert len(plugin.queue.list_harvests()) == 1
    plugin.queue.resume(first.id)

    # Its jobs done and the end-of-harvest cleanup run, it is Completed: the waiting slot fires once,
    # from the end of the completed window minus the 2-day overlap, up to yesterday.
    while (job := plugin.queue.claim("test-worker")) is not None:
        assert job.harvest_id == first.id
        plugin.queue.complete(job.id, "test-worker")
    Tracker(plugin.db).mark_cleanup(first.id)
    assert plugin.schedules.runs("nightly")[0].state is RunState.COMPLETED
    plugin.schedules.tick()
    plugin.schedules.tick()
    second = [h for h in plugin.queue.list_harvests() if h.id != first.id]
    assert len(second) == 1
    assert (second[0].params["Window"]["From"], second[0].params["Window"]["To"]) == ("20300103", "20300105")
    assert plugin.schedules.document(plugin.schedules.get("nightly"))["Waiting"] is None
    plugin.db.close()


def test_a_from_in_the_future_is_warned_about() -> None:
    now = utc(2030, 1, 5, 12)
    warning = future_from(nightly(first_from=date(2033, 1, 1)), now)
    assert warning is not None and "20330101" in warning and "2033-01-02" in warning
    # Yesterday is the last day a run harvests: From yesterday is fine, From today is not yet.
    assert future_from(nightly(first_from=date(2030, 1, 4)), now) is None
    assert future_from(nightly(first_from=date(2030, 1, 5)), now) is not None
    assert future_from(nightly(first_from=None), now) is None


def test_a_schedule_created_with_a_future_from_says_so_in_its_answer_and_the_log(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path, "2030-01-05T12:00:00Z", [])
    created = plugin.schedules.create({"Name": "typo", "Source": "ARIA", "At": "01:00", "TimeZone": "UTC",
                                       "From": "20330101"})
    doc = plugin.schedules.document(created)
    assert len(doc["Warnings"]) == 1 and "in the future" in doc["Warnings"][0]
    assert any("in the future" in e.message and e.level.name == "WARNING" for e in plugin.events.query())
    ok = plugin.schedules.create({"Name": "fine", "Source": "ARIA", "At": "01:00", "TimeZone": "UTC",
                                  "From": "20300101"})
    assert plugin.schedules.document(ok)["Warnings"] == []
    plugin.db.close()

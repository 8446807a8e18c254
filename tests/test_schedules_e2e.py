"""Scheduled incremental harvests on the real harvester, with the scheduler's "now" set by configuration.

``RtHarvest.ScheduleNow`` stands in for the wall clock (no test waits for 01:00). A nightly schedule runs
its first window, Orthanc stops, comes back three nights later and catches up once; that run re-reads the
overlap (records already harvested) and moves nothing. Each run is an ordinary harvest.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from typing import Any

import pytest

from rtharvest.synth.groundtruth import GroundTruth

from .conftest import Clinic
from .harvesting import assert_provenance, assert_store_equals_truth, wait_completed

pytestmark = pytest.mark.servers

SOURCE = "ORTHANC_SRC"


def ymd(text: str) -> date:
    return datetime.strptime(text, "%Y%m%d").date()


def wait_runs(clinic: Clinic, schedule: str, count: int, deadline_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + deadline_s
    while True:
        runs = clinic.api.get(f"/rtharvest/schedules/{schedule}")["Runs"]
        if len(runs) >= count:
            return list(runs)
        assert time.monotonic() < deadline, f"schedule {schedule} has {len(runs)} run(s), expected {count}"
        time.sleep(0.2)


def test_nightly_schedule_runs_catches_up_once_after_downtime_and_moves_nothing_twice(
        clinic: Clinic, loaded: GroundTruth) -> None:
    window = loaded.window("all")
    assert window.date_from and window.date_to
    last_record = ymd(window.date_to)
    nightly = {"Name": "nightly", "Source": SOURCE, "At": "01:00", "TimeZone": "UTC", "OverlapDays": 30,
               "From": window.date_from}
    night1 = datetime.combine(last_record + timedelta(days=1), datetime.min.time()) + timedelta(hours=1, minutes=30)

    def at(moment: datetime) -> dict[str, Any]:
        return {"RtHarvest.Schedules": [nightly], "RtHarvest.ScheduleNow": moment.isoformat() + "Z"}

    # Defined in the evening before the first night (slots before a schedule exists never fire) ...
    clinic.restart_harvester(fresh=True, overrides=at(night1 - timedelta(hours=3)))
    try:
        assert clinic.api.get("/rtharvest/schedules/nightly")["Runs"] == []
        # ... and the harvester restarted (same store and queue) at 01:30: tonight's run starts.
        clinic.restart_harvester(fresh=False, overrides=at(night1))
        [first] = wait_runs(clinic, "nightly", 1)
        assert (first["From"], first["To"]) == (window.date_from, window.date_to)
        doc = wait_completed(clinic.api, first["Harvest"])
        # An ordinary harvest: same document, store, provenance and manifest as one started by hand.
        assert (doc["Source"], doc["From"], doc["To"]) == (SOURCE, window.date_from, window.date_to)
        assert doc["PlansCollected"] == window.summary.plans_collected
        stored = assert_store_equals_truth(clinic.api, window)
        assert_provenance(clinic.api, stored, first["Harvest"], {SOURCE})
        manifest = clinic.api.get(f"/rtharvest/harvests/{first['Harvest']}/manifest")
        assert manifest["Summary"]["PlansCollected"] == window.summary.plans_collected
        assert clinic.api.get("/rtharvest/schedules/nightly")["CoveredTo"] == window.date_to

        # Orthanc is down for three nights and comes back at 09:00: one catch-up run, not three.
        back = night1 + timedelta(days=3, hours=7, minutes=30)
        clinic.restart_harvester(fresh=False, overrides=at(back))
        runs = wait_runs(clinic, "nightly", 2)
        second = runs[1]
        assert (ymd(second["From"]), ymd(second["To"])) == (last_record + timedelta(days=1 - 30),
                                                           back.date() - timedelta(days=1))
        doc2 = wait_completed(clinic.api, second["Harvest"])
        # The overlap re-found already harvested records and planned them from the store: nothing moved.
        assert doc2["PlansReferenced"] > 0
        assert clinic.api.get("/rtharvest/status")["Arrivals"] == 0
        assert set(assert_store_equals_truth(clinic.api, window)) == set(stored)
        assert len(clinic.api.get("/rtharvest/schedules/nightly")["Runs"]) == 2
        assert clinic.api.get("/rtharvest/schedules/nightly")["NextRun"] == (
            datetime.combine(back.date() + timedelta(days=1), datetime.min.time()) + timedelta(hours=1)
        ).isoformat() + "Z"
    finally:
        clinic.restart_harvester(fresh=True)


def test_schedule_routes(clinic: Clinic) -> None:
    api = clinic.api
    created = api.post("/rtharvest/schedules", {"Name": "weekly-ish", "Source": SOURCE, "At": "02:15",
                                                "TimeZone": "Europe/Zurich", "OverlapDays": 3})
    try:
        assert created["ID"] == "weekly-ish" and created["Origin"] == "api" and created["Runs"] == []
        assert created["NextRun"].endswith("Z")
        assert "weekly-ish" in {s["ID"] for s in api.get("/rtharvest/schedules")}
        assert api.get("/rtharvest/schedules/weekly-ish")["TimeZone"] == "Europe/Zurich"
        status, body = api.request("POST", "/rtharvest/schedules", {"Name": "weekly-ish", "Source": SOURCE,
                                                                     "At": "02:15", "TimeZone": "UTC"})
        assert status == 409 and "exists" in body["Error"]
        status, body = api.request("POST", "/rtharvest/schedules", {"Source": SOURCE, "At": "25:00",
                                                                     "TimeZone": "UTC"})
        assert status == 400 and "At" in body["Error"]
        status, body = api.request("POST", "/rtharvest/schedules", {"Source": "NOWHERE", "At": "01:00",
                                                                     "TimeZone": "UTC"})
        assert status == 400 and "not a configured source" in body["Error"]
        status, body = api.request("GET", "/rtharvest/schedules/nope")
        assert status == 404 and "unknown schedule" in body["Error"]
    finally:
        status, body = api.request("DELETE", "/rtharvest/schedules/weekly-ish")
        assert status == 200, body
    status, _ = api.request("GET", "/rtharvest/schedules/weekly-ish")
    assert status == 404

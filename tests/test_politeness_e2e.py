"""Politeness per contacted source, end to end: a second lookup source that every reverse
search also asks, counted at the source itself."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from rtharvest.synth.groundtruth import GroundTruth

from .conftest import Clinic
from .dimse.fault_scp import Fault, FaultScp
from .harvesting import assert_store_equals_truth, start_harvest, wait_completed
from .servers import DicomSource


def _second_lookup_source(clinic: Clinic, scp: FaultScp, settings: dict) -> None:
    source = DicomSource(name="MIMQ", aet=scp.aet, port=scp.port, kind="fault")
    clinic.restart_harvester(fresh=True, extra_sources={"MIMQ": source}, overrides={
        "RtHarvest.Sources.MIMQ": {"Backend": "orthanc", **settings},
        # Enough jobs at once that several reverse searches reach MIMQ together.
        "RtHarvest.Sources.ORTHANC_SRC": {"Backend": "orthanc", "InstanceReturnKeys": True, "MaxConcurrent": 4},
    })


def test_second_lookup_source_with_max_concurrent_1_never_sees_two_associations(clinic: Clinic,
                                                                               loaded: GroundTruth) -> None:
    # MIMQ holds nothing and takes 0.3 s per query, so concurrent reverse searches would overlap there.
    with FaultScp(Fault(delay=0.3), aet="MIMQ") as mim:
        try:
            _second_lookup_source(clinic, mim, {"MaxConcurrent": 1})
            window = loaded.window("all")
            harvest_id = start_harvest(clinic.api, window, "ORTHANC_SRC", lookup=["ORTHANC_SRC", "MIMQ"])
            wait_completed(clinic.api, harvest_id, deadline_s=300)
            assert_store_equals_truth(clinic.api, window)
            assert len(mim.finds) >= 5, "the reverse searches were expected to ask MIMQ too"
            # Counted at the source: never two associations at once.
            assert mim.max_connections_open == 1, mim.max_connections_open
            activity = clinic.api.get("/rtharvest/status")["SourceActivity"]
            assert activity["MIMQ"]["Peak"] == 1
            # Jobs did want MIMQ at the same time (the limit, not luck, kept them apart).
            assert activity["MIMQ"]["Waited"] > 0, activity
            assert activity["ORTHANC_SRC"]["Peak"] > 1, activity
        finally:
            clinic.restart_harvester(fresh=True)


def test_quiet_hours_of_a_lookup_source_in_its_time_zone(clinic: Clinic, loaded: GroundTruth) -> None:
    """MIMQ is quiet now in its own time zone (not in the machine's): no association reaches it before its
    quiet hours end; the jobs that need it wait, say why, and finish afterwards."""
    zone = "Pacific/Kiritimati"  # UTC+14: the window below does not contain the machine's time of day
    now = datetime.now(ZoneInfo(zone))
    end = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    if (end - now).total_seconds() < 25:
        end += timedelta(minutes=1)
    start = now - timedelta(hours=1)
    quiet = [start.strftime("%H:%M"), end.strftime("%H:%M")]
    ends_at = end.timestamp()
    with FaultScp(Fault(), aet="MIMQ") as mim:
        try:
            _second_lookup_source(clinic, mim, {"QuietHours": quiet, "TimeZone": zone})
            window = loaded.window("all")
            harvest_id = start_harvest(clinic.api, window, "ORTHANC_SRC", lookup=["ORTHANC_SRC", "MIMQ"])
            # While MIMQ is quiet, the jobs that must ask it wait for the end of its quiet hours.
            deadline = time.monotonic() + 60
            waiting: list[dict] = []
            while time.monotonic() < deadline and time.time() < ends_at - 2:
                pending = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&state=pending")
                waiting = [j for j in pending if "quiet hours of source MIMQ" in (j.get("LastError") or "")]
                if waiting:
                    break
                time.sleep(0.3)
            assert waiting, "no job waited for MIMQ's quiet hours"
            assert waiting[0]["LastError"].startswith("waiting: quiet hours of source MIMQ until ")
            assert clinic.api.get(f"/rtharvest/harvests/{harvest_id}")["State"] == "Running"
            wait_completed(clinic.api, harvest_id, deadline_s=ends_at - time.time() + 240)
            assert_store_equals_truth(clinic.api, window)
            assert mim.connection_times, "MIMQ was asked after its quiet hours"
            assert min(mim.connection_times) >= ends_at - 1, "MIMQ was contacted during its quiet hours"
        finally:
            clinic.restart_harvester(fresh=True)

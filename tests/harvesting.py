"""Helpers for tests that run harvests against the real servers."""

from __future__ import annotations

import time
from typing import Any, Protocol

from rtharvest.synth.groundtruth import Window

from .servers import RestClient


class WindowSpec(Protocol):
    """What a harvest is started with: a ground truth's window (synth ``Window`` or ``MosaiqWindow``)."""

    @property
    def name(self) -> str: ...
    @property
    def date_from(self) -> str | None: ...
    @property
    def date_to(self) -> str | None: ...
    @property
    def patient_ids(self) -> list[str] | None: ...


def stored_sop_uids(api: RestClient) -> dict[str, str]:
    """SOPInstanceUID → Orthanc ID of everything in the harvester."""
    found = api.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in found}


def wait_completed(api: RestClient, harvest_id: str, deadline_s: float = 240.0) -> dict[str, Any]:
    """Poll the harvest until Completed; fail with its jobs and errors otherwise."""
    deadline = time.monotonic() + deadline_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = api.get(f"/rtharvest/harvests/{harvest_id}")
        if doc["State"] == "Completed":
            return doc
        time.sleep(0.5)
    errors = api.get(f"/rtharvest/log?harvest={harvest_id}&level=warning&limit=20")
    open_jobs = [j for state in ("leased", "waiting", "pending")
                 for j in api.get(f"/rtharvest/jobs?harvest={harvest_id}&state={state}&limit=20")]
    recent = [e["Message"] for e in api.get(f"/rtharvest/log?harvest={harvest_id}&level=info&limit=20")]
    raise AssertionError(f"harvest not completed in {deadline_s} s: {doc}\nerrors: {errors}\nopen jobs: {open_jobs}"
                         f"\nrecent events: {recent}")


def start_harvest(api: RestClient, window: WindowSpec, source: str, lookup: list[str] | None = None) -> str:
    body: dict[str, Any] = {"Source": source, "Label": f"e2e {window.name}"}
    if window.date_from:
        body["From"] = window.date_from
    if window.date_to:
        body["To"] = window.date_to
    if window.patient_ids:
        body["PatientIDs"] = window.patient_ids
    if lookup:
        body["LookupSources"] = lookup
    answer = api.post("/rtharvest/harvests", body)
    assert answer["State"] == "Running"
    return str(answer["ID"])


PROVENANCE = ("HarvestId", "HarvestSource", "HarvestJob", "HarvestHop", "HarvestedAt")


def assert_store_equals_truth(api: RestClient, window: Window) -> dict[str, str]:
    stored = stored_sop_uids(api)
    expected, forbidden = set(window.expected), set(window.forbidden)
    missing = sorted(expected - set(stored))
    extra = sorted(set(stored) & forbidden)
    assert not missing, f"{len(missing)} expected instance(s) missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} forbidden instance(s) collected, e.g. {extra[:5]}"
    unexpected = sorted(set(stored) - expected)
    assert not unexpected, f"{len(unexpected)} unexpected instance(s) stored, e.g. {unexpected[:5]}"
    return stored


def provenance_of(api: RestClient, orthanc_id: str, series_cache: dict[str, dict[str, str]] | None = None
                  ) -> dict[str, str]:
    """An instance's provenance as the contract reads it: its own metadata if it carries ``HarvestId``, else
    its series' (``series_cache``: series metadata already read, by series ID)."""
    own = api.get(f"/instances/{orthanc_id}/metadata?expand")
    if own.get("HarvestId"):
        return {name: own[name] for name in PROVENANCE if name in own}
    series_id = api.get(f"/instances/{orthanc_id}/series")["ID"]
    cache = {} if series_cache is None else series_cache
    if series_id not in cache:
        cache[series_id] = api.get(f"/series/{series_id}/metadata?expand")
    return {name: cache[series_id][name] for name in PROVENANCE if name in cache[series_id]}


def assert_provenance(api: RestClient, stored: dict[str, str], harvest_id: str, sources: set[str]) -> None:
    series: dict[str, dict[str, str]] = {}
    for orthanc_id in stored.values():
        meta = provenance_of(api, orthanc_id, series)
        for name in PROVENANCE:
            assert meta.get(name), f"instance {orthanc_id} lacks {name}: {meta}"
        assert meta["HarvestId"] == harvest_id
        assert meta["HarvestSource"] in sources
        assert "->" in meta["HarvestHop"]
        assert meta["HarvestedAt"].endswith("Z")
    assert series, "every instance carried provenance of its own: none was written on a series"

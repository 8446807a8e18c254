"""End to end: a synthetic clinic in each kind of source, a harvest over REST, the store equals the truth.

Every source kind is exercised through the backend a site would configure for it (tests/conftest.py,
SOURCE_SETTINGS): plain Orthanc and dcmqrscp through Orthanc's own DICOM client, strict dcmqrscp and
pynetdicom's Q/R SCP through pynetdicom with hierarchical queries. A second harvest of the same window
must move nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth, Window
from rtharvest.synth.loader import dicom_files, index_for_dcmqrscp, store_to_scp

from .conftest import Clinic
from .servers import LOCALHOST, RestClient

PROVENANCE = ("HarvestId", "HarvestSource", "HarvestJob", "HarvestHop", "HarvestedAt")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    """A small clinic with every trap (seeded, so every run sees the same data)."""
    out = tmp_path_factory.mktemp("synthetic")
    truth = generate(out, SynthOptions(patients=6, seed=7))
    return out, truth


@pytest.fixture(scope="session")
def loaded(clinic: Clinic, synthetic: tuple[Path, GroundTruth]) -> GroundTruth:
    """The synthetic clinic stored into every source of the session."""
    out, truth = synthetic
    files = dicom_files(out)
    for source in clinic.sources.values():
        if source.kind.startswith("dcmqrscp"):
            # dcmqrscp's own way in: files in its storage area, indexed with dcmqridx.
            assert source.storage is not None
            stored = index_for_dcmqrscp(files, source.storage)
        else:
            stored = store_to_scp(files, LOCALHOST, source.port, source.aet)
        assert stored == len(files)
    return truth


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
    raise AssertionError(f"harvest not completed in {deadline_s} s: {doc}\nerrors: {errors}")


def start_harvest(api: RestClient, window: Window, source: str, lookup: list[str] | None = None) -> str:
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


def assert_store_equals_truth(api: RestClient, window: Window) -> dict[str, str]:
    stored = stored_sop_uids(api)
    expected, forbidden = set(window.expected), set(window.forbidden)
    missing = sorted(expected - set(stored))
    extra = sorted(set(stored) & forbidden)
    assert not missing, f"{len(missing)} expected instance(s) missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} forbidden instance(s) collected, e.g. {extra[:5]}"
    assert set(stored) == expected
    return stored


def assert_provenance(api: RestClient, stored: dict[str, str], harvest_id: str, sources: set[str]) -> None:
    for orthanc_id in stored.values():
        meta = api.get(f"/instances/{orthanc_id}/metadata?expand")
        for name in PROVENANCE:
            assert meta.get(name), f"instance {orthanc_id} lacks {name}: {meta}"
        assert meta["HarvestId"] == harvest_id
        assert meta["HarvestSource"] in sources
        assert "->" in meta["HarvestHop"]
        assert meta["HarvestedAt"].endswith("Z")


@pytest.mark.parametrize("source", ["ORTHANC_SRC", "DCMQRSCP", "DCMQRSCP_STRICT", "PYNETDICOM"])
def test_harvest_equals_ground_truth(clinic: Clinic, loaded: GroundTruth, source: str) -> None:
    clinic.restart_harvester(fresh=True)
    window = loaded.window("all")
    harvest_id = start_harvest(clinic.api, window, source)
    doc = wait_completed(clinic.api, harvest_id)
    # The only manual-intervention items are the clinic's dangling references, each failed for good at once.
    failed = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&state=failed")
    assert {j["Target"] for j in failed} == {d.uid for d in loaded.dangling}, failed
    assert all("not found" in j["LastError"] and j["Attempts"] == 1 for j in failed), failed
    stored = assert_store_equals_truth(clinic.api, window)
    assert_provenance(clinic.api, stored, harvest_id, {source})
    assert doc["Patients"] == window.summary.patients
    assert doc["PlansReferenced"] == window.summary.plans_referenced
    assert doc["PlansCollected"] == window.summary.plans_collected

    # A second harvest of the same window moves nothing and changes nothing.
    arrivals = clinic.api.get("/rtharvest/status")["Arrivals"]
    second = start_harvest(clinic.api, window, source)
    wait_completed(clinic.api, second)
    assert clinic.api.get("/rtharvest/status")["Arrivals"] == arrivals
    assert set(stored_sop_uids(clinic.api)) == set(stored)

"""End to end: a synthetic clinic in each kind of source, a harvest over REST, the store equals the truth.

Every source kind is exercised through the backend a site would configure for it (tests/conftest.py,
SOURCE_SETTINGS): plain Orthanc and dcmqrscp through Orthanc's own DICOM client, strict dcmqrscp and
pynetdicom with hierarchical queries, pynetdicom's Q/R SCP through pynetdicom with relational ones. A second harvest of the same window
must move nothing.
"""

from __future__ import annotations

import pytest

from rtharvest.synth.groundtruth import GroundTruth

from .conftest import Clinic
from .harvesting import assert_provenance, assert_store_equals_truth, start_harvest, stored_sop_uids, wait_completed


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

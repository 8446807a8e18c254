"""Crash recovery: SIGKILL the harvester Orthanc at seeded points of one harvest; nothing is lost.

The points are chosen by observing the harvester's own state (right after the start request, while the
treatment records move, while an instance or a series moves, while referencing objects are searched,
while provenance is written, during the end-of-harvest cleanup) and by seeded random delays after a
restart (inside callbacks and queue commits, wherever they fall). After each kill the harvester restarts
on the same store and queue. The harvest must end exactly like an uninterrupted one: the store equals the
ground truth, every kept instance carries its provenance, the manifest is the same, and the queue holds
each job once, none open, none over the attempts cap, every failure for a documented reason.

``RTHARVEST_CRASH_SEED`` changes the seed (the points are printed), ``tools/soak.py`` is the long version.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from rtharvest.synth.groundtruth import GroundTruth

from ..conftest import Clinic
from ..harvesting import start_harvest, wait_completed
from .helpers import (
    assert_harvest_equals_truth,
    assert_jobs_sound,
    harvest_with_kills,
    kill_schedule,
    normalized_manifest,
    queue_db,
)

pytestmark = pytest.mark.servers

SEED = int(os.environ.get("RTHARVEST_CRASH_SEED", "8"))
KILLS = 10
SOURCE = "ORTHANC_SRC"
ONE_WORKER = {"RtHarvest.Workers": 1}


def job_targets(clinic: Clinic, harvest_id: str) -> set[tuple[str, str, str]]:
    jobs = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&limit=10000")
    return {(j["Kind"], j["Target"], j["State"]) for j in jobs
            if j["Kind"] in ("FindTreatmentRecords", "RetrieveInstance", "RetrieveSeries")}


def test_sigkill_at_ten_points_loses_nothing(clinic: Clinic, loaded: GroundTruth) -> None:
    window = loaded.window("all")

    # The uninterrupted run the interrupted one must equal. One worker for both runs: on an idle machine the
    # default workers finish this clinic before ten kills (the outcome does not depend on the worker count).
    clinic.restart_harvester(fresh=True, overrides=ONE_WORKER)
    t0 = time.monotonic()
    reference = start_harvest(clinic.api, window, SOURCE)
    wait_completed(clinic.api, reference)
    uninterrupted_s = time.monotonic() - t0
    ref_manifest = normalized_manifest(clinic.api.get(f"/rtharvest/harvests/{reference}/manifest"))
    assert_jobs_sound(queue_db(clinic), reference)
    ref_jobs = job_targets(clinic, reference)

    clinic.restart_harvester(fresh=True, overrides=ONE_WORKER)
    # Random delays of at most 0.5 s after a restart: the harvest must outlast ten kills, and a restarted
    # harvester finishes this clinic's remaining work within about a second once it is fast.
    points = kill_schedule(random.Random(SEED), KILLS, max_delay=0.5)
    t0 = time.monotonic()
    run = harvest_with_kills(clinic, window, SOURCE, points)
    doc = wait_completed(clinic.api, run.harvest_id)
    print(f"\nseed {SEED}: uninterrupted {uninterrupted_s:.1f} s; with kills {time.monotonic() - t0:.1f} s; "
          f"killed at {run.kills}; conditions not seen (killed anyway): {run.missed}")
    kills = len(run.kills) + len(run.missed)
    assert kills >= KILLS, f"the harvest ended after {kills} kills: {run}"
    assert len(run.kills) >= 7, f"too few kill points observed: {run}"

    assert_harvest_equals_truth(clinic, window, run.harvest_id, {SOURCE})
    assert doc["Patients"] == window.summary.patients
    assert doc["PlansCollected"] == window.summary.plans_collected
    assert normalized_manifest(clinic.api.get(f"/rtharvest/harvests/{run.harvest_id}/manifest")) == ref_manifest
    assert_jobs_sound(queue_db(clinic), run.harvest_id)
    # No retrieve lost, none extra: the same objects retrieved (or failed) as in the uninterrupted run.
    # Searches are compared through their outcome (store and manifest above), not job by job: when two plans
    # share image series (the clinic's replan trap) the role a series is first reached in, and so the
    # searches it triggers, depends on timing in uninterrupted runs too.
    assert job_targets(clinic, run.harvest_id) == ref_jobs
    failed = clinic.api.get(f"/rtharvest/jobs?harvest={run.harvest_id}&state=failed")
    assert {j["Target"] for j in failed} == {d.uid for d in loaded.dangling}
    clinic.restart_harvester(fresh=True)  # the default workers again for the tests after this one

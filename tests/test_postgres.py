"""The harvester's Orthanc with its index in a real PostgreSQL (Debian's orthanc-postgresql plugin).

The cluster is the harness's own (initdb in a temporary directory, its own port, stopped by PID); each
harvester gets a new database. A harvest must equal the ground truth exactly as with the SQLite index,
a re-harvest moves nothing, and SIGKILLs of Orthanc mid-harvest lose nothing: the queue stays in local
SQLite and every retrieve first looks in the (PostgreSQL-indexed) store, so what the store already holds
is planned from it and never moved again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from rtharvest.postgres import parse_url
from rtharvest.synth.groundtruth import GroundTruth

from .conftest import Clinic
from .harvesting import assert_provenance, assert_store_equals_truth, start_harvest, stored_sop_uids, wait_completed
from .reliability.helpers import (
    STATE_POINTS,
    assert_harvest_equals_truth,
    assert_jobs_sound,
    harvest_with_kills,
    queue_db,
)
from .servers import PostgresCluster, start_postgres

pytestmark = pytest.mark.servers

SOURCE = "ORTHANC_SRC"
_databases = itertools.count(1)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    cluster = start_postgres()
    try:
        yield cluster
    finally:
        cluster.stop()


def harvester_on_postgres(clinic: Clinic, cluster: PostgresCluster) -> str:
    """Restart the harvester on a new store whose index is a new PostgreSQL database; returns its name."""
    name = f"orthanc{next(_databases)}"
    target = parse_url(cluster.create_database(name))
    clinic.restart_harvester(fresh=True, overrides={"PostgreSQL": target.section()})
    return name


def indexed_instances(cluster: PostgresCluster, database: str) -> int:
    # Orthanc's index schema: resources.resourceType 3 is an instance.
    return int(cluster.psql(database, "SELECT count(*) FROM resources WHERE resourcetype = 3"))


def test_harvest_with_postgresql_index_equals_ground_truth(clinic: Clinic, loaded: GroundTruth,
                                                           postgres: PostgresCluster) -> None:
    database = harvester_on_postgres(clinic, postgres)
    try:
        assert clinic.api.get("/rtharvest/status")["StoreIndex"] == "PostgreSQL"
        window = loaded.window("all")
        harvest_id = start_harvest(clinic.api, window, SOURCE)
        doc = wait_completed(clinic.api, harvest_id)
        stored = assert_store_equals_truth(clinic.api, window)
        assert_provenance(clinic.api, stored, harvest_id, {SOURCE})
        assert doc["PlansCollected"] == window.summary.plans_collected
        # The index really is in PostgreSQL: it lists exactly what Orthanc reports as stored.
        assert indexed_instances(postgres, database) == len(stored)

        # A second harvest of the same window moves nothing.
        arrivals = clinic.api.get("/rtharvest/status")["Arrivals"]
        second = start_harvest(clinic.api, window, SOURCE)
        wait_completed(clinic.api, second)
        assert clinic.api.get("/rtharvest/status")["Arrivals"] == arrivals
        assert set(stored_sop_uids(clinic.api)) == set(stored)
    finally:
        clinic.restart_harvester(fresh=True)


def test_sigkill_mid_harvest_with_postgresql_index_loses_nothing(clinic: Clinic, loaded: GroundTruth,
                                                                 postgres: PostgresCluster) -> None:
    database = harvester_on_postgres(clinic, postgres)
    try:
        window = loaded.window("all")
        by_name = {p.name: p for p in STATE_POINTS}
        points = [by_name[n] for n in ("right after start", "while a series moves", "while an instance moves",
                                       "during provenance writing", "during end-of-harvest cleanup")]
        run = harvest_with_kills(clinic, window, SOURCE, points)
        doc = wait_completed(clinic.api, run.harvest_id)
        print(f"\nkilled at {run.kills}; not seen (killed anyway): {run.missed}")
        assert len(run.kills) + len(run.missed) >= 3, run
        # Orthanc restarted on the same PostgreSQL index each time (Lock released by the killed process).
        assert clinic.api.get("/rtharvest/status")["StoreIndex"] == "PostgreSQL"
        assert_harvest_equals_truth(clinic, window, run.harvest_id, {SOURCE})
        assert indexed_instances(postgres, database) == len(stored_sop_uids(clinic.api))
        assert doc["PlansCollected"] == window.summary.plans_collected
        assert_jobs_sound(queue_db(clinic), run.harvest_id)
        failed = clinic.api.get(f"/rtharvest/jobs?harvest={run.harvest_id}&state=failed")
        assert {j["Target"] for j in failed} == {d.uid for d in loaded.dangling}
    finally:
        clinic.restart_harvester(fresh=True)

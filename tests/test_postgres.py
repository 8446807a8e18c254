"""The harvester's Orthanc with its index in a real PostgreSQL (Debian's orthanc-postgresql plugin).

The cluster is the harness's own (initdb in a temporary directory, its own port, stopped by PID); each
harvester gets a new database. A harvest must equal the ground truth exactly as with the SQLite index,
a re-harvest moves nothing, and SIGKILLs of Orthanc mid-harvest lose nothing: the queue stays in local
SQLite and every retrieve first looks in the (PostgreSQL-indexed) store, so what the store already holds
is planned from it and never moved again.
"""

from __future__ import annotations

import itertools
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from rtharvest.edge.postgres import parse_url
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
from .servers import PostgresCluster

pytestmark = pytest.mark.servers

SOURCE = "ORTHANC_SRC"
_databases = itertools.count(1)


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


def backup_queue(source: Path, target: Path) -> None:
    """SQLite's online backup API: a consistent copy of the queue while the harvester writes to it."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def test_backup_taken_while_harvesting_restores_to_a_complete_harvest(clinic: Clinic, loaded: GroundTruth,
                                                                      postgres: PostgresCluster,
                                                                      tmp_path: Path) -> None:
    """docs/operations.md's procedure: queue, then index, then image files, while a harvest runs; the
    restored harvester finishes that harvest and the store equals the ground truth."""
    database = harvester_on_postgres(clinic, postgres)
    try:
        window = loaded.window("all")
        harvest_id = start_harvest(clinic.api, window, SOURCE)
        deadline = time.monotonic() + 120
        while clinic.api.get("/statistics")["CountInstances"] < len(window.expected) // 4:
            assert time.monotonic() < deadline, "the harvest stored nothing"
            time.sleep(0.05)
        run_dir = clinic.harvester.run_dir
        backup = tmp_path / "backup"
        backup.mkdir()
        # The order makes the three parts consistent: what the (older) queue believes missing and the
        # index holds is planned from the store; every file the index names is in the (newer) copy.
        backup_queue(queue_db(clinic), backup / "rtharvest.sqlite")
        stored_before_dump = len(stored_sop_uids(clinic.api))
        postgres.dump(database, backup / "index.dump")
        shutil.copytree(run_dir / "storage", backup / "storage")
        assert clinic.api.get(f"/rtharvest/harvests/{harvest_id}")["State"] == "Running", \
            "the backup must be taken while harvesting"

        # Disaster: the harvester's machine is lost. Restore into a new directory and a new database.
        restored_dir = clinic.base / f"restored-{database}"
        restored_dir.mkdir()
        shutil.copytree(backup / "storage", restored_dir / "storage")
        shutil.copy(backup / "rtharvest.sqlite", restored_dir / "rtharvest.sqlite")
        target = parse_url(postgres.restore(backup / "index.dump", f"{database}_restored"))
        assert indexed_instances(postgres, f"{database}_restored") >= stored_before_dump > 0
        clinic.restart_harvester(overrides={"PostgreSQL": target.section()}, run_dir=restored_dir)
        doc = wait_completed(clinic.api, harvest_id)
        assert_harvest_equals_truth(clinic, window, harvest_id, {SOURCE})
        assert doc["PlansCollected"] == window.summary.plans_collected
        assert_jobs_sound(queue_db(clinic), harvest_id)
        assert indexed_instances(postgres, f"{database}_restored") == len(stored_sop_uids(clinic.api))
    finally:
        clinic.restart_harvester(fresh=True)


#: What a queue database believes missing: undecided expectations of moving jobs and pending retrieves of
#: named instances without a decision (what the start-up reconciliation checks against the store).
_BELIEVED_MISSING = (
    "SELECT count(*) FROM (SELECT e.sop_uid FROM rth_expectations e WHERE e.harvest_id = :h AND e.ended_at IS NULL"
    "  AND NOT EXISTS"
    "  (SELECT 1 FROM rth_objects o WHERE o.harvest_id = e.harvest_id AND o.sop_uid = e.sop_uid)"
    " UNION SELECT json_extract(j.payload, '$.sop_uid') FROM jobs j WHERE j.harvest_id = :h"
    "  AND j.kind = 'RetrieveInstance' AND j.state IN ('pending', 'waiting') AND NOT EXISTS"
    "  (SELECT 1 FROM rth_objects o WHERE o.harvest_id = j.harvest_id"
    "   AND o.sop_uid = json_extract(j.payload, '$.sop_uid')))"
)


def test_queue_older_than_the_store_is_reconciled_on_start(clinic: Clinic, loaded: GroundTruth,
                                                           postgres: PostgresCluster, tmp_path: Path) -> None:
    """The queue is restored from a backup taken mid-harvest while the index and files hold the finished
    harvest: on start, before any worker runs, what the queue believes missing is found in the store and
    planned from the stored copies; the harvest completes equal to the ground truth and nothing the store
    holds is moved again. (A candidate the finished harvest inspected, rejected and removed after the
    backup is not in the store, and the restored queue never saw its rejection: its search may move it in
    again, and it ends rejected and removed again.)"""
    harvester_on_postgres(clinic, postgres)
    try:
        window = loaded.window("all")
        harvest_id = start_harvest(clinic.api, window, SOURCE)
        deadline = time.monotonic() + 120
        while clinic.api.get("/statistics")["CountInstances"] < len(window.expected) // 4:
            assert time.monotonic() < deadline, "the harvest stored nothing"
            time.sleep(0.05)
        # A consistent copy of the queue at a moment it believes something missing (a move in flight or a
        # named retrieve pending), which the harvest then stores.
        backup = tmp_path / "rtharvest.sqlite"
        while True:
            backup.unlink(missing_ok=True)
            backup_queue(queue_db(clinic), backup)
            with sqlite3.connect(backup) as conn:
                believed_missing = int(conn.execute(_BELIEVED_MISSING, {"h": harvest_id}).fetchone()[0])
                running = conn.execute("SELECT state FROM harvests WHERE id = ?", (harvest_id,)).fetchone()[0]
            conn.close()
            assert running == "Running", "the harvest ended before a backup believed anything missing"
            if believed_missing:
                break
            time.sleep(0.02)
        wait_completed(clinic.api, harvest_id)
        stored = assert_store_equals_truth(clinic.api, window)

        # Restore only the queue: the store (PostgreSQL index and files) is newer than it.
        clinic.harvester.stop()
        db = queue_db(clinic)
        for leftover in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            leftover.unlink(missing_ok=True)
        shutil.copy(backup, db)
        restarted_at = time.time()
        clinic.restart_harvester(fresh=False)
        deadline = time.monotonic() + 120
        # Present from ORTHANC_STARTED on (the REST API answers a moment earlier), Done before the workers start.
        while not (status := clinic.api.get("/rtharvest/status")).get("StartupReconciliation", {}).get("Done"):
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        reconciliation = status["StartupReconciliation"]
        print(f"\nbacked-up queue believed {believed_missing} missing; reconciliation: {reconciliation}")
        assert reconciliation["Checked"] >= believed_missing > 0
        assert reconciliation["PlannedFromStore"] > 0, reconciliation
        assert reconciliation["Failed"] == 0 and "Error" not in reconciliation, reconciliation
        events = clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&level=info&limit=500")
        summaries = [e["Message"] for e in events if e["Message"].startswith("start-up reconciliation:")]
        assert len(summaries) == 1, summaries

        doc = wait_completed(clinic.api, harvest_id)
        status = clinic.api.get("/rtharvest/status")
        # Nothing stored was moved again: whatever arrived after the restart is a candidate the store did not
        # hold, inspected and rejected again.
        # (Decisions taken since the restart: the reconciled instances, planned from the store, and any
        # instance moved in again; an arrival of an instance the store held would be counted in Arrivals
        # without being one of the latter.)
        with sqlite3.connect(f"file:{queue_db(clinic)}?mode=ro", uri=True) as conn:
            decided = conn.execute("SELECT sop_uid, decision FROM rth_objects WHERE harvest_id = ? AND moved = 1"
                                   " AND arrived_at >= ?", (harvest_id, restarted_at)).fetchall()
        conn.close()
        again = {uid: decision for uid, decision in decided if uid not in set(stored)}
        print(f"after the restart: {status['Arrivals']} arrival(s); not held by the store: {again}")
        assert status["Arrivals"] == len(again), (status["Arrivals"], again)
        assert all(decision == "rejected" for decision in again.values()), again
        assert status["SourceActivity"].get(SOURCE, {}).get("Moves", 0) <= len(again), status["SourceActivity"]
        assert_harvest_equals_truth(clinic, window, harvest_id, {SOURCE})
        assert set(stored_sop_uids(clinic.api)) == set(stored)
        assert doc["PlansCollected"] == window.summary.plans_collected
        assert_jobs_sound(queue_db(clinic), harvest_id)
    finally:
        clinic.restart_harvester(fresh=True)

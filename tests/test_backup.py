"""``rtharvest backup`` taken mid-harvest and ``rtharvest restore`` into a fresh harvester (docs/operations.md,
"Backups"): the harvests, a finished harvest's manifest, the schedules and the export database's secret and
pseudonyms come back unchanged, and the interrupted harvest completes equal to the ground truth."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from rtharvest.cli.commands import main as cli_main
from rtharvest.edge.postgres import parse_url
from rtharvest.synth.groundtruth import GroundTruth

from .conftest import Clinic
from .harvesting import assert_store_equals_truth, provenance_of, start_harvest, wait_completed
from .reliability.helpers import assert_jobs_sound, normalized_manifest, queue_db
from .servers import PostgresCluster

pytestmark = pytest.mark.servers

SOURCE = "ORTHANC_SRC"


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return sorted(conn.execute(sql).fetchall())


def _cli(*args: str) -> str:
    out = io.StringIO()
    code = cli_main(list(args), out=out, env={})
    assert code == 0, out.getvalue()
    return out.getvalue()


def _harvest_list(clinic: Clinic) -> list[dict[str, Any]]:
    keep = ("ID", "Source", "LookupSources", "Label", "CreatedAt", "From", "To", "PatientIDs")
    return [{k: d[k] for k in keep} for d in clinic.api.get("/rtharvest/harvests?limit=1000")]


def _schedules(clinic: Clinic) -> list[dict[str, Any]]:
    return [{k: v for k, v in s.items() if k != "NextRun"} for s in clinic.api.get("/rtharvest/schedules")]


def test_backup_mid_harvest_restores_harvests_manifests_schedules_and_pseudonyms(
        clinic: Clinic, loaded: GroundTruth, postgres: PostgresCluster, tmp_path: Path) -> None:
    source_pg = parse_url(postgres.create_database("backup_src"))
    export = {"RtHarvest.Export": {"Folders": {"OUT": str(tmp_path / "exported")}}}
    clinic.restart_harvester(fresh=True, overrides={"PostgreSQL": source_pg.section(), **export})
    try:
        # A finished harvest with an export (so the export database holds a secret and pseudonyms) ...
        window = loaded.window("all")
        first = start_harvest(clinic.api, window, SOURCE)
        wait_completed(clinic.api, first)
        exported = clinic.api.post("/rtharvest/exports", {"Harvest": first, "Destination": "OUT"})
        deadline = time.monotonic() + 180
        while clinic.api.get(f"/rtharvest/exports/{exported['ID']}")["State"] == "Running":
            assert time.monotonic() < deadline, "the export did not finish"
            time.sleep(0.3)
        # ... a schedule created over REST (it lives in the queue database) ...
        clinic.api.post("/rtharvest/schedules", {"Name": "nightly", "Source": SOURCE, "At": "01:00",
                                                 "TimeZone": "Europe/Zurich", "OverlapDays": 3})
        run_dir = clinic.harvester.run_dir
        manifest_before = normalized_manifest(clinic.api.get(f"/rtharvest/harvests/{first}/manifest"))
        schedules_before = _schedules(clinic)
        exports_db = run_dir / "rtharvest-exports.sqlite"
        pseudonyms_before = _rows(exports_db, "SELECT * FROM rth_pseudonyms")
        # The site secret lives apart from the pseudonym map, in its own owner-only file.
        secret_file = run_dir / "rtharvest-exports.secret"
        secret_before = secret_file.read_bytes()
        assert pseudonyms_before and secret_before and secret_file.stat().st_mode & 0o777 == 0o600

        # ... and a harvest moving instances in while the backup is taken: half the store is lost (deleted)
        # and harvested again.
        instances = clinic.api.get("/instances")
        for orthanc_id in instances[::2]:
            clinic.api.request("DELETE", f"/instances/{orthanc_id}")
        second = start_harvest(clinic.api, window, SOURCE)
        deadline = time.monotonic() + 120
        while clinic.api.get("/statistics")["CountInstances"] < len(instances) * 3 // 4:
            assert time.monotonic() < deadline, "the second harvest moved nothing"
            time.sleep(0.05)
        harvests_before = _harvest_list(clinic)
        backup = tmp_path / "backup"
        described = json.loads(_cli("backup", str(backup), "--config", str(run_dir / "orthanc.json"))
                               .strip().splitlines()[-1])
        assert clinic.api.get(f"/rtharvest/harvests/{second}")["State"] == "Running", \
            "the backup must be taken while harvesting"
        assert described["WhileRunning"] is True and described["Index"] == "PostgreSQL"
        assert described["Schedules"] == 1 and described["Pseudonyms"] == len(pseudonyms_before)
        assert described["ExportSecretFile"] is True
        assert (backup / "exports.secret").stat().st_mode & 0o777 == 0o600

        # Disaster: the machine is lost. A new directory and a new (empty) database, the same orthanc.json
        # otherwise; restore there with the command, then start the harvester on it.
        restored_dir = clinic.base / "restored-backup"
        restored_dir.mkdir()
        target_pg = parse_url(postgres.create_database("backup_restored"))
        config = json.loads((run_dir / "orthanc.json").read_text())
        config["StorageDirectory"] = config["IndexDirectory"] = str(restored_dir / "storage")
        config["RtHarvest"]["DatabasePath"] = str(restored_dir / "rtharvest.sqlite")
        config["PostgreSQL"] = target_pg.section(config["PostgreSQL"])
        (restored_dir / "target.json").write_text(json.dumps(config))
        _cli("restore", str(backup), "--config", str(restored_dir / "target.json"))
        clinic.restart_harvester(overrides={"PostgreSQL": target_pg.section(), **export}, run_dir=restored_dir)

        assert _harvest_list(clinic) == harvests_before
        assert _schedules(clinic) == schedules_before
        restored_exports = restored_dir / "rtharvest-exports.sqlite"
        assert _rows(restored_exports, "SELECT * FROM rth_pseudonyms") == pseudonyms_before
        restored_secret = restored_dir / "rtharvest-exports.secret"
        assert restored_secret.read_bytes() == secret_before and restored_secret.stat().st_mode & 0o777 == 0o600
        wait_completed(clinic.api, second, deadline_s=300)
        stored = assert_store_equals_truth(clinic.api, window)
        # Kept instances keep the first harvest's provenance; the lost half got the second's.
        series_cache: dict[str, dict[str, str]] = {}
        harvested_by = {provenance_of(clinic.api, oid, series_cache)["HarvestId"] for oid in stored.values()}
        assert harvested_by == {first, second}
        assert_jobs_sound(queue_db(clinic), second)
        # The store is whole again: the first harvest's manifest is what it was before the backup.
        assert normalized_manifest(clinic.api.get(f"/rtharvest/harvests/{first}/manifest")) == manifest_before
    finally:
        clinic.restart_harvester(fresh=True)

"""What docs/operations.md promises an operator: log retention, restarts that reclaim work, online backups."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from rtharvest.synth.groundtruth import GroundTruth

from ..conftest import Clinic
from ..harvesting import start_harvest, wait_completed
from .helpers import db_rows, queue_db

pytestmark = pytest.mark.servers


def test_log_retention_purges_old_events(clinic: Clinic) -> None:
    clinic.restart_harvester(fresh=True)
    path = queue_db(clinic)
    clinic.harvester.stop()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO events (time, level, component, message) VALUES (?, 20, 'test', 'ancient')",
                     (time.time() - 3 * 86400,))
        conn.execute("INSERT INTO events (time, level, component, message) VALUES (?, 20, 'test', 'recent')",
                     (time.time() - 3600,))
    conn.close()
    clinic.restart_harvester(fresh=False, overrides={"RtHarvest.LogRetentionDays": 2})
    deadline = time.monotonic() + 10
    messages: list[str] = []
    while time.monotonic() < deadline:
        messages = [e["Message"] for e in clinic.api.get("/rtharvest/log?limit=1000")]
        if any("purged" in m for m in messages):
            break
        time.sleep(0.2)
    assert "ancient" not in messages and "recent" in messages, messages
    assert any("purged 1 event(s) older than 2 day(s)" in m for m in messages), messages
    clinic.restart_harvester(fresh=True)


def test_online_backup_while_harvesting_is_consistent(clinic: Clinic, loaded: GroundTruth, tmp_path: Path) -> None:
    """The documented backup (SQLite's online backup API, as ``sqlite3 db ".backup file"`` does) taken in the
    middle of a harvest opens as a consistent database."""
    clinic.restart_harvester(fresh=True)
    harvest_id = start_harvest(clinic.api, loaded.window("all"), "ORTHANC_SRC")
    deadline = time.monotonic() + 30
    while not db_rows(queue_db(clinic), "SELECT 1 FROM jobs WHERE harvest_id = ? AND state = 'done' LIMIT 1",
                      (harvest_id,)):  # the harvest is under way: jobs done, others still to run
        assert time.monotonic() < deadline, "the harvest did not start"
        time.sleep(0.05)
    source = sqlite3.connect(f"file:{queue_db(clinic)}?mode=ro", uri=True)
    target = sqlite3.connect(tmp_path / "backup.sqlite")
    source.backup(target)
    source.close()
    assert target.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert target.execute("SELECT count(*) FROM jobs WHERE harvest_id = ?", (harvest_id,)).fetchone()[0] >= 1
    target.close()
    wait_completed(clinic.api, harvest_id)

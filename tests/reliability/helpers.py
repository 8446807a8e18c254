"""Shared helpers of the reliability tests (and tools/soak.py): kill points, queue database reads, checks."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtharvest.synth.groundtruth import Window

from ..conftest import Clinic
from ..harvesting import assert_provenance, assert_store_equals_truth, start_harvest

#: Why a job may legitimately end FAILED in a harvest of the synthetic clinic (documented reasons).
DOCUMENTED_FAILURES = ("not found at",)


def queue_db(clinic: Clinic) -> Path:
    """The harvester's queue database file (in its run directory)."""
    return Path(clinic.harvester.config["RtHarvest"]["DatabasePath"])


def db_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read-only query of the queue database, safe while the harvester runs (WAL readers never block)."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return list(conn.execute(sql, params).fetchall())
    except sqlite3.OperationalError:
        return []  # schema not created yet (killed before the first migration) or busy
    finally:
        conn.close()


def leased_kinds(path: Path, harvest_id: str) -> set[str]:
    return {r[0] for r in db_rows(path, "SELECT kind FROM jobs WHERE harvest_id = ? AND state = 'leased'",
                                  (harvest_id,))}


def outbox_size(path: Path) -> int:
    rows = db_rows(path, "SELECT count(*) FROM rth_provenance_outbox")
    return int(rows[0][0]) if rows else 0


def harvest_state(path: Path, harvest_id: str) -> str | None:
    rows = db_rows(path, "SELECT state FROM harvests WHERE id = ?", (harvest_id,))
    return str(rows[0][0]) if rows else None


def cleanup_done(path: Path, harvest_id: str) -> bool:
    return bool(db_rows(path, "SELECT 1 FROM rth_cleanup WHERE harvest_id = ?", (harvest_id,)))


@dataclass(frozen=True)
class KillPoint:
    """Where to SIGKILL the harvester: a condition observed on its state, or a seeded random delay."""

    name: str
    condition: Callable[[Path, str], bool] | None = None
    delay: float = 0.0

    def wait(self, path: Path, harvest_id: str, budget: float) -> bool:
        """Wait for the condition (or the delay); True when the condition was observed before ``budget``."""
        if self.condition is None:
            time.sleep(self.delay)
            return True
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            if self.condition(path, harvest_id):
                return True
            time.sleep(0.01)
        return False


STATE_POINTS = [
    KillPoint("right after start", lambda p, h: True),
    KillPoint("while records move", lambda p, h: "FindTreatmentRecords" in leased_kinds(p, h)),
    KillPoint("while an instance moves", lambda p, h: "RetrieveInstance" in leased_kinds(p, h)),
    KillPoint("while a series moves", lambda p, h: "RetrieveSeries" in leased_kinds(p, h)),
    KillPoint("while searching referencing objects",
              lambda p, h: bool(leased_kinds(p, h) & {"FindReferencing", "FindSeriesInFrameOfReference"})),
    KillPoint("during provenance writing", lambda p, h: outbox_size(p) > 0),
    KillPoint("during end-of-harvest cleanup",
              lambda p, h: harvest_state(p, h) == "Completed" and not cleanup_done(p, h)),
]


def kill_schedule(rng: random.Random, kills: int, max_delay: float = 1.0) -> list[KillPoint]:
    """``kills`` points in harvest order: the start, the records, the mid-harvest state points and seeded
    random delays shuffled together, the end-of-harvest cleanup last."""
    start, records, *middle, cleanup = STATE_POINTS
    delays = [round(rng.uniform(0.05, max_delay), 3) for _ in range(max(0, kills - len(STATE_POINTS)))]
    mixed = middle + [KillPoint(f"{d:.2f} s after restart", None, d) for d in delays]
    rng.shuffle(mixed)
    return [start, records, *mixed, cleanup]


@dataclass
class CrashRun:
    """What a harvest under kills went through."""

    harvest_id: str
    kills: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)


def harvest_with_kills(clinic: Clinic, window: Window, source: str, points: list[KillPoint],
                       condition_budget: float = 6.0) -> CrashRun:
    """Start a harvest and SIGKILL the harvester at each point, restarting it each time (store and queue kept).

    A state point whose condition is not seen within ``condition_budget`` seconds (the harvest went past
    it) kills there anyway and is reported in ``missed``; a harvest that already completed is not killed.
    """
    path = queue_db(clinic)
    run: CrashRun | None = None
    for point in points:
        if run is None:
            run = CrashRun(start_harvest(clinic.api, window, source))
        elif harvest_state(path, run.harvest_id) == "Completed" and cleanup_done(path, run.harvest_id):
            break
        seen = point.wait(path, run.harvest_id, condition_budget)
        clinic.harvester.kill()
        (run.kills if seen else run.missed).append(point.name)
        clinic.restart_harvester(fresh=False)
    assert run is not None
    return run


def job_rows(path: Path, harvest_id: str) -> list[dict[str, Any]]:
    cols = ("id", "kind", "dedupe_key", "state", "attempts", "max_attempts", "last_error", "dimse_status")
    rows = db_rows(path, f"SELECT {', '.join(cols)} FROM jobs WHERE harvest_id = ? ORDER BY id",  # noqa: S608
                   (harvest_id,))
    return [dict(zip(cols, r, strict=True)) for r in rows]


def assert_jobs_sound(path: Path, harvest_id: str, max_attempts: int = 10) -> list[dict[str, Any]]:
    """No duplicate job, none open, none over the cap, every failure for a documented reason."""
    jobs = job_rows(path, harvest_id)
    keys = [j["dedupe_key"] for j in jobs]
    assert len(keys) == len(set(keys)), "duplicated jobs"
    for j in jobs:
        assert j["state"] in ("done", "failed"), j
        assert j["attempts"] <= max_attempts, j
        if j["state"] == "failed":
            assert any(r in (j["last_error"] or "") for r in DOCUMENTED_FAILURES), j
    return jobs


def normalized_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parts of a manifest that must not depend on the harvest's id or on interruptions."""
    plans = sorted(({k: v for k, v in p.items() if k != "Harvest"} for p in manifest["Plans"]),
                   key=lambda p: str(p.get("PlanUID")))
    failures = sorted(str(f.get("UID") or f.get("Target") or f) for f in manifest.get("Failures", []))
    return {"Summary": manifest["Summary"], "Plans": plans, "Failures": failures}


def assert_harvest_equals_truth(clinic: Clinic, window: Window, harvest_id: str, sources: set[str]) -> None:
    stored = assert_store_equals_truth(clinic.api, window)
    assert_provenance(clinic.api, stored, harvest_id, sources)

"""Planner statistics in Orthanc's SQLite index (rtharvest/edge/indexstats.py), on indexes written by
Orthanc 1.10.1 itself: a plain Orthanc (no plugin) and the harvester's own store. Plans are read with the
standard library's sqlite3, the system's SQLite that Orthanc links."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from rtharvest.edge.indexstats import (
    REPRESENTATIVE,
    IndexStatistics,
    ensure_statistics,
    ensure_statistics_logged,
    index_file,
)
from rtharvest.edge.launcher import OrthancProcess
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, store_to_scp

from .conftest import Clinic
from .servers import LOCALHOST

#: The shape of Orthanc's instance look-up by SOPInstanceUID (``/tools/find``, C-FIND/C-MOVE by UID).
LOOKUP = ("SELECT instances.publicId FROM Resources AS instances INNER JOIN DicomIdentifiers t0 "
          "ON t0.id = instances.internalId AND t0.tagGroup = 8 AND t0.tagElement = 24 "
          "WHERE instances.resourceType = 3 AND t0.value = ?")


def plan_of(path: Path) -> str:
    """How SQLite would answer the look-up on this index."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return " / ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + LOOKUP, ("1.2.3",)))


def stats(path: Path) -> dict[str, str]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            return {str(idx): str(stat) for _, idx, stat in conn.execute("SELECT tbl, idx, stat FROM sqlite_stat1")}
        except sqlite3.OperationalError:
            return {}


def change(path: Path, sql: str) -> None:
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(sql)


@pytest.fixture(scope="module")
def orthanc_index(tmp_path_factory: pytest.TempPathFactory, synthetic: tuple[Path, GroundTruth]) -> Path:
    """The index of a plain Orthanc (no plugin) that stored the synthetic clinic, once it stopped (a running
    Orthanc holds its index exclusively once it has written to it)."""
    run_dir = tmp_path_factory.mktemp("plain-orthanc")
    orthanc = OrthancProcess(run_dir, {"DicomAlwaysAllowStore": True, "AuthenticationEnabled": False},
                             aet="PLAIN", plugin=False).start()
    try:
        files = dicom_files(synthetic[0])
        assert store_to_scp(files, LOCALHOST, orthanc.dicom_port, "PLAIN") == len(files)
    finally:
        orthanc.stop()
    return index_file(run_dir / "storage")


@pytest.fixture
def source_index(orthanc_index: Path, tmp_path: Path) -> Path:
    """A copy of that index (each test changes its own)."""
    for suffix in ("", "-wal"):
        if Path(f"{orthanc_index}{suffix}").exists():
            shutil.copy(f"{orthanc_index}{suffix}", tmp_path / f"index{suffix}")
    return tmp_path / "index"


def test_orthanc_alone_scans_every_uid_and_statistics_make_it_use_the_value_index(source_index: Path) -> None:
    assert "sqlite_stat1" not in stats(source_index) and "DicomIdentifiersIndex2" in plan_of(source_index)
    assert ensure_statistics(source_index) is IndexStatistics.ANALYSED
    assert "DicomIdentifiersIndexValues" in plan_of(source_index)
    analysed = stats(source_index)
    assert analysed["DicomIdentifiersIndexValues"] != dict((i, s) for _, i, s in REPRESENTATIVE)[
        "DicomIdentifiersIndexValues"]  # this store's own counts
    assert ensure_statistics(source_index) is IndexStatistics.PRESENT and stats(source_index) == analysed


def test_an_empty_index_gets_the_representative_statistics(source_index: Path) -> None:
    change(source_index, "DELETE FROM DicomIdentifiers")
    assert ensure_statistics(source_index) is IndexStatistics.REPRESENTATIVE
    assert "DicomIdentifiersIndexValues" in plan_of(source_index)
    assert {i: s for _, i, s in REPRESENTATIVE}.items() <= stats(source_index).items()


def test_a_locked_index_is_left_as_it_was_and_the_failure_is_logged(source_index: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with closing(sqlite3.connect(source_index, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")  # what a write of Orthanc's looks like from here
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            ensure_statistics(source_index, busy_timeout_ms=50)
        with caplog.at_level(logging.WARNING, logger="rtharvest.indexstats"):
            assert ensure_statistics_logged(source_index, "in a test", busy_timeout_ms=50) is None
        holder.execute("ROLLBACK")
    assert f"index {source_index} has no planner statistics and they could not be written in a test" in caplog.text
    assert stats(source_index) == {} and "DicomIdentifiersIndex2" in plan_of(source_index)
    shutil.copy(source_index, source_index.parent / "not-orthanc")
    change(source_index.parent / "not-orthanc", "DROP TABLE DicomIdentifiers")
    assert ensure_statistics(source_index.parent / "not-orthanc") is IndexStatistics.NOT_ORTHANC
    assert stats(source_index.parent / "not-orthanc") == {}


def test_a_new_store_is_created_holding_only_the_statistics(tmp_path: Path) -> None:
    index = tmp_path / "new" / "index"
    assert ensure_statistics(index) is IndexStatistics.REPRESENTATIVE
    with closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as conn:
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not tables - {"sqlite_stat1", "sqlite_stat4"}  # Orthanc finds none of its tables: a new index
    assert stats(index) == {i: s for _, i, s in REPRESENTATIVE}


def test_the_harvester_gives_a_new_store_statistics_and_analyses_one_without(clinic: Clinic,
                                                                            orthanc_index: Path) -> None:
    # A new store: the plugin prepares the index file before Orthanc creates its tables in it.
    try:
        clinic.restart_harvester(fresh=True)
        index = index_file(clinic.harvester.run_dir / "storage")
        assert clinic.api.get("/rtharvest/status")["Health"]["StoreIndex"]["State"] in ("Ok", "Unknown")
        clinic.harvester.stop()  # read once Orthanc let go of the file
        assert "DicomIdentifiersIndexValues" in plan_of(index)
        assert stats(index) == {i: s for _, i, s in REPRESENTATIVE}
        # A store that has none (written by Orthanc without the plugin): analysed before Orthanc opens it.
        prepared = clinic.base / "harvester-unanalysed"
        (prepared / "storage").mkdir(parents=True)
        for suffix in ("", "-wal"):
            if Path(f"{orthanc_index}{suffix}").exists():
                shutil.copy(f"{orthanc_index}{suffix}", prepared / "storage" / f"index{suffix}")
        assert stats(index_file(prepared / "storage")) == {}
        clinic.restart_harvester(fresh=False, run_dir=prepared)
        assert clinic.api.get("/statistics")["CountInstances"] > 0  # Orthanc opened the prepared index
        clinic.harvester.stop()
        analysed = stats(index_file(prepared / "storage"))
        assert analysed["DicomIdentifiersIndexValues"] != dict(
            (i, s) for _, i, s in REPRESENTATIVE)["DicomIdentifiersIndexValues"]
        assert "DicomIdentifiersIndexValues" in plan_of(index_file(prepared / "storage"))
    finally:
        clinic.restart_harvester(fresh=True)

"""Query-planner statistics for Orthanc's own SQLite index.

Orthanc 1.10.1 never runs ``ANALYZE`` on its SQLite index, so SQLite plans a match of one identifier
(``/tools/find`` by SOPInstanceUID or SeriesInstanceUID, and a C-FIND or C-MOVE by UID) without
statistics: it walks every value of the tag through ``DicomIdentifiersIndex2`` (tagGroup, tagElement)
instead of looking the value up in ``DicomIdentifiersIndexValues``. Every look-up then costs time in
proportion to the store (measured with a plain Orthanc, median of 40 ``/tools/find`` by SOPInstanceUID:
5.5 ms at 11,163 instances, 16.8 ms at 54,638; ``benchmarks/store_scale.py``: 71.8 ms at 200,000), and a
site's store grows for years. With statistics SQLite uses the value index: 1.9 ms at 54,638 instances,
read by the running Orthanc as soon as they are committed (``ANALYZE`` changes the schema, which makes every
connection reload it).

The statistics only need to describe the index's shape (a UID value names one or two rows; one tag is
shared by a third of them), which does not change as the store grows, so they are set once per store and
kept in the index file, when the plugin starts, *before* Orthanc opens the file (the Python plugin is
initialised first):

* an index with identifiers is analysed (``ANALYZE`` with ``analysis_limit``: milliseconds at any size);
* a new store has no index file yet: it is created holding only the statistics measured on a clinic-sized
  store (:data:`REPRESENTATIVE`), and Orthanc, finding none of its tables, creates its schema in it as in
  any new file (an index with too few identifiers to analyse gets the same rows).

Never while Orthanc has the file open: Orthanc 1.10.1 sets no busy timeout on its index, so one of its
writes that meets another connection's lock fails at once (measured: "SQLite error code 5", the C-STORE
fails), and it keeps its WAL index in its own memory once it has written (an outside write is then lost
when it closes the file: measured). The PostgreSQL index keeps its own statistics.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import urllib.parse
from contextlib import closing
from pathlib import Path

log = logging.getLogger("rtharvest.indexstats")

#: Rows sampled per index by ANALYZE (SQLite's ``analysis_limit``): bounded time at any store size.
ANALYSIS_LIMIT = 1000
#: Below this many identifier rows an index is given :data:`REPRESENTATIVE` instead of being analysed.
ANALYSE_FROM_ROWS = 1000
#: ``sqlite_stat1`` rows of Orthanc 1.10.1's index holding 54,638 RT instances of 1,001 patients (a full
#: ANALYZE of ``benchmarks/clinic_scale.py``'s source): the shape a store of DICOM objects has.
REPRESENTATIVE: tuple[tuple[str, str, str], ...] = (
    ("DicomIdentifiers", "DicomIdentifiersIndexValues", "173685 2"),
    ("DicomIdentifiers", "DicomIdentifiersIndex2", "173685 57895 19299"),
    ("DicomIdentifiers", "DicomIdentifiersIndex1", "173685 2"),
    ("DicomIdentifiers", "sqlite_autoindex_DicomIdentifiers_1", "173685 2 2 1"),
    ("Resources", "ResourceTypeIndex", "87489 21873"),
    ("Resources", "PublicIndex", "87489 1"),
    ("Resources", "ChildrenIndex", "87489 3"),
    ("MainDicomTags", "MainDicomTagsIndex1", "672962 8"),
    ("MainDicomTags", "sqlite_autoindex_MainDicomTags_1", "672962 8 4 1"),
    ("Metadata", "sqlite_autoindex_Metadata_1", "527377 7 1"),
    ("AttachedFiles", "sqlite_autoindex_AttachedFiles_1", "54638 1 1"),
)


class IndexStatistics(enum.Enum):
    """What :func:`ensure_statistics` found or did."""

    PRESENT = "present"          # the index had statistics already: nothing written
    ANALYSED = "analysed"        # ANALYZE gathered them from the index's own rows
    REPRESENTATIVE = "representative"  # a new or nearly empty index: REPRESENTATIVE written
    NOT_ORTHANC = "not Orthanc's"  # a file without Orthanc's tables: left alone


def index_file(index_directory: Path) -> Path:
    """Orthanc's SQLite index in its ``IndexDirectory``."""
    return index_directory / "index"


def ensure_statistics(path: Path, busy_timeout_ms: int = 2000) -> IndexStatistics:
    """Give Orthanc's SQLite index at ``path`` planner statistics unless it has them (see the module); only
    while Orthanc does not have the file open. A missing file is created holding the statistics only.

    Raises :class:`sqlite3.Error` or :class:`OSError` when the index cannot be read or written (locked
    longer than ``busy_timeout_ms``, read-only, corrupt); nothing is changed then.
    """
    new = not path.exists()
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
    # One transaction each; closing the connection without COMMIT (an error) rolls it back.
    with closing(_connect(path, "rwc" if new else "rw", busy_timeout_ms)) as conn:
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not new and "DicomIdentifiers" not in tables:
            return IndexStatistics.NOT_ORTHANC
        if "sqlite_stat1" in tables and conn.execute(
                "SELECT 1 FROM sqlite_stat1 WHERE idx = 'DicomIdentifiersIndexValues'").fetchone():
            return IndexStatistics.PRESENT
        counted = 0 if new else conn.execute("SELECT count(*) FROM (SELECT 1 FROM DicomIdentifiers LIMIT ?)",
                                             (ANALYSE_FROM_ROWS,)).fetchone()[0]
        analyse = int(counted) >= ANALYSE_FROM_ROWS
        conn.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ANALYZE")  # also creates sqlite_stat1 in a new file (with nothing to analyse)
        if not analyse:  # too few rows to say anything (an empty table gets no row from ANALYZE)
            rows = [row for row in REPRESENTATIVE if new or row[0] in tables]
            conn.executemany("DELETE FROM sqlite_stat1 WHERE tbl = ?", [(t,) for t in {row[0] for row in rows}])
            conn.executemany("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", rows)
        conn.execute("COMMIT")
    return IndexStatistics.ANALYSED if analyse else IndexStatistics.REPRESENTATIVE


def _connect(path: Path, mode: str, busy_timeout_ms: int) -> sqlite3.Connection:
    # The standard library's sqlite3, which links the system's SQLite like Orthanc does (the project's apsw
    # bundles a newer one): the statistics are written by the library that will read them.
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=busy_timeout_ms / 1000, isolation_level=None)


def ensure_statistics_logged(path: Path, moment: str, busy_timeout_ms: int = 2000) -> IndexStatistics | None:
    """:func:`ensure_statistics`, logging what it did; None (logged, never raised) when it failed: the
    store then works as before, with look-ups that slow down as it grows."""
    try:
        outcome = ensure_statistics(path, busy_timeout_ms)
    except (sqlite3.Error, OSError) as exc:
        log.warning("Orthanc's SQLite index %s has no planner statistics and they could not be written %s (%s): "
                    "look-ups by UID scan the index and slow down as the store grows", path, moment,
                    type(exc).__name__)
        return None
    if outcome in (IndexStatistics.ANALYSED, IndexStatistics.REPRESENTATIVE):
        log.info("planner statistics written into Orthanc's SQLite index %s (%s)", moment, outcome.value)
    return outcome

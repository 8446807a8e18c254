"""What each harvest expects, holds and decided: the harvester's own tables beside the job queue.

* **expectations** — written by a worker *before* it moves anything: which SOP instances it is about to
  bring in, for which harvest, job, role and operation. OnStoredInstance attributes an arriving
  instance to the harvests that expect it by looking its SOPInstanceUID up here (one indexed read).
* **objects** — the decision on every object a harvest touched (kept or rejected, role, hop, source,
  job) and the facts the harvest summary needs (patient, plan references of seed records).
* **provenance outbox** — metadata still to be written on kept instances. OnStoredInstance may not write
  metadata itself (the instance is not committed to the index until the callback returns, and every
  ``orthanc.*`` call holds the GIL), so a worker drains the outbox.

All writes of one arrival happen in one transaction with the follow-up jobs, so a crash never records
a decision without its consequences.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .db import Database, register_schema


class Decision(StrEnum):
    """What a harvest did with an object."""

    KEPT = "kept"
    REJECTED = "rejected"


register_schema(
    "tracking",
    1,
    [
        """CREATE TABLE rth_expectations (
            harvest_id TEXT NOT NULL,
            sop_uid TEXT NOT NULL,
            job_id INTEGER NOT NULL,
            source TEXT NOT NULL,
            role TEXT NOT NULL,
            hop TEXT NOT NULL,
            candidate INTEGER NOT NULL DEFAULT 0,
            operation TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (harvest_id, sop_uid, job_id)
        )""",
        "CREATE INDEX rth_expectations_sop ON rth_expectations(sop_uid)",
        """CREATE TABLE rth_objects (
            harvest_id TEXT NOT NULL,
            sop_uid TEXT NOT NULL,
            orthanc_id TEXT,
            decision TEXT NOT NULL CHECK (decision IN ('kept', 'rejected')),
            reason TEXT NOT NULL DEFAULT '',
            role TEXT NOT NULL,
            hop TEXT NOT NULL,
            source TEXT NOT NULL,
            job_id INTEGER,
            moved INTEGER NOT NULL DEFAULT 1,
            patient_id TEXT,
            study_uid TEXT,
            series_uid TEXT,
            modality TEXT,
            sop_class_uid TEXT,
            frame_of_reference_uid TEXT,
            plan_uids TEXT NOT NULL DEFAULT '[]',
            treatment_date TEXT,
            problems TEXT NOT NULL DEFAULT '[]',
            arrived_at REAL NOT NULL,
            PRIMARY KEY (harvest_id, sop_uid)
        )""",
        "CREATE INDEX rth_objects_sop ON rth_objects(sop_uid)",
        "CREATE INDEX rth_objects_role ON rth_objects(harvest_id, role, decision)",
        "CREATE INDEX rth_objects_series ON rth_objects(series_uid)",
        """CREATE TABLE rth_provenance_outbox (
            orthanc_id TEXT NOT NULL,
            harvest_id TEXT NOT NULL,
            sop_uid TEXT NOT NULL,
            source TEXT NOT NULL,
            job_id INTEGER,
            hop TEXT NOT NULL,
            harvested_at TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (orthanc_id, harvest_id)
        )""",
        """CREATE TABLE rth_cleanup (
            harvest_id TEXT PRIMARY KEY,
            done_at REAL NOT NULL
        )""",
        # Candidates already inspected and found not to belong, per operation: a re-harvest asks the same
        # question and must not move them again just to read the same answer.
        """CREATE TABLE rth_rejections (
            sop_uid TEXT NOT NULL,
            operation_key TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (sop_uid, operation_key)
        )""",
    ],
)


# An ended job's expectations stay for a grace period (``ended_at`` set), so that an instance its source
# still sends after the move ended (a C-MOVE timeout) is attributed to the harvest as a late arrival rather
# than stored as "not part of any harvest" (see ``Expectation.late``).
register_schema(
    "tracking_late_arrivals",
    1,
    [
        "ALTER TABLE rth_expectations ADD COLUMN ended_at REAL",
        "CREATE INDEX rth_expectations_ended ON rth_expectations(ended_at) WHERE ended_at IS NOT NULL",
    ],
)


# What a rule decided, as a code (``planner.ReasonCode``): counts and decisions read the code, never the
# human text of ``reason``. Answers a search rule discarded before anything moved are counted per harvest
# and reason (``strategies.DiscardReason``): nothing a rule drops goes uncounted.
register_schema(
    "tracking_reason_codes",
    1,
    [
        "ALTER TABLE rth_objects ADD COLUMN reason_code TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE rth_discards (
            harvest_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (harvest_id, reason)
        )""",
        # Why a job failed, as a code (FailureCode), for the manifest's reasons: never read from its text.
        """CREATE TABLE rth_job_failures (
            job_id INTEGER PRIMARY KEY,
            code TEXT NOT NULL
        )""",
    ],
)


class FailureCode(StrEnum):
    """What a failed job's error means to the manifest (its text is for people)."""

    #: No source holds the object a retrieve by UID (or a series retrieve) asked for: a dangling reference.
    NOT_FOUND = "NOT_FOUND"


# The provenance writer takes the outbox series by series: the items of a series are found from its decision
# rows (``rth_objects_series``), then their outbox rows by harvest and SOP UID.
register_schema(
    "tracking_provenance_series",
    1,
    ["CREATE INDEX rth_provenance_outbox_object ON rth_provenance_outbox(harvest_id, sop_uid)"],
)


@dataclass(frozen=True)
class Expectation:
    """A worker's announcement that an instance is about to arrive for a harvest.

    ``late``: the job that expected it has ended (and is not running again): an arrival now is what its
    source sent after the move ended; the harvest records it as a rejected candidate (its clean-up removes
    it unless a harvest keeps it, and a retry of the job plans it from the store first).
    """

    harvest_id: str
    sop_uid: str
    job_id: int
    source: str
    role: str
    hop: str
    candidate: bool
    operation: dict[str, Any]
    late: bool = False


@dataclass(frozen=True)
class ObjectRecord:
    """One row of ``rth_objects``: what a harvest decided about one object, and why."""

    harvest_id: str
    sop_uid: str
    orthanc_id: str | None
    decision: Decision
    reason: str
    role: str
    hop: str
    source: str
    job_id: int | None
    moved: bool
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    frame_of_reference_uid: str | None = None
    plan_uids: tuple[str, ...] = ()
    treatment_date: str | None = None
    problems: tuple[str, ...] = ()
    #: The rule's code (``planner.ReasonCode`` value); ``reason`` is its human text.
    reason_code: str = ""


@dataclass(frozen=True)
class DecisionCounts:
    """How many instances a harvest kept (and of those, moved in itself) and rejected."""

    kept: int
    moved: int
    rejected: int


@dataclass(frozen=True)
class ProvenanceItem:
    """Provenance to write for one kept instance (the metadata names of :mod:`rtharvest.core.provenance`).

    ``series_uid``: its series (None when the decision row is gone). ``moved``: its harvest moved it in
    (False: found already stored, e.g. by a re-harvest).
    """

    orthanc_id: str
    harvest_id: str
    sop_uid: str
    source: str
    job_id: int | None
    hop: str
    harvested_at: str
    attempts: int
    series_uid: str | None = None
    moved: bool = True

    def key(self) -> tuple[str, str, str, str]:
        """(harvest, source, job, hop): items with equal keys came the same way."""
        return (self.harvest_id, self.source, "" if self.job_id is None else str(self.job_id), self.hop)

    def metadata(self) -> dict[str, str]:
        """The five provenance metadata values, in writing order.

        ``HarvestId`` comes last: the writer treats a resource carrying it as stamped, so a crash between
        two writes must leave it absent (the outbox row then rewrites all five after the restart).
        """
        return {
            "HarvestSource": self.source,
            "HarvestJob": "" if self.job_id is None else str(self.job_id),
            "HarvestHop": self.hop,
            "HarvestedAt": self.harvested_at,
            "HarvestId": self.harvest_id,
        }


#: Outbox rows with what the writer groups them by; ``{where}`` filters (no user text goes there).
_OUTBOX_ROWS = (
    "SELECT o.orthanc_id, o.harvest_id, o.sop_uid, o.source, o.job_id, o.hop, o.harvested_at, o.attempts,"
    " b.series_uid, coalesce(b.moved, 1),"
    " EXISTS (SELECT 1 FROM jobs j WHERE j.id = o.job_id AND j.state = 'leased')"
    " FROM rth_provenance_outbox o LEFT JOIN rth_objects b ON b.harvest_id = o.harvest_id AND b.sop_uid = o.sop_uid"
    " WHERE {where} ORDER BY o.rowid"
)


#: Every outbox row of the series ``{marks}`` names (from their decision rows, by the series index).
_SERIES_OUTBOX_ROWS = (
    "SELECT o.orthanc_id, o.harvest_id, o.sop_uid, o.source, o.job_id, o.hop, o.harvested_at, o.attempts,"
    " b.series_uid, b.moved, EXISTS (SELECT 1 FROM jobs j WHERE j.id = o.job_id AND j.state = 'leased')"
    " FROM rth_objects b JOIN rth_provenance_outbox o ON o.harvest_id = b.harvest_id AND o.sop_uid = b.sop_uid"
    " WHERE b.series_uid IN ({marks}) ORDER BY o.rowid"
)


def _outbox_item(r: Sequence[Any]) -> ProvenanceItem:
    return ProvenanceItem(r[0], r[1], r[2], r[3], r[4], r[5], r[6], int(r[7]), r[8], bool(r[9]))


#: Harvests marked clean that are running again (a job was enqueued or retried since).
_REOPENED = ("SELECT c.harvest_id FROM rth_cleanup c JOIN harvests h ON h.id = c.harvest_id"
             " WHERE h.state IN ('Running', 'Paused')")


def iso_utc(epoch: float) -> str:
    """ISO 8601 UTC with seconds, as stored in ``HarvestedAt``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class Tracker:
    """Reads and writes the tracking tables (call the write methods inside ``db.transaction()``)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate()

    # -- expectations -------------------------------------------------------------------------------

    def expect(self, items: Iterable[Expectation]) -> None:
        """Record expected arrivals (idempotent)."""
        now = time.time()
        rows = [
            (e.harvest_id, e.sop_uid, e.job_id, e.source, e.role, e.hop, int(e.candidate),
             json.dumps(e.operation, sort_keys=True), now)
            for e in items
        ]
        with self.db.transaction():
            self.db.executemany(
                "INSERT INTO rth_expectations (harvest_id, sop_uid, job_id, source, role, hop, candidate,"
                " operation, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                # The next attempt of a job expects again what an earlier attempt expected.
                " ON CONFLICT (harvest_id, sop_uid, job_id) DO UPDATE SET ended_at = NULL",
                rows,
            )

    def expect_unless_in_flight(self, items: Sequence[Expectation], job_id: int) -> set[str]:
        """Record the expectations of instances no other running job is moving, in one write transaction.

        Returns the SOP UIDs another leased job already expects (their expectations are not recorded). The
        check and the insert must be atomic: two jobs that both checked first and recorded after would both
        find nothing in flight and move the same instances twice.
        """
        with self.db.transaction():
            busy = self.in_flight([e.sop_uid for e in items], job_id)
            self.expect(e for e in items if e.sop_uid not in busy)
        return busy

    def expectations_for(self, sop_uid: str) -> list[Expectation]:
        """Every expectation of this instance, oldest first; those of ended jobs (within the grace period,
        see :meth:`purge_ended_expectations`) are ``late``, unless the job is leased again: then it is
        running (a retry, or a reclaimed lease) and the arrival is its own."""
        rows = self.db.query(
            "SELECT e.harvest_id, e.sop_uid, e.job_id, e.source, e.role, e.hop, e.candidate, e.operation,"
            " e.ended_at IS NOT NULL AND coalesce(j.state, '') != 'leased'"
            " FROM rth_expectations e LEFT JOIN jobs j ON j.id = e.job_id WHERE e.sop_uid = ?"
            " ORDER BY e.created_at, e.job_id",
            (sop_uid,),
        )
        return [Expectation(r[0], r[1], int(r[2]), r[3], r[4], r[5], bool(r[6]), json.loads(r[7]), bool(r[8]))
                for r in rows]

    def series_frame_of_reference(self, series_uid: str) -> tuple[str, str] | None:
        """(a SOP UID, the FrameOfReferenceUID) of a series some harvest holds, or None."""
        row = self.db.query_one(
            "SELECT sop_uid, frame_of_reference_uid FROM rth_objects WHERE series_uid = ? AND decision = 'kept'"
            " AND orthanc_id IS NOT NULL AND frame_of_reference_uid IS NOT NULL LIMIT 1", (series_uid,))
        return None if row is None else (str(row[0]), str(row[1]))

    def in_flight(self, sop_uids: Sequence[str], exclude_job: int) -> set[str]:
        """Which of ``sop_uids`` another running job is moving right now (expected by a leased job)."""
        found: set[str] = set()
        for uid in sop_uids:
            row = self.db.query_one(
                "SELECT 1 FROM rth_expectations e JOIN jobs j ON j.id = e.job_id WHERE e.sop_uid = ?"
                " AND e.job_id != ? AND j.state = 'leased' AND e.ended_at IS NULL LIMIT 1", (uid, exclude_job))
            if row is not None:
                found.add(uid)
        return found

    def undecided_expectations(self) -> list[Expectation]:
        """Expectations of unfinished harvests (Running, Paused) that have no decision and whose job no
        live run holds: instances a previous run was moving when it stopped (a crash, a kill, a queue
        restored from a backup). Called at start-up, after the leases of dead runs were reclaimed, so a
        job still ``leased`` then belongs to another live process and is left to it."""
        rows = self.db.query(
            "SELECT e.harvest_id, e.sop_uid, e.job_id, e.source, e.role, e.hop, e.candidate, e.operation"
            " FROM rth_expectations e JOIN harvests h ON h.id = e.harvest_id"
            " LEFT JOIN jobs j ON j.id = e.job_id"
            " WHERE h.state IN ('Running', 'Paused') AND coalesce(j.state, '') != 'leased' AND e.ended_at IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM rth_objects o WHERE o.harvest_id = e.harvest_id"
            "                 AND o.sop_uid = e.sop_uid)"
            " ORDER BY e.harvest_id, e.created_at, e.job_id")
        return [Expectation(r[0], r[1], int(r[2]), r[3], r[4], r[5], bool(r[6]), json.loads(r[7])) for r in rows]

    def drop_expectations(self, job_id: int) -> None:
        """End a job's expectations (its attempt finished): arrivals after that are late ones of its harvest
        until :meth:`purge_ended_expectations` forgets them, then unsolicited."""
        self.db.execute("UPDATE rth_expectations SET ended_at = ? WHERE job_id = ? AND ended_at IS NULL",
                        (time.time(), job_id))

    def purge_ended_expectations(self, ended_before: float) -> int:
        """Forget expectations of jobs that ended before ``ended_before`` (the grace period for late
        arrivals is over); returns how many."""
        return self.db.execute("DELETE FROM rth_expectations WHERE ended_at < ?", (ended_before,))

    # -- objects ------------------------------------------------------------------------------------

    def has_object(self, harvest_id: str, sop_uid: str) -> bool:
        """Whether the harvest already decided on this instance."""
        return self.db.query_one(
            "SELECT 1 FROM rth_objects WHERE harvest_id = ? AND sop_uid = ?", (harvest_id, sop_uid)
        ) is not None

    def has_kept(self, harvest_id: str, sop_uid: str) -> bool:
        """Whether the harvest keeps this instance (for some rule)."""
        return self.db.query_one(
            "SELECT 1 FROM rth_objects WHERE harvest_id = ? AND sop_uid = ? AND decision = 'kept'",
            (harvest_id, sop_uid),
        ) is not None

    def record(self, obj: ObjectRecord, provenance_at: float | None = None) -> bool:
        """Record a decision; a kept object with an Orthanc id also goes into the provenance outbox.

        Returns False if the harvest had already decided on this instance (the first decision stays,
        unless it was a rejection and this one keeps it: another rule wants the object after all).
        """
        existing = self.db.query_one(
            "SELECT decision, moved, orthanc_id FROM rth_objects WHERE harvest_id = ? AND sop_uid = ?",
            (obj.harvest_id, obj.sop_uid),
        )
        now = time.time()
        if existing is not None and not (existing[0] == Decision.REJECTED and obj.decision is Decision.KEPT):
            if (obj.orthanc_id and existing[2] is None) or (obj.moved and not existing[1]):
                # The decision stays, but the clean-up must see the copy this harvest brought in: stored again
                # after the clean-up deleted it (another search of the harvest moved it in), or moved in by one
                # of its jobs while another planned the just-stored copy first (the arrival's own decision was
                # still queued on the ingest thread), which recorded it as found, not moved.
                self.db.execute("UPDATE rth_objects SET orthanc_id = coalesce(orthanc_id, ?), moved = max(moved, ?)"
                                " WHERE harvest_id = ? AND sop_uid = ?",
                                (obj.orthanc_id, int(obj.moved), obj.harvest_id, obj.sop_uid))
                self.db.execute("DELETE FROM rth_cleanup WHERE harvest_id = ?", (obj.harvest_id,))
            return False
        if existing is not None and existing[1] and not obj.moved:
            # Moved in as a candidate, claimed from the store by another rule: it was still moved by us.
            obj = dataclasses.replace(obj, moved=True)
        self.db.execute(
            "INSERT OR REPLACE INTO rth_objects (harvest_id, sop_uid, orthanc_id, decision, reason, role, hop,"
            " source, job_id, moved, patient_id, study_uid, series_uid, modality, sop_class_uid,"
            " frame_of_reference_uid, plan_uids, treatment_date, problems, arrived_at, reason_code)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (obj.harvest_id, obj.sop_uid, obj.orthanc_id, obj.decision.value, obj.reason, obj.role, obj.hop,
             obj.source, obj.job_id, int(obj.moved), obj.patient_id, obj.study_uid, obj.series_uid, obj.modality,
             obj.sop_class_uid, obj.frame_of_reference_uid, json.dumps(list(obj.plan_uids)), obj.treatment_date,
             json.dumps(list(obj.problems)), now, obj.reason_code),
        )
        # A new decision changes what the harvest holds: its end-of-harvest clean-up (and so its visible
        # "Completed") must run again. In the same transaction as the decision, so a clean-up that
        # started before it can never mark the harvest clean (see ``HarvestCleanup.finish``).
        self.db.execute("DELETE FROM rth_cleanup WHERE harvest_id = ?", (obj.harvest_id,))
        if obj.decision is Decision.KEPT and obj.orthanc_id:
            self.db.execute(
                "INSERT INTO rth_provenance_outbox (orthanc_id, harvest_id, sop_uid, source, job_id, hop,"
                " harvested_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (obj.orthanc_id, obj.harvest_id, obj.sop_uid, obj.source, obj.job_id, obj.hop,
                 iso_utc(provenance_at if provenance_at is not None else now)),
            )
        return True

    def objects(self, harvest_id: str | None = None, decision: Decision | None = None) -> list[ObjectRecord]:
        """Decisions of one harvest (or all), optionally filtered."""
        sql = (
            "SELECT harvest_id, sop_uid, orthanc_id, decision, reason, role, hop, source, job_id, moved,"
            " patient_id, study_uid, series_uid, modality, sop_class_uid, frame_of_reference_uid, plan_uids,"
            " treatment_date, problems, reason_code FROM rth_objects WHERE (?1 IS NULL OR harvest_id = ?1)"
            " AND (?2 IS NULL OR decision = ?2) ORDER BY arrived_at"
        )
        rows = self.db.query(sql, (harvest_id, None if decision is None else decision.value))
        return [
            ObjectRecord(r[0], r[1], r[2], Decision(r[3]), r[4], r[5], r[6], r[7], r[8], bool(r[9]), r[10], r[11],
                         r[12], r[13], r[14], r[15], tuple(json.loads(r[16])), r[17], tuple(json.loads(r[18])),
                         str(r[19] or ""))
            for r in rows
        ]

    def summary_counts(self, harvest_id: str) -> dict[str, int]:
        """Patients, plans referenced by kept seed records, plans collected (kept, role PLAN)."""
        patients = self.db.scalar(
            "SELECT count(DISTINCT patient_id) FROM rth_objects WHERE harvest_id = ? AND decision = 'kept'"
            " AND role IN ('RECORD')", (harvest_id,), 0)
        referenced = self.db.scalar(
            "SELECT count(DISTINCT j.value) FROM rth_objects o, json_each(o.plan_uids) j"
            " WHERE o.harvest_id = ? AND o.decision = 'kept' AND o.role = 'RECORD'", (harvest_id,), 0)
        collected = self.db.scalar(
            "SELECT count(DISTINCT sop_uid) FROM rth_objects WHERE harvest_id = ? AND decision = 'kept'"
            " AND role = 'PLAN'", (harvest_id,), 0)
        return {"Patients": int(patients), "PlansReferenced": int(referenced), "PlansCollected": int(collected)}

    def rejections_coded(self, harvest_id: str, code: str) -> dict[str, int]:
        """Rejected objects of the harvest under the rule ``code``: reason text → count (distinct objects)."""
        rows = self.db.query(
            "SELECT reason, count(DISTINCT sop_uid) FROM rth_objects WHERE harvest_id = ? AND decision = 'rejected'"
            " AND reason_code = ? GROUP BY reason", (harvest_id, code))
        return {str(r[0]): int(r[1]) for r in rows}

    def note_failure(self, job_id: int, code: FailureCode | None) -> None:
        """The meaning of the job's latest failure (``None``: none the manifest needs; a retry that fails
        otherwise forgets an earlier code)."""
        if code is None:
            self.db.execute("DELETE FROM rth_job_failures WHERE job_id = ?", (job_id,))
        else:
            self.db.execute("INSERT OR REPLACE INTO rth_job_failures (job_id, code) VALUES (?, ?)",
                            (job_id, code.value))

    def failure_codes(self, job_ids: Iterable[int]) -> dict[int, FailureCode]:
        """The failure codes of those jobs that have one."""
        wanted = set(job_ids)
        return {int(r[0]): FailureCode(r[1]) for r in self.db.query("SELECT job_id, code FROM rth_job_failures")
                if int(r[0]) in wanted}

    def add_discards(self, harvest_id: str, counts: Mapping[str, int]) -> None:
        """Answers a search rule of the harvest discarded: reason → how many more."""
        for reason, count in counts.items():
            if count:
                self.db.execute(
                    "INSERT INTO rth_discards (harvest_id, reason, count) VALUES (?, ?, ?)"
                    " ON CONFLICT (harvest_id, reason) DO UPDATE SET count = count + excluded.count",
                    (harvest_id, str(reason), int(count)))

    def discards(self, harvest_id: str) -> dict[str, int]:
        """Everything a rule of the harvest discarded, by reason code: answers dropped before a move
        (:meth:`add_discards`) and arrivals rejected and kept by no other rule of the harvest."""
        out: dict[str, int] = {str(r[0]): int(r[1]) for r in self.db.query(
            "SELECT reason, count FROM rth_discards WHERE harvest_id = ?", (harvest_id,))}
        for code, count in self.db.query(
                "SELECT reason_code, count(DISTINCT sop_uid) FROM rth_objects WHERE harvest_id = ?"
                " AND decision = 'rejected' GROUP BY reason_code", (harvest_id,)):
            key = str(code or "UNCODED")
            out[key] = out.get(key, 0) + int(count)
        return dict(sorted(out.items()))

    def rejected_unclaimed(self, harvest_id: str) -> list[tuple[str, str]]:
        """(sop_uid, orthanc_id) this harvest moved in only to inspect and that no harvest keeps."""
        rows = self.db.query(
            "SELECT o.sop_uid, o.orthanc_id FROM rth_objects o WHERE o.harvest_id = ? AND o.decision = 'rejected'"
            " AND o.moved = 1 AND o.orthanc_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM rth_objects k"
            " WHERE k.sop_uid = o.sop_uid AND k.decision = 'kept')",
            (harvest_id,),
        )
        return [(r[0], r[1]) for r in rows]

    def remember_rejection(self, sop_uid: str, operation_key: str, reason: str) -> None:
        """An inspected candidate does not satisfy this operation (kept across harvests)."""
        self.db.execute(
            "INSERT INTO rth_rejections (sop_uid, operation_key, reason, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING", (sop_uid, operation_key, reason, time.time()))

    def forget_rejection(self, sop_uid: str, operation_key: str) -> None:
        """The candidate turned out to matter for this operation after all (a MIM session whose content a
        harvest keeps): inspect it again next time."""
        self.db.execute("DELETE FROM rth_rejections WHERE sop_uid = ? AND operation_key = ?", (sop_uid, operation_key))

    def source_of(self, harvest_id: str, sop_uid: str) -> str | None:
        """The source an object of this harvest came from, if the harvest decided on it."""
        row = self.db.query_one("SELECT source FROM rth_objects WHERE harvest_id = ? AND sop_uid = ?",
                                (harvest_id, sop_uid))
        return None if row is None else str(row[0])

    def known_rejections(self, operation_key: str, sop_uids: Sequence[str]) -> dict[str, str]:
        """Which of ``sop_uids`` were already inspected and rejected for this operation, with why."""
        found: dict[str, str] = {}
        for uid in sop_uids:
            row = self.db.query_one("SELECT reason FROM rth_rejections WHERE sop_uid = ? AND operation_key = ?",
                                    (uid, operation_key))
            if row is not None:
                found[uid] = str(row[0])
        return found

    def forget_orthanc_id(self, harvest_id: str, sop_uid: str) -> None:
        """The instance was deleted from the store: keep the decision, drop the dangling Orthanc id."""
        self.db.execute("UPDATE rth_objects SET orthanc_id = NULL WHERE harvest_id = ? AND sop_uid = ?",
                        (harvest_id, sop_uid))

    def harvests_to_clean(self) -> list[str]:
        """Finished harvests (Completed, or Cancelled with no job still running) not yet cleaned up, and
        forget the clean-up of harvests running again. Every harvest, however many (no listing cap)."""
        if self.db.query_one(_REOPENED) is not None:  # read first: the maintenance loop runs 4 times a second
            with self.db.transaction():
                self.db.execute("DELETE FROM rth_cleanup WHERE harvest_id IN (" + _REOPENED + ")")  # noqa: S608
        rows = self.db.query(
            "SELECT h.id FROM harvests h WHERE h.state IN ('Completed', 'Cancelled')"
            " AND NOT EXISTS (SELECT 1 FROM rth_cleanup c WHERE c.harvest_id = h.id)"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.harvest_id = h.id"
            "                 AND j.state IN ('pending', 'waiting', 'leased'))"
            " ORDER BY h.created_at")
        return [str(r[0]) for r in rows]

    def decision_counts(self, harvest_id: str) -> DecisionCounts:
        """Kept / kept and moved / rejected decisions of a harvest (its summary event)."""
        row = self.db.query_one(
            "SELECT coalesce(sum(decision = 'kept'), 0), coalesce(sum(decision = 'kept' AND moved = 1), 0),"
            " coalesce(sum(decision = 'rejected'), 0) FROM rth_objects WHERE harvest_id = ?", (harvest_id,))
        assert row is not None
        return DecisionCounts(int(row[0]), int(row[1]), int(row[2]))

    def pending_provenance_of(self, harvest_id: str) -> bool:
        """Whether provenance of this harvest's kept instances is still to be written."""
        return self.db.query_one("SELECT 1 FROM rth_provenance_outbox WHERE harvest_id = ? LIMIT 1",
                                 (harvest_id,)) is not None

    def cleanup_done(self, harvest_id: str) -> bool:
        """Whether the end-of-harvest cleanup ran."""
        return self.db.query_one("SELECT 1 FROM rth_cleanup WHERE harvest_id = ?", (harvest_id,)) is not None

    def mark_cleanup(self, harvest_id: str, done: bool = True) -> None:
        """Record (or forget, when the harvest reopens) the end-of-harvest cleanup."""
        if done:
            self.db.execute("INSERT OR REPLACE INTO rth_cleanup (harvest_id, done_at) VALUES (?, ?)",
                            (harvest_id, time.time()))
        else:
            self.db.execute("DELETE FROM rth_cleanup WHERE harvest_id = ?", (harvest_id,))

    # -- provenance outbox --------------------------------------------------------------------------

    def pending_provenance(self, limit: int = 200) -> list[ProvenanceItem]:
        """Oldest outbox items first."""
        rows = self.db.query(_OUTBOX_ROWS.format(where="1") + " LIMIT ?", (limit,))
        return [_outbox_item(r) for r in rows]

    def pending_provenance_by_series(self, limit: int = 200) -> list[list[ProvenanceItem]]:
        """Outbox items ready to write, grouped by series (oldest first; about ``limit`` items).

        Each group holds every outbox item of its series, so the writer sees whether the series came whole.
        A series with an item of a running job waits until the job ends: its last instances may still be
        arriving, and the job records every arrival's decision before it ends. Items without a series
        (their decision row is gone) come one per group.
        """
        free = "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = o.job_id AND j.state = 'leased')"
        oldest = [_outbox_item(r) for r in self.db.query(_OUTBOX_ROWS.format(where=free) + " LIMIT ?", (limit,))]
        series = sorted({i.series_uid for i in oldest if i.series_uid is not None})
        members: dict[str, list[ProvenanceItem]] = {}
        busy: set[str] = set()
        for start in range(0, len(series), 400):  # stays below SQLite's bound on parameters
            chunk = series[start:start + 400]
            marks = ", ".join("?" * len(chunk))
            for r in self.db.query(_SERIES_OUTBOX_ROWS.format(marks=marks), tuple(chunk)):
                item = _outbox_item(r)
                assert item.series_uid is not None
                if r[10]:
                    busy.add(item.series_uid)
                members.setdefault(item.series_uid, []).append(item)
        groups: list[list[ProvenanceItem]] = []
        seen: set[str] = set()
        for item in oldest:
            if item.series_uid is None:
                groups.append([item])
            elif item.series_uid not in seen and item.series_uid not in busy:
                seen.add(item.series_uid)
                groups.append(members[item.series_uid])
        return groups

    def provenance_done(self, items: Sequence[ProvenanceItem]) -> None:
        """Remove written items from the outbox."""
        with self.db.transaction():
            self.db.executemany(
                "DELETE FROM rth_provenance_outbox WHERE orthanc_id = ? AND harvest_id = ?",
                [(i.orthanc_id, i.harvest_id) for i in items],
            )

    def provenance_failed(self, item: ProvenanceItem, give_up_after: int = 20) -> bool:
        """Count a failed write; returns True (and drops the item) once it is hopeless."""
        with self.db.transaction():
            if item.attempts + 1 >= give_up_after:
                self.db.execute("DELETE FROM rth_provenance_outbox WHERE orthanc_id = ? AND harvest_id = ?",
                                (item.orthanc_id, item.harvest_id))
                return True
            self.db.execute("UPDATE rth_provenance_outbox SET attempts = attempts + 1 WHERE orthanc_id = ?"
                            " AND harvest_id = ?", (item.orthanc_id, item.harvest_id))
            return False

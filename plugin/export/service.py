"""Exports as durable jobs: select a harvest's plans, de-identify, send, verify.

An export lives in its own database file (``RtHarvest.Export.DatabasePath``) with the same
:class:`~rtharvest.store.jobqueue.JobQueue` the harvest uses (leases, retries with backoff, crash recovery):
each export is a queue "harvest" whose source is the destination, with two jobs, ``ExportSend`` then
``ExportVerify`` (enqueued in the transaction that completes the first). Keeping the file apart means the
harvest workers, harvest lists and harvest completion never see export jobs, and a long export never
contends with a harvest for SQLite's write lock.

Resumable without duplicates: the objects to send are fixed when the send job first runs
(``rth_export_items``) and each batch's outcome is committed after the destination answered; a crash
re-sends at most the batch in flight, and since the de-identified UIDs are deterministic the destination
receives the same SOP Instance UIDs again (Orthanc and DICOMweb servers replace, a folder overwrites the
same file), never a second copy.

The pseudonym mapping stays in this database and the site's secret in its own file (mode 0600) or the
configuration (:attr:`ExportSettings.secret_path`); neither is ever exported, logged or answered over REST.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from ..background import BackgroundLoop
from ..central.client import announce, delivery_document
from ..core.manifest import STATUSES, Manifest, PlanRow
from ..core.references import ObjectKind, extract
from ..store.db import Database, register_schema
from ..store.eventlog import EventLog, Level, exception_summary
from ..store.jobqueue import EnqueueItem, HarvestState, Job, JobQueue, JobState, OwnerKind, QueueError, RetryPolicy
from ..store.tracking import Decision, ObjectRecord
from ..web.httpapi import ApiError
from .deid import Profile, ProfileError, SiteKey, deidentify
from .destinations import Destination, DestinationError
from .presend import Finding, FindingAction, check_before_send, cleaned_label
from .settings import ExportSettings
from .verify import (
    Verification,
    compare,
    compare_summaries,
    expected_rows,
    manifest_of_copy,
    phi_values,
    scan_for_phi,
    summary_of_rows,
)

log = logging.getLogger("rtharvest.export")

__all__ = ["ExportService", "PlanFilter", "parse_plans"]

SEND, VERIFY = "ExportSend", "ExportVerify"
#: A harvest is exported once its manifest no longer changes.
EXPORTABLE_HARVEST_STATES = ("Completed", "Cancelled")

_SCHEMA = [
    """CREATE TABLE rth_exports (
        id TEXT PRIMARY KEY,
        harvest_id TEXT NOT NULL, destination TEXT NOT NULL, kind TEXT NOT NULL, plans TEXT NOT NULL,
        profile TEXT NOT NULL, site TEXT NOT NULL, created_at REAL NOT NULL,
        selected INTEGER NOT NULL DEFAULT 0, site_rows TEXT, verification TEXT, verified_at REAL)""",
    """CREATE TABLE rth_export_items (
        export_id TEXT NOT NULL, sop_uid TEXT NOT NULL, orthanc_id TEXT NOT NULL, series_uid TEXT,
        new_uid TEXT, new_study TEXT, new_series TEXT,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
        sends INTEGER NOT NULL DEFAULT 0, verified INTEGER NOT NULL DEFAULT 0, error TEXT,
        PRIMARY KEY (export_id, sop_uid))""",
    "CREATE INDEX rth_export_items_state ON rth_export_items (export_id, state)",
    """CREATE TABLE rth_pseudonyms (
        site TEXT NOT NULL, patient_id TEXT NOT NULL, pseudonym TEXT NOT NULL UNIQUE, created_at REAL NOT NULL,
        PRIMARY KEY (site, patient_id))""",
    "CREATE TABLE rth_site_keys (site TEXT PRIMARY KEY, secret BLOB NOT NULL, created_at REAL NOT NULL)",
]

register_schema("exports", 1, _SCHEMA)
# The check before sending: an object may be held back (state 'held', never sent or retried), and every
# cleaning or hold is listed by de-identified UID, attribute and kind of value (never the value).
register_schema("exports", 2, [
    """CREATE TABLE rth_export_items_v2 (
        export_id TEXT NOT NULL, sop_uid TEXT NOT NULL, orthanc_id TEXT NOT NULL, series_uid TEXT,
        new_uid TEXT, new_study TEXT, new_series TEXT,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed', 'held')),
        sends INTEGER NOT NULL DEFAULT 0, verified INTEGER NOT NULL DEFAULT 0, error TEXT,
        PRIMARY KEY (export_id, sop_uid))""",
    "INSERT INTO rth_export_items_v2 SELECT export_id, sop_uid, orthanc_id, series_uid, new_uid, new_study,"
    " new_series, state, sends, verified, error FROM rth_export_items",
    "DROP TABLE rth_export_items",
    "ALTER TABLE rth_export_items_v2 RENAME TO rth_export_items",
    "CREATE INDEX rth_export_items_state ON rth_export_items (export_id, state)",
    """CREATE TABLE rth_export_findings (
        export_id TEXT NOT NULL, new_uid TEXT NOT NULL, attribute TEXT NOT NULL, kind TEXT NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('cleaned', 'held')),
        PRIMARY KEY (export_id, new_uid, attribute, kind))""",
])
#: Findings listed in an export's document (all are counted; ``GET .../findings`` pages through the rest).
FINDINGS_LISTED = 200

_BODY_FIELDS = ("Harvest", "Destination", "Plans", "Profile", "Label")
_FILTER_FIELDS = ("Status", "PlanIntent", "PlanUIDs", "PatientIDs")


# ---------------------------------------------------------------------------------------------------
# Which plans


class PlanFilter:
    """``Plans`` of an export: ``Complete``, ``All`` or ``{"Status", "PlanIntent", "PlanUIDs", "PatientIDs"}``."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def accepts(self, row: PlanRow) -> bool:
        """Whether the manifest row is exported."""
        if self.spec == "All":
            return True
        if self.spec == "Complete":
            return row.status == "Complete"
        checks = (("Status", row.status), ("PlanIntent", row.plan_intent or ""), ("PlanUIDs", row.plan_uid),
                  ("PatientIDs", row.patient_id or ""))
        return all(name not in self.spec or value in self.spec[name] for name, value in checks)


def parse_plans(value: Any) -> PlanFilter:
    """Validate ``Plans``; :class:`ApiError` 400 naming the field."""
    if value is None:
        return PlanFilter("Complete")
    if value in ("Complete", "All"):
        return PlanFilter(value)
    if isinstance(value, str):
        raise ApiError(400, f"Plans: must be \"Complete\", \"All\" or a filter object, got {value[:30]!r}")
    if not isinstance(value, Mapping) or not value:
        raise ApiError(400, "Plans: must be \"Complete\", \"All\" or a non-empty filter object "
                            f"with {', '.join(_FILTER_FIELDS)}")
    for name, items in value.items():
        if name not in _FILTER_FIELDS:
            raise ApiError(400, f"Plans.{name}: unknown filter; allowed: {', '.join(_FILTER_FIELDS)}")
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
            raise ApiError(400, f"Plans.{name}: must be a non-empty list of strings")
        if name == "Status" and not set(items) <= set(STATUSES):
            raise ApiError(400, f"Plans.Status: values must be among {', '.join(STATUSES)}")
    return PlanFilter({k: list(v) for k, v in value.items()})


def objects_of_rows(rows: Sequence[PlanRow], kept: Sequence[ObjectRecord]) -> dict[str, ObjectRecord]:
    """SOP UID → stored object for everything the rows name: records, plan, structure set, doses,
    registrations and every stored instance of their image series."""
    by_uid: dict[str, ObjectRecord] = {}
    by_series: dict[str, list[ObjectRecord]] = {}
    for obj in kept:
        if obj.decision is Decision.KEPT and obj.orthanc_id:
            by_uid.setdefault(obj.sop_uid, obj)
    for obj in by_uid.values():
        if obj.series_uid:
            by_series.setdefault(obj.series_uid, []).append(obj)
    out: dict[str, ObjectRecord] = {}
    for row in rows:
        uids = [*row.record_uids, *row.summary_record_uids, row.plan_uid, *row.dose_uids, *row.registration_uids]
        if row.structure_set_uid:
            uids.append(row.structure_set_uid)
        for uid in uids:
            if uid in by_uid:
                out[uid] = by_uid[uid]
        for series in (*row.planning_series_uids, *row.planning_for_series_uids, *row.registered_series_uids,
                       *row.registered_for_series_uids):
            for obj in by_series.get(series, []):
                out[obj.sop_uid] = obj
    return out


# ---------------------------------------------------------------------------------------------------
# The service


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class ExportService:
    """Creates, runs and reports exports.

    ``harvest_manifest(harvest_id)`` builds the site's manifest, ``harvest_objects(harvest_id)`` lists the
    harvest's tracker rows, ``check_harvest(harvest_id)`` answers the harvest's visible state (raising
    :class:`ApiError` 404 for an unknown one);
    ``read_file(orthanc_id)`` (set by :meth:`start`) reads a stored instance.
    """

    def __init__(self, settings: ExportSettings, events: EventLog,
                 harvest_manifest: Callable[[str], Manifest],
                 harvest_objects: Callable[[str], Sequence[ObjectRecord]],
                 check_harvest: Callable[[str], Any], *, policy: RetryPolicy | None = None,
                 lease_seconds: float = 900.0,
                 clinical_sources: Callable[[], Mapping[str, str]] | None = None) -> None:
        self.settings = settings
        self.events = events
        self.harvest_manifest = harvest_manifest
        self.harvest_objects = harvest_objects
        self.check_harvest = check_harvest
        #: Names that are a clinical system (source or lookup source of a harvest or schedule) → why.
        self.clinical_sources: Callable[[], Mapping[str, str]] = clinical_sources or dict
        os.makedirs(settings.database_path.parent, exist_ok=True)
        self.db = Database(str(settings.database_path))
        self.queue = JobQueue(self.db, policy or RetryPolicy())
        self.lease_seconds = lease_seconds
        self.read_file: Callable[[str], bytes] | None = None
        #: ``(name, export_id) -> Destination`` (the settings' lookup; replaceable in tests).
        self.destination_of: Callable[[str, str], Destination] = settings.destination
        self._key: SiteKey | None = None
        self._pseudonyms: dict[str, str] = {}
        #: The export worker: one job at a time; woken when an export is created.
        self._worker = BackgroundLoop("rtharvest-export", self.run_one, 0.5)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:export"
        self._lock_fd: int | None = None
        #: The originals :meth:`_phi_values` read last (series UID → dataset without pixels).
        self._originals: dict[str, Any] = {}

    # -- site key and pseudonyms ---------------------------------------------------------------------

    def key(self) -> SiteKey:
        """The site's key: the configured secret (environment or ``Secret``), else the one in the secret file
        (generated once, mode 0600). A secret an older version kept in the database (``rth_site_keys``) moves
        to the file on first use, so every UID and pseudonym stays the same and the database alone no longer
        re-identifies anyone."""
        if self._key is None:
            site = self.settings.site
            secret = self.settings.secret
            if secret is None:
                secret = self._secret_from_file(site)
            self._key = SiteKey(site, secret)
        return self._key

    def _secret_from_file(self, site: str) -> bytes:
        path = self.settings.secret_path
        stored = self.db.scalar("SELECT secret FROM rth_site_keys WHERE site = ?", (site,))
        if not path.exists():
            write_secret_file(path, bytes(stored) if stored is not None else secrets.token_bytes(32))
        secret = read_secret_file(path)
        if stored is not None:
            if bytes(stored) != secret:
                raise RuntimeError(f"the export secret of {path} differs from the one the export database "
                                   "holds for this site; keep one (see docs/operations.md, Exports)")
            with self.db.transaction():
                self.db.execute("DELETE FROM rth_site_keys WHERE site = ?", (site,))
            log.warning("the export secret moved from the export database to %s (mode 0600)", path)
        return secret

    def pseudonym(self, patient_id: str) -> str:
        """The patient's pseudonym, recorded in the site's database on first use (a recorded one is never
        changed: pseudonyms of an older version keep their 10 hex digits). A new pseudonym another patient
        already has (possible, at 64 bits hardly ever) is drawn again."""
        cached = self._pseudonyms.get(patient_id)
        if cached is not None:
            return cached
        key = self.key()
        with self.db.transaction():
            found = self.db.scalar("SELECT pseudonym FROM rth_pseudonyms WHERE site = ? AND patient_id = ?",
                                   (key.site, patient_id))
            attempt = 0
            while found is None:
                candidate = key.pseudonym(patient_id, attempt)
                if self.db.scalar("SELECT 1 FROM rth_pseudonyms WHERE pseudonym = ?", (candidate,)) is None:
                    found = candidate
                    self.db.execute("INSERT INTO rth_pseudonyms (site, patient_id, pseudonym, created_at)"
                                    " VALUES (?, ?, ?, ?)", (key.site, patient_id, found, time.time()))
                attempt += 1
        self._pseudonyms[patient_id] = str(found)
        return str(found)

    # -- REST ------------------------------------------------------------------------------------------

    def refusal(self, destination: str) -> str | None:
        """Why ``destination`` may not receive exports (``None``: it may): a name that is a source or lookup
        source of a harvest or schedule (or a configured source) is a clinical system, and de-identified
        copies must never land there by accident, unless ``RtHarvest.Export.ResearchArchives`` marks it."""
        web = self.settings.dicomweb.get(destination)
        if web is not None and self.settings.kind_of(destination) == "dicomweb" and web.credential_problem():
            return web.credential_problem()
        if destination in self.settings.research_archives:
            return None
        why = self.clinical_sources().get(destination)
        if why is None:
            return None
        return (f"{destination} is {why}, a clinical system; exports go only to research archives (list it in "
                "RtHarvest.Export.ResearchArchives if it truly is one)")

    def destinations(self) -> list[dict[str, Any]]:
        """``GET /rtharvest/destinations``: every name, its kind, and whether an export may use it (and why not)."""
        sources = self.clinical_sources()
        out = []
        for name in self.settings.destination_names():
            doc: dict[str, Any] = {"Name": name, "Kind": self.settings.kind_of(name),
                                   "ResearchArchive": name in self.settings.research_archives}
            refused = self.refusal(name) if name in sources or name in self.settings.dicomweb else None
            doc["Allowed"] = refused is None
            if refused:
                doc["Refused"] = refused
            out.append(doc)
        return out

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a ``POST /rtharvest/exports`` body and enqueue the export; ``{"ID", "State"}``."""
        unknown = sorted(set(body) - set(_BODY_FIELDS))
        if unknown:
            raise ApiError(400, f"{unknown[0]}: unknown field; allowed: {', '.join(_BODY_FIELDS)}")
        harvest_id = body.get("Harvest")
        if not isinstance(harvest_id, str) or not harvest_id:
            raise ApiError(400, "Harvest: required, the ID of a harvest (GET /rtharvest/harvests)")
        destination = body.get("Destination")
        if not isinstance(destination, str) or not destination:
            raise ApiError(400, "Destination: required, the name of a DicomModalities entry, a DICOMweb server "
                                "or an export folder")
        kind = self.settings.kind_of(destination)
        if kind is None:
            known = ", ".join(self.settings.destination_names()) or "none configured"
            raise ApiError(400, f"Destination: unknown destination {destination[:40]!r}; known: {known}")
        refused = self.refusal(destination)
        if refused:
            raise ApiError(400, f"Destination: {refused}")
        plans = parse_plans(body.get("Plans"))
        try:
            profile = Profile.from_json(body.get("Profile"))
        except ProfileError as exc:
            raise ApiError(400, str(exc)) from None
        label = body.get("Label", "")
        if not isinstance(label, str) or len(label) > 200:
            raise ApiError(400, "Label: a string of at most 200 characters")
        try:
            harvest_state = self.check_harvest(harvest_id)
        except ApiError as exc:
            raise ApiError(exc.status, f"Harvest: {exc.message}") from None
        if harvest_state not in EXPORTABLE_HARVEST_STATES:
            raise ApiError(409, f"Harvest: {harvest_id} is {harvest_state}; export it once it is Completed "
                                "(its manifest is final then)")
        params = {"Harvest": harvest_id, "Plans": plans.spec, "Profile": profile.to_json()}
        export = self.queue.create_owner(OwnerKind.EXPORT, destination, label or f"export of {harvest_id}", params)
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO rth_exports (id, harvest_id, destination, kind, plans, profile, site, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (export.id, harvest_id, destination, kind, json.dumps(plans.spec), json.dumps(profile.to_json()),
                 self.settings.site, time.time()))
            self.queue.enqueue(export.id, SEND, destination, {"Export": export.id}, dedupe_key="send")
        self.events.write(Level.INFO, "export", f"export to {destination} ({kind}) created", harvest_id=harvest_id)
        self._worker.wake()
        return {"ID": export.id, "State": self.state(export.id)}

    def _row(self, export_id: str) -> tuple[Any, ...]:
        row = self.db.query_one(
            "SELECT id, harvest_id, destination, kind, plans, profile, site, created_at, selected, verification,"
            " verified_at FROM rth_exports WHERE id = ?", (export_id,))
        if row is None:
            raise ApiError(404, f"unknown export {export_id[:64]!r}; list exports with GET /rtharvest/exports")
        return row

    def state(self, export_id: str) -> str:
        """``Running``, ``Completed`` (sent and verified), ``HeldBack`` (verified, but the check before
        sending held objects back), ``VerificationFailed``, ``Failed``, ``Paused`` or ``Cancelled``."""
        harvest = self.queue.get_harvest(export_id)
        if harvest.state in (HarvestState.CANCELLED, HarvestState.PAUSED):
            return harvest.state.value
        counts = self.queue.counts(export_id)
        if counts[JobState.FAILED]:
            return "Failed"
        if counts[JobState.PENDING] or counts[JobState.LEASED] or counts[JobState.WAITING]:
            return "Running"
        verification = self.db.scalar("SELECT verification FROM rth_exports WHERE id = ?", (export_id,))
        if verification is None:
            return "Running"
        verdict = json.loads(verification)
        held = self.db.scalar("SELECT count(*) FROM rth_export_items WHERE export_id = ? AND state = 'held'",
                              (export_id,), 0)
        if held and not verdict.get("PhiHitCount") and not verdict.get("AbsentCount"):
            # Everything sent arrived and holds nothing identifying; the copy lacks the held objects (its
            # manifest may differ from the site's for just that reason).
            return "HeldBack"
        return "Completed" if verdict.get("Passed") else "VerificationFailed"

    def findings(self, export_id: str, limit: int = FINDINGS_LISTED, offset: int = 0) -> list[dict[str, Any]]:
        """What the check before sending cleaned or held (de-identified UID, attribute, kind; never the value)."""
        return [Finding(r[0], r[1], r[2], FindingAction(r[3])).to_json() for r in self.db.query(
            "SELECT new_uid, attribute, kind, action FROM rth_export_findings WHERE export_id = ?"
            " ORDER BY new_uid, attribute, kind LIMIT ? OFFSET ?", (export_id, limit, offset))]

    def document(self, export_id: str) -> dict[str, Any]:
        """``GET /rtharvest/exports/{id}``."""
        row = self._row(export_id)
        counts = dict(self.db.query(
            "SELECT state, count(*) FROM rth_export_items WHERE export_id = ? GROUP BY state", (export_id,)))
        verified = self.db.scalar("SELECT count(*) FROM rth_export_items WHERE export_id = ? AND verified = 1",
                                  (export_id,), 0)
        resent = self.db.scalar("SELECT count(*) FROM rth_export_items WHERE export_id = ? AND sends > 1",
                                (export_id,), 0)
        plans = self.db.scalar("SELECT json_array_length(site_rows) FROM rth_exports WHERE id = ?", (export_id,))
        failed_jobs = self.queue.list_jobs(harvest_id=export_id, state="failed", limit=5)
        harvest = self.queue.get_harvest(export_id)
        return {
            "ID": row[0], "Harvest": row[1], "Destination": row[2], "DestinationKind": row[3], "Label": harvest.label,
            "Plans": json.loads(row[4]), "Profile": json.loads(row[5]), "Site": row[6],
            "State": self.state(export_id), "CreatedAt": _iso(row[7]),
            "Progress": {
                "PlansSelected": plans or 0,
                "InstancesTotal": sum(counts.values()),
                "InstancesSent": counts.get("sent", 0),
                "InstancesFailed": counts.get("failed", 0),
                "InstancesPending": counts.get("pending", 0),
                "InstancesHeld": counts.get("held", 0),
                "InstancesVerified": verified,
                "InstancesResent": resent,
            },
            "Errors": [j.last_error for j in failed_jobs if j.last_error],
            "PreSendCheck": self._presend_document(export_id, Profile.from_json(json.loads(row[5]))),
            "Verification": json.loads(row[9]) if row[9] else None,
            "VerifiedAt": _iso(row[10]),
        }

    def _presend_document(self, export_id: str, profile: Profile) -> dict[str, Any]:
        by_action = dict(self.db.query("SELECT action, count(*) FROM rth_export_findings WHERE export_id = ?"
                                       " GROUP BY action", (export_id,)))
        objects = dict(self.db.query("SELECT action, count(DISTINCT new_uid) FROM rth_export_findings"
                                     " WHERE export_id = ? GROUP BY action", (export_id,)))
        total = sum(by_action.values())
        return {"OnPhiFound": profile.on_phi.value,
                "Cleaned": by_action.get("cleaned", 0), "Held": by_action.get("held", 0),
                "InstancesCleaned": objects.get("cleaned", 0), "InstancesHeld": objects.get("held", 0),
                "Findings": self.findings(export_id), "FindingsCount": total}

    def list_exports(self, limit: int = 100) -> list[dict[str, Any]]:
        """``GET /rtharvest/exports``: newest first."""
        ids = [r[0] for r in self.db.query("SELECT id FROM rth_exports ORDER BY created_at DESC LIMIT ?", (limit,))]
        return [self.document(i) for i in ids]

    def cancel(self, export_id: str) -> dict[str, Any]:
        """Stop an export (what was sent stays sent)."""
        self._row(export_id)
        try:
            self.queue.cancel(export_id)
        except QueueError as exc:
            raise ApiError(409, str(exc)) from None
        return {"ID": export_id, "State": self.state(export_id)}

    def failed_items(self, export_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """Instances that could not be sent (by de-identified UID when known; never PHI)."""
        return [{"SOPInstanceUID": r[0] or self.key().uid(r[1]), "Error": r[2]} for r in self.db.query(
            "SELECT new_uid, sop_uid, error FROM rth_export_items WHERE export_id = ? AND state = 'failed'"
            " LIMIT ?", (export_id, limit))]

    # -- worker ------------------------------------------------------------------------------------------

    def start(self, read_file: Callable[[str], bytes]) -> None:
        """Recover leases of a dead run and start the export worker thread."""
        self.read_file = read_file
        lock_path = f"{self.settings.database_path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd
            recovered = self.queue.recover_stale_leases(owner_prefix="")
            if recovered:
                self.events.write(Level.WARNING, "export", f"{recovered} export job(s) were running when the "
                                  "previous run ended; they resume now")
        except OSError:
            os.close(fd)
        self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker (the job in progress is released at its next batch)."""
        self._worker.stop(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.db.close()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._worker.alive

    def run_one(self) -> bool:
        """Claim and run one export job; False when none was due."""
        job = self.queue.claim(self._owner, self.lease_seconds, kinds=(SEND, VERIFY))
        if job is None:
            return False
        try:
            if job.kind == SEND:
                self._send(job)
                self.queue.complete(job.id, self._owner, note="sent",
                                    follow_ups=[EnqueueItem(job.owner_id, VERIFY, job.source,
                                                            {"Export": job.owner_id}, "verify")])
            else:
                self._verify(job)
                self.queue.complete(job.id, self._owner, note="verified")
        except _Stopped:
            self.queue.release(job.id, self._owner)
        except _Refused as exc:
            self._fail(job, str(exc), False)
        except (DestinationError, _ItemsFailed) as exc:
            self._fail(job, str(exc), True)
        except QueueError as exc:
            log.warning("export job %s lost its lease: %s", job.id, exception_summary(exc))
        except Exception as exc:  # a bug: fail the attempt visibly rather than kill the worker
            log.exception("export job %s failed unexpectedly", job.id)
            # The type only (exception_summary): de-identification reads datasets, and a bug's message may
            # quote the value it choked on; the job error and the event must not.
            self._fail(job, f"internal error: {exception_summary(exc)}", True)
        return True

    def _fail(self, job: Job, message: str, retryable: bool) -> None:
        try:
            updated = self.queue.fail(job.id, self._owner, message, retryable=retryable)
        except QueueError:
            return
        level = Level.ERROR if updated.state is JobState.FAILED else Level.WARNING
        self.events.write(level, "export", f"{job.kind} of export {job.owner_id} failed (attempt "
                          f"{updated.attempts}): {message}")

    # -- ExportSend ---------------------------------------------------------------------------------------

    def _select(self, export_id: str, harvest_id: str, plans: PlanFilter) -> None:
        manifest = self.harvest_manifest(harvest_id)
        rows = [r for r in manifest.plans if plans.accepts(r)]
        objects = objects_of_rows(rows, self.harvest_objects(harvest_id))
        with self.db.transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO rth_export_items (export_id, sop_uid, orthanc_id, series_uid)"
                " VALUES (?, ?, ?, ?)",
                [(export_id, uid, obj.orthanc_id, obj.series_uid) for uid, obj in objects.items()])
            self.db.execute("UPDATE rth_exports SET selected = 1, site_rows = ? WHERE id = ?",
                            (json.dumps([r.to_json(causes=True) for r in rows]), export_id))
        self.events.write(Level.INFO, "export", f"export {export_id}: {len(rows)} plan(s), {len(objects)} "
                          "instance(s) selected", harvest_id=harvest_id)

    def _send(self, job: Job) -> None:
        row = self._row(job.owner_id)
        export_id, harvest_id, destination_name = row[0], row[1], row[2]
        if not row[8]:
            self._select(export_id, harvest_id, PlanFilter(json.loads(row[4])))
        profile = Profile.from_json(json.loads(row[5]))
        refused = self.refusal(destination_name)
        if refused:  # became a source after the export was created: nothing is sent
            raise _Refused(refused)
        destination = self.destination_of(destination_name, export_id)
        key = self.key()
        todo = [(r[0], r[1]) for r in self.db.query(
            "SELECT sop_uid, orthanc_id FROM rth_export_items WHERE export_id = ? AND state IN ('pending', 'failed')"
            " ORDER BY series_uid, sop_uid", (export_id,))]
        values = self._phi_values(export_id, profile) if todo else {}
        size = self.settings.batch_size
        for start in range(0, len(todo), size):
            if self._worker.stopping:
                raise _Stopped()
            self.queue.heartbeat(job.id, self._owner, self.lease_seconds)
            self._send_batch(export_id, todo[start:start + size], destination, key, profile, values)
        failed = self.db.scalar("SELECT count(*) FROM rth_export_items WHERE export_id = ? AND state = 'failed'",
                                (export_id,), 0)
        if failed:
            first = self.db.scalar("SELECT error FROM rth_export_items WHERE export_id = ? AND state = 'failed'"
                                   " LIMIT 1", (export_id,))
            raise _ItemsFailed(f"{failed} instance(s) not accepted by {destination_name}, e.g. {first}")

    def _phi_values(self, export_id: str, profile: Profile) -> dict[str, str]:
        """The identifying values of the export's patients and of the site, read from the originals (one
        object per series: they are patient- and study-level values). The same values for the check before
        sending and for the verification, whatever was sent or held."""
        assert self.read_file is not None
        one_per_series: dict[str, str] = {}
        for sop_uid, orthanc_id, series_uid in self.db.query(
                "SELECT sop_uid, orthanc_id, series_uid FROM rth_export_items WHERE export_id = ?"
                " ORDER BY sop_uid", (export_id,)):
            one_per_series.setdefault(series_uid or sop_uid, orthanc_id)
        self._originals = {}
        for series_uid, orthanc_id in one_per_series.items():
            try:
                self._originals[series_uid] = pydicom.dcmread(io.BytesIO(self.read_file(orthanc_id)),
                                                              stop_before_pixels=True)
            except Exception:
                continue
        return phi_values(self._originals.values(), profile)

    def _send_batch(self, export_id: str, batch: Sequence[tuple[str, str]], destination: Destination,
                    key: SiteKey, profile: Profile, values: Mapping[str, str]) -> None:
        assert self.read_file is not None
        outgoing = []
        errors: dict[str, str] = {}
        new_of: dict[str, tuple[str, str, str]] = {}
        held: set[str] = set()
        findings: list[Finding] = []
        for sop_uid, orthanc_id in batch:
            try:
                ds = pydicom.dcmread(io.BytesIO(self.read_file(orthanc_id)))
            except Exception as exc:
                errors[sop_uid] = f"stored copy unreadable: {exception_summary(exc)}"
                continue
            out = deidentify(ds, key, profile, self.pseudonym(str(ds.get("PatientID", ""))), in_place=True)
            new_of[sop_uid] = (str(out.SOPInstanceUID), str(out.get("StudyInstanceUID", "")),
                               str(out.get("SeriesInstanceUID", "")))
            send, found = check_before_send(out, values, profile.on_phi)
            findings += found
            if send:
                outgoing.append(out)
            else:
                held.add(sop_uid)
        refused = destination.send(outgoing)  # raises DestinationError: nothing recorded, batch resent later
        updates = []
        for sop_uid, _ in batch:
            new = new_of.get(sop_uid)
            error = errors.get(sop_uid) or (refused.get(new[0]) if new else None)
            state = "held" if sop_uid in held else "failed" if error else "sent"
            updates.append((state, error, *(new or (None, None, None)), export_id, sop_uid))
        with self.db.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO rth_export_findings (export_id, new_uid, attribute, kind, action)"
                " VALUES (?, ?, ?, ?, ?)", [(export_id, f.sop_uid, f.attribute, f.kind, f.action.value)
                                            for f in findings])
            self.db.executemany(
                "UPDATE rth_export_items SET state = ?, error = ?, new_uid = ?, new_study = ?, new_series = ?,"
                " sends = sends + 1 WHERE export_id = ? AND sop_uid = ?", updates)

    # -- ExportVerify ---------------------------------------------------------------------------------------

    def _verify(self, job: Job) -> None:
        assert self.read_file is not None
        row = self._row(job.owner_id)
        export_id = row[0]
        profile = Profile.from_json(json.loads(row[5]))
        destination = self.destination_of(row[2], export_id)
        key = self.key()
        items = self.db.query("SELECT sop_uid, orthanc_id, series_uid, new_uid, new_study, new_series"
                              " FROM rth_export_items WHERE export_id = ? AND state = 'sent'", (export_id,))
        expected = {r[3]: r[0] for r in items}
        values = self._phi_values(export_id, profile)
        originals = self._originals
        # The site's image series modalities under their new UIDs (the Table-1 ImageSeries of the selection).
        site_modalities = {key.uid(uid): str(ds.get("Modality", "")) for uid, ds in originals.items()}
        result = Verification(instances_expected=len(expected), site_values=len(values))
        refs = []
        found: set[str] = set()
        series = sorted({(r[4], r[5]) for r in items})
        for data in destination.fetch(series):
            if self._worker.stopping:
                raise _Stopped()
            try:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            except Exception:
                result.differences.append("the destination returned an object pydicom cannot read")
                continue
            uid = str(ds.get("SOPInstanceUID", ""))
            if uid not in expected:
                result.unexpected += 1
                continue
            if uid in found:
                continue
            found.add(uid)
            result.phi_hits += scan_for_phi(ds, values)
            ref = extract(ds)
            if ref.kind is not ObjectKind.UNREADABLE:
                refs.append(ref)
        result.instances_found = len(found)
        result.absent = sorted(set(expected) - found)
        copy = manifest_of_copy(refs, export_id)
        site_rows = json.loads(self.db.scalar("SELECT site_rows FROM rth_exports WHERE id = ?", (export_id,)) or "[]")
        for site_row in site_rows:  # plan labels as the check before sending cleaned them
            if site_row.get("PlanLabel"):
                site_row["PlanLabel"] = cleaned_label(str(site_row["PlanLabel"]), values)
        pseudonyms = dict(self.db.query("SELECT patient_id, pseudonym FROM rth_pseudonyms WHERE site = ?",
                                        (key.site,)))
        wanted = expected_rows(site_rows, key, profile, lambda pid: pseudonyms.get(pid) or key.pseudonym(pid))
        result.plans_compared = len(wanted)
        copy_rows = copy.to_json()["Plans"]
        result.differences += compare(wanted, copy_rows)
        # Table-1 counts of the selection, site against copy (the copy's modalities read from the copy).
        copy_modalities = {r.series_uid: r.modality or "" for r in refs if r.series_uid}
        wanted_plans = {w["PlanUID"] for w in wanted}
        result.site_summary = summary_of_rows(wanted, site_modalities)
        result.copy_summary = summary_of_rows([r for r in copy_rows if r["PlanUID"] in wanted_plans],
                                              copy_modalities)
        result.differences += compare_summaries(result.site_summary, result.copy_summary)
        doc = result.to_json()
        manifest_doc = copy.to_json()
        manifest_doc.pop("Failures", None)
        destination.write_manifest({"Export": export_id, "Site": key.site, "Profile": profile.to_json(),
                                    "Verification": doc, **manifest_doc})
        # A consortium archive configured for this destination learns what was delivered (rtharvest.central).
        doc["Central"] = announce(self.settings.central.get(row[2]), delivery_document(
            key.site, export_id, profile.to_json(), wanted, result.site_summary, expected, site_modalities, doc))
        with self.db.transaction():
            self.db.executemany("UPDATE rth_export_items SET verified = 1 WHERE export_id = ? AND new_uid = ?",
                                [(export_id, uid) for uid in found])
            self.db.execute("UPDATE rth_exports SET verification = ?, verified_at = ? WHERE id = ?",
                            (json.dumps(doc), time.time(), export_id))
        level = Level.INFO if result.ok else Level.ERROR
        self.events.write(level, "export", f"export {export_id} verified: {len(found)}/{len(expected)} instance(s), "
                          f"{len(result.differences)} manifest difference(s), {len(result.phi_hits)} PHI hit(s)",
                          harvest_id=row[1])


def write_secret_file(path: Path, secret: bytes) -> None:
    """Create ``path`` holding ``secret`` (hex), readable by the owner only, atomically: written to a
    temporary file of mode 0600 first and linked into place, so a crash never leaves a half-written key and
    two processes starting at once keep the first one's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def read_secret_file(path: Path) -> bytes:
    """The secret of ``path``; a file others may read is restricted to its owner (and a warning logged)."""
    mode = path.stat().st_mode
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others (mode %o); now 0600", path, mode & 0o777)
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise RuntimeError(f"{path}: not an export secret (hex digits expected)") from None


class _Stopped(Exception):
    """The plugin is stopping: give the job back."""


class _Refused(Exception):
    """The destination is a clinical system (see :meth:`ExportService.refusal`)."""


class _ItemsFailed(Exception):
    """Some instances were refused: the attempt fails and the next one resends only those."""

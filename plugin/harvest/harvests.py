"""Harvests as users see them: validated start requests, routing, and the documents REST returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..core.classify import HarvestWindow
from ..core.planner import HarvestContext, ReasonCode, start_operations
from ..core.strategies import discovery_description, record_discovery_bound
from ..edge.config import HarvesterConfig
from ..store.eventlog import EventLog, Level
from ..store.jobqueue import EnqueueItem, Harvest, HarvestState, JobQueue
from ..store.tracking import Tracker
from ..web.httpapi import ApiError
from .ingest import HarvestRouting, job_for

_FIELDS = ("Source", "LookupSources", "From", "To", "PatientIDs", "Label")
MAX_PATIENT_IDS = 10_000
MAX_LABEL = 200
#: The visible state of a Running harvest whose every open job waits for an outage to end.
WAITING = "Waiting"


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _source_name(value: Any, field: str, config: HarvesterConfig) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{field} must be the name of a source (one of the DicomModalities)")
    if value not in config.modalities:
        known = ", ".join(sorted(config.modalities)) or "none configured"
        raise ApiError(400, f"{field}: unknown source {value!r}; configured sources: {known}")
    return value


def parse_start_request(body: Mapping[str, Any], config: HarvesterConfig) -> tuple[str, tuple[str, ...],
                                                                                    HarvestWindow, str]:
    """Validate ``POST /rtharvest/harvests``; returns (source, lookup sources, window, label).

    Raises:
        ApiError: 400 naming the field and how to fix it.
    """
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    if "Source" not in body:
        raise ApiError(400, "Source is required: the source where treatment records are queried (e.g. \"ARIA\")")
    source = _source_name(body["Source"], "Source", config)
    lookup_raw = body.get("LookupSources", [source])
    if not isinstance(lookup_raw, list) or not lookup_raw:
        raise ApiError(400, "LookupSources must be a non-empty list of source names, searched in order")
    lookup: list[str] = []
    for i, name in enumerate(lookup_raw):
        checked = _source_name(name, f"LookupSources[{i}]", config)
        if checked not in lookup:
            lookup.append(checked)
    for key in ("From", "To"):
        if key in body and body[key] is not None and not isinstance(body[key], str):
            raise ApiError(400, f"{key} must be a date as \"YYYYMMDD\"")
    patients_raw = body.get("PatientIDs", [])
    if patients_raw is None:
        patients_raw = []
    if not isinstance(patients_raw, list) or not all(isinstance(p, str) for p in patients_raw):
        raise ApiError(400, "PatientIDs must be a list of strings")
    if len(patients_raw) > MAX_PATIENT_IDS:
        raise ApiError(400, f"PatientIDs lists {len(patients_raw)} patients; split it into harvests of at most "
                       f"{MAX_PATIENT_IDS}")
    for pid in patients_raw:
        # PatientID is LO: at most 64 characters, no backslash (it would become a multi-value in a query).
        if not pid.strip() or len(pid) > 64 or "\\" in pid or any(c in pid for c in "*?"):
            raise ApiError(400, f"PatientIDs: {pid[:70]!r} is not a valid PatientID (1-64 characters, no \\ * ?)")
    label = body.get("Label", "")
    if label is None:
        label = ""
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        raise ApiError(400, f"Label must be a string of at most {MAX_LABEL} characters")
    try:
        window = HarvestWindow(body.get("From") or None, body.get("To") or None,
                               tuple(dict.fromkeys(p.strip() for p in patients_raw)))
    except ValueError as exc:
        raise ApiError(400, f"{exc}") from None
    return source, tuple(lookup), window, label


class HarvestService:
    """Starts harvests and answers what REST shows about them."""

    def __init__(self, config: HarvesterConfig, queue: JobQueue, tracker: Tracker, events: EventLog) -> None:
        self.config = config
        self.queue = queue
        self.tracker = tracker
        self.events = events
        self._routing: dict[str, HarvestRouting] = {}
        self._lock = threading.Lock()
        #: Called after jobs were enqueued (the harvester wakes its idle workers).
        self.on_enqueue: Callable[[], None] | None = None
        #: A finished harvest's PatientID mismatches as its manifest counts them (records kept out and objects
        #: collected by UID whose PatientID is not their plan's): reason -> count. Set by the app
        #: (``ManifestService.patient_id_mismatches``); without it the document counts the records kept out.
        self.manifest_mismatches: Callable[[str], dict[str, int]] | None = None

    def start(self, body: Mapping[str, Any]) -> Harvest:
        """Create a harvest and enqueue its treatment-record queries."""
        source, lookup, window, label = parse_start_request(body, self.config)
        params = {"LookupSources": list(lookup), "Window": window.to_dict()}

        def seed(harvest_id: str) -> list[EnqueueItem]:
            routing = HarvestRouting(harvest_id, window, source, lookup)
            return [job_for(routing, op) for op in start_operations(HarvestContext(window, harvest_id))]

        # One transaction: a crash cannot leave a harvest without its seed jobs.
        harvest = self.queue.create_harvest(source, label, params, seed=seed)
        with self._lock:
            self._routing[harvest.id] = HarvestRouting(harvest.id, window, source, lookup)
        if self.on_enqueue is not None:
            self.on_enqueue()
        self.events.write(Level.INFO, "harvests", f"harvest started at {source} (lookup: {', '.join(lookup)}; "
                          f"window {window.date_range() or 'any date'}, {len(window.patient_ids)} patient(s))",
                          harvest_id=harvest.id, source=source)
        unbounded = self.discovery(harvest)["Unbounded"]
        if unbounded:
            self.events.write(Level.WARNING, "harvests", f"finding the records is not bounded by the window at "
                              f"{source}: {unbounded}", harvest_id=harvest.id, source=source)
        return self.queue.get_harvest(harvest.id)

    def routing(self, harvest_id: str) -> HarvestRouting | None:
        """Where the harvest's operations run (cached; rebuilt from the stored params after a restart)."""
        with self._lock:
            cached = self._routing.get(harvest_id)
        if cached is not None:
            return cached
        try:
            harvest = self.queue.get_harvest(harvest_id)
        except LookupError:
            return None
        params = harvest.params
        try:
            window = HarvestWindow.from_dict(params.get("Window", {}))
        except (ValueError, TypeError):
            return None
        lookup = tuple(params.get("LookupSources") or [harvest.source])
        routing = HarvestRouting(harvest.id, window, harvest.source, lookup)
        with self._lock:
            self._routing[harvest_id] = routing
        return routing

    def get(self, harvest_id: str) -> Harvest:
        """The harvest, or ApiError 404."""
        try:
            return self.queue.get_harvest(harvest_id)
        except LookupError:
            raise ApiError(404, f"unknown harvest {harvest_id!r}; list harvests with GET /rtharvest/harvests") from None

    def visible_state(self, harvest: Harvest) -> str:
        """Completed only once the end-of-harvest cleanup ran (the store is final then); ``Waiting`` while
        it runs but every open job is held back by an outage (a source down, the store unavailable)."""
        if harvest.state == HarvestState.COMPLETED and not self.tracker.cleanup_done(harvest.id):
            return HarvestState.RUNNING.value
        if harvest.state == HarvestState.RUNNING and self.outage_waits(harvest) is not None:
            return WAITING
        return harvest.state.value

    def outage_waits(self, harvest: Harvest) -> list[dict[str, Any]] | None:
        """Why a running harvest waits: per fault class the jobs held back and the latest reason; None
        when some open job is not held back by an outage (the harvest is making progress)."""
        waits = self.queue.outage_waits(harvest.id)
        if not waits:
            return None
        progress = self.queue.progress(harvest.id)
        held = sum(n for n, _ in waits.values())
        if held < progress.pending + progress.waiting + progress.running:
            return None
        return [{"FaultClass": fault, "Jobs": n, "Reason": reason} for fault, (n, reason) in sorted(waits.items())]

    def document(self, harvest: Harvest) -> dict[str, Any]:
        """The contract's harvest object."""
        window = harvest.params.get("Window", {})
        doc: dict[str, Any] = {
            "ID": harvest.id,
            "Source": harvest.source,
            "LookupSources": harvest.params.get("LookupSources", [harvest.source]),
            "Label": harvest.label,
            "State": self.visible_state(harvest),
            "CreatedAt": _iso(harvest.created_at),
            "From": window.get("From"),
            "To": window.get("To"),
            "PatientIDs": window.get("PatientIDs", []),
            "Progress": self.queue.progress(harvest.id).as_contract(),
        }
        if doc["State"] == WAITING:
            doc["WaitingFor"] = self.outage_waits(harvest)
        doc.update(self.tracker.summary_counts(harvest.id))
        # Arrivals whose decision failed on the C-STORE path (each is then planned from the store by its
        # job, or the job fails): non-zero means "read the log", even when every job completed.
        doc["IngestFailures"] = self.events.count(min_level=Level.ERROR, harvest_id=harvest.id, component="ingest")
        doc["RecordDiscovery"] = self.discovery(harvest)
        mismatches: dict[str, int] | None = None
        if self.manifest_mismatches is not None and doc["State"] in (HarvestState.COMPLETED.value,
                                                                     HarvestState.CANCELLED.value):
            # Final: the manifest's count, which adds what was collected by UID (built once per harvest state).
            try:
                mismatches = self.manifest_mismatches(harvest.id)
            except ApiError:
                mismatches = None  # the store cannot be read yet (start-up): the records kept out, as while running
        if mismatches is None:
            mismatches = self.tracker.rejections_coded(harvest.id, ReasonCode.PATIENT_ID_MISMATCH.value)
        doc["PatientIDMismatches"] = {"Count": sum(mismatches.values()), "Reasons": mismatches}
        # Every answer a search rule dropped and every arrival a rule rejected, by reason code: nothing a rule
        # discards is silent (docs/harvest-rules.md, "Identity").
        discarded = self.tracker.discards(harvest.id)
        doc["Discarded"] = {"Count": sum(discarded.values()), "ByReason": discarded}
        return doc

    def discovery(self, harvest: Harvest) -> dict[str, Any]:
        """How this harvest's treatment records are found at its source, and what the window does not bound."""
        if harvest.source not in self.config.modalities:
            return {"Method": "unknown: the source is no longer configured", "Unbounded": None}
        cap = self.config.source(harvest.source).capability()
        window = harvest.params.get("Window", {})
        patients = bool(window.get("PatientIDs"))
        dated = bool(window.get("From") or window.get("To"))
        method = ("one search per listed patient" if patients else discovery_description(cap))
        return {"Method": method, "Unbounded": record_discovery_bound(cap, dated, patients, window.get("From"))}

    def control(self, harvest_id: str, action: str) -> Harvest:
        """pause / resume / cancel, with 404 and 409 for impossible requests."""
        self.get(harvest_id)
        try:
            if action == "pause":
                harvest = self.queue.pause(harvest_id)
            elif action == "resume":
                harvest = self.queue.resume(harvest_id)
            else:
                harvest = self.queue.cancel(harvest_id)
        except LookupError:
            raise ApiError(404, f"unknown harvest {harvest_id!r}") from None
        except Exception as exc:  # InvalidTransition and friends
            raise ApiError(409, str(exc)) from None
        self.events.write(Level.INFO, "harvests", f"harvest {action}d", harvest_id=harvest_id)
        return harvest

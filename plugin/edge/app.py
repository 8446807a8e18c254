"""Composition root inside Orthanc: configuration, database, queue, routes, callbacks and workers.

:func:`install` is all the entry script calls. It registers callbacks and routes at import time (the
only moment Orthanc allows it) and defers every thread to ``ORTHANC_STARTED``, stopping and joining them
on ``ORTHANC_STOPPED``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..background import BackgroundLoop
from ..central import routes as central_routes
from ..central.service import CentralService
from ..central.settings import load_central
from ..core.manifest import ManifestService
from ..core.schedule import ScheduleError
from ..core.strategies import discovery_description, record_discovery_bound
from ..dimse.politeness import SourceGate
from ..export import routes as export_routes
from ..export.service import ExportService
from ..harvest.faults import PROBE_TIMEOUT_S, FaultClass, HealthMonitor
from ..harvest.harvester import Harvester, SourceAccess
from ..harvest.harvests import HarvestService
from ..harvest.ingest import Ingest
from ..harvest.reconcile import Reconciliation, reconcile
from ..harvest.schedules import ScheduleRunner, ScheduleService
from ..store.db import Database
from ..store.eventlog import EventLog, EventLogHandler, Level
from ..store.jobqueue import JobQueue, JobState, RetryPolicy, SourceLimits
from ..store.tracking import Tracker
from ..web import pages as explorer_routes
from ..web.httpapi import ApiError, HttpRequest, HttpResponse, Router
from ..web.rest import build_routes, build_schedule_routes
from . import sdk
from .config import Backend, ConfigError, HarvesterConfig, SourceSettings
from .indexstats import ensure_statistics_logged, index_file
from .launcher import first_run_credential_warning
from .preflight import CRASHES_ON_HTTPS, RecordingConfiguration, load_checked, with_warnings

log = logging.getLogger("rtharvest.app")


@dataclass
class Runtime:
    """What the running plugin holds; created once by :func:`install`."""

    router: Router
    config: HarvesterConfig | None = None
    config_error: str | None = None
    db: Database | None = None
    queue: JobQueue | None = None
    events: EventLog | None = None
    tracker: Tracker | None = None
    harvests: HarvestService | None = None
    ingest: Ingest | None = None
    harvester: Harvester | None = None
    schedules: ScheduleService | None = None
    scheduler: ScheduleRunner | None = None
    #: The start-up reconciliation of the queue against the store (``Done`` once the workers may start).
    reconciliation: Reconciliation | None = None
    log_handler: EventLogHandler | None = None
    #: The store's and the sources' health (the status route's ``Health``; blames job failures).
    health: HealthMonitor | None = None
    #: Orthanc's versions, read once after start-up (never while answering: the index may be down).
    versions: sdk.Versions | None = None
    started: bool = False
    #: The export service (its worker starts with the harvester).
    exports: ExportService | None = None
    #: The central archive, when this Orthanc is one.
    central: CentralService | None = None
    #: Background loops of the composition root: event-log retention, the store's health probe, and the
    #: one-shot start-up (reconciliation, then workers and scheduler).
    log_retention: BackgroundLoop | None = None
    health_probe: BackgroundLoop | None = None
    startup: BackgroundLoop | None = None


_runtime: Runtime | None = None


def status_document(runtime: Runtime) -> dict[str, Any]:
    """The body of ``GET /rtharvest/status``.

    Answered from the plugin's own database and memory only, never by calling Orthanc: while Orthanc's
    index is down every index call blocks (and an in-process one holds the GIL), and this is the route an
    operator reads to find out why.
    """
    versions = runtime.versions
    doc: dict[str, Any] = {
        "Plugin": "rtharvest",
        "PluginVersion": __version__,
        "OrthancVersion": versions.orthanc if versions else None,
        "OrthancApiVersion": versions.api if versions else None,
        "PythonPluginVersion": versions.python_plugin if versions else None,
        "Started": runtime.started,
        "WorkersAlive": runtime.harvester.alive if runtime.harvester else 0,
        "SchedulerAlive": bool(runtime.scheduler and runtime.scheduler.alive),
    }
    if runtime.config_error:
        doc["ConfigurationError"] = runtime.config_error
    if runtime.config is not None:
        doc["Aet"] = runtime.config.aet
        doc["Sources"] = sorted(runtime.config.modalities)
        doc["Workers"] = runtime.config.workers
        doc["StoreIndex"] = runtime.config.store_index
        if runtime.config.warnings:
            doc["ConfigurationWarnings"] = list(runtime.config.warnings)
        # How each source's treatment records are found, and whether a dated window bounds that search.
        doc["RecordDiscovery"] = {
            name: {"Method": discovery_description(cap),
                   "Unbounded": record_discovery_bound(cap, True, False, "19000101")}
            for name in sorted(runtime.config.modalities)
            for cap in (runtime.config.source(name).capability(),)
        }
    if runtime.queue is not None:
        counts = runtime.queue.counts()
        doc["Queue"] = {state.value: counts.get(state, 0) for state in JobState}
    if runtime.harvester is not None:
        # Associations this harvester opened per source: open now, most at once, in total.
        doc["SourceActivity"] = {name: {"Open": a.open, "Peak": a.peak, "Operations": a.total, "Waited": a.waited,
                                        "Finds": a.finds, "Moves": a.moves}
                                 for name, a in sorted(runtime.harvester.gate.activity().items())}
    if runtime.exports is not None:
        doc["ExportWorkerAlive"] = runtime.exports.alive
    if runtime.central is not None:
        doc["Central"] = {"Sites": sorted(runtime.central.settings.sites)}
    if runtime.reconciliation is not None:
        doc["StartupReconciliation"] = runtime.reconciliation.status()
    if runtime.ingest is not None:
        doc["Arrivals"] = runtime.ingest.arrivals
        doc["UnsolicitedArrivals"] = runtime.ingest.unsolicited
    if runtime.health is not None and runtime.config is not None:
        waiting = runtime.queue.outage_waits() if runtime.queue is not None else {}
        exports = runtime.exports
        doc["Health"] = runtime.health.document(
            sorted(runtime.config.modalities),
            scheduler_alive=bool(runtime.scheduler and runtime.scheduler.alive) if runtime.schedules else None,
            export_worker_alive=bool(exports.alive) if exports is not None else None,
            workers_alive=runtime.harvester.alive if runtime.harvester else 0,
            workers=runtime.config.workers, started=runtime.started,
            waiting={fault: {"Jobs": n, "Reason": reason} for fault, (n, reason) in waiting.items()})
    elif runtime.config_error:
        doc["Health"] = {"Ok": False, "Problems": [f"configuration error: {runtime.config_error}"]}
    return doc


def _build_sources(config: HarvesterConfig, authorization: str) -> dict[str, SourceAccess]:
    from ..dimse.via_orthanc import OrthancRestBackend
    from ..dimse.via_pynetdicom import PynetdicomBackend
    from .loopback import LoopbackClient, loopback_url

    client = LoopbackClient(loopback_url(config.ssl, config.http_port), authorization, timeout=60.0)
    sources: dict[str, SourceAccess] = {}
    for name, modality in config.modalities.items():
        settings = config.source(name)
        backend: Any
        if settings.backend is Backend.PYNETDICOM:
            backend = PynetdicomBackend(modality, config.aet)
        else:
            backend = OrthancRestBackend(client, name, config.aet)
        sources[name] = SourceAccess(name, backend, settings.capability(backend.supports_sequence_keys),
                                     settings.find_timeout, settings.move_timeout)
    return sources


def _hold_database_alone(config: HarvesterConfig) -> bool:
    """Lock ``<DatabasePath>.lock`` for this process's lifetime; False if another live process holds it.

    The kernel drops the lock when its holder dies (SIGKILL, power loss), so holding it proves that every
    lease in the queue belongs to a dead run: those jobs can be reclaimed now instead of after LeaseSeconds.
    """
    import fcntl

    fd = os.open(f"{config.database_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _held_fds.append(fd)  # kept open (and locked) until the process exits
    return True


_held_fds: list[int] = []


def _reclaim_leases_of_dead_runs(rt: Runtime) -> None:
    assert rt.config is not None and rt.queue is not None and rt.events is not None
    if _hold_database_alone(rt.config):
        recovered = rt.queue.recover_stale_leases(owner_prefix="")
        if recovered:
            rt.events.write(Level.WARNING, "app", f"{recovered} job(s) were running when the previous run ended "
                            "(crash or kill); they are pending again")
    else:
        rt.events.write(Level.WARNING, "app", f"another process holds {rt.config.database_path}.lock: jobs it "
                        "leased are reclaimed only when their lease expires (LeaseSeconds)")


#: How often the event log is purged of events older than ``LogRetentionDays``.
PURGE_INTERVAL_SECONDS = 6 * 3600.0


def _start_log_retention(rt: Runtime) -> None:
    """Purge old events now and every :data:`PURGE_INTERVAL_SECONDS` until ``ORTHANC_STOPPED``."""
    assert rt.config is not None and rt.events is not None
    events, days = rt.events, rt.config.log_retention_days

    def purge() -> bool:
        removed = events.purge(days)
        if removed:
            events.write(Level.INFO, "app", f"purged {removed} event(s) older than {days} day(s) (LogRetentionDays)")
        return False

    rt.log_retention = BackgroundLoop("rtharvest-log-retention", purge, PURGE_INTERVAL_SECONDS)
    rt.log_retention.start()


#: How often the store (index, disk) is checked in the background, so the status route shows a fault
#: even while no job runs.
HEALTH_PROBE_INTERVAL_SECONDS = 10.0


def _start_health_probe(rt: Runtime) -> None:
    """Check the store every :data:`HEALTH_PROBE_INTERVAL_SECONDS`; log each change of its state once."""
    assert rt.health is not None and rt.events is not None
    health, events = rt.health, rt.events
    previous: FaultClass | None = None  # the state last logged

    def probe() -> bool:
        nonlocal previous
        check = health.check_store(max_age=0.0)
        if check.fault != previous:
            if check.fault is not None:
                events.write(Level.ERROR, "health", f"{check.fault.value}: {check.detail}", fault=check.fault.value)
            elif previous is not None:
                events.write(Level.WARNING, "health", f"the store is available again (was {previous.value}); "
                             "held-back jobs resume at their next try", fault=previous.value)
            previous = check.fault
        return False

    rt.health_probe = BackgroundLoop("rtharvest-health", probe, HEALTH_PROBE_INTERVAL_SECONDS)
    rt.health_probe.start()


def _on_started() -> None:
    rt = _runtime
    assert rt is not None
    if rt.config is None or rt.queue is None:
        return
    # Before any worker claims: a SIGKILLed run leaves leases that would otherwise wait LeaseSeconds.
    _reclaim_leases_of_dead_runs(rt)
    from .localstore import InProcessMetadata, OrthancLocalStore
    from .loopback import LoopbackClient, loopback_url

    try:
        rt.versions = sdk.versions()  # Orthanc serves requests now; read once, shown by the status route
    except Exception:
        log.warning("Orthanc's version could not be read at start-up")
    token = sdk.loopback_authorization()
    url = loopback_url(rt.config.ssl, rt.config.http_port)
    # Metadata in process is cheaper, but an in-process call holds the GIL for as long as the index takes:
    # with PostgreSQL, an outage of the database server would freeze every Python thread and route of the
    # plugin (the status route included) for the PostgreSQL plugin's reconnection attempts. Over loopback
    # HTTP the wait releases the GIL and is bounded by the client's timeout.
    in_process = InProcessMetadata(sdk.rest_get, sdk.rest_put) if rt.config.store_index == "SQLite" else None
    store = OrthancLocalStore(LoopbackClient(url, token, timeout=60.0), in_process)
    assert rt.tracker and rt.events and rt.ingest and rt.harvests and rt.health
    probe_client = LoopbackClient(url, token, timeout=PROBE_TIMEOUT_S)
    rt.health.index_probe = lambda: probe_client.get("/statistics")
    rt.harvester = Harvester(
        rt.queue, rt.tracker, rt.events, rt.ingest, store, _build_sources(rt.config, token), rt.harvests.routing,
        workers=rt.config.workers, lease_seconds=rt.config.lease_seconds,
        delete_rejected=rt.config.candidate_policy.value == "delete",
        gate=SourceGate(*source_limits(rt.config)), health=rt.health,
        outage_backoff_max=rt.config.outage_backoff_max,
    )
    rt.ingest.on_enqueue = rt.harvests.on_enqueue = rt.harvester.wake
    if rt.exports is not None:
        rt.exports.start(store.read)
    _start_log_retention(rt)
    _start_health_probe(rt)
    # The reconciliation talks to the store over loopback HTTP and may read many files: not on Orthanc's
    # callback thread. The workers (and the scheduler, which enqueues work for them) start after it.
    rt.reconciliation = Reconciliation()
    startup = rt.startup = BackgroundLoop("rtharvest-startup", lambda: _reconcile_then_start(rt, startup.stop_event),
                                          once=True)
    startup.start()


def _reconcile_then_start(rt: Runtime, stop: threading.Event) -> bool:
    """Reconcile the queue against the store, then start the workers and the scheduler (startup thread)."""
    assert rt.config is not None and rt.harvester is not None and rt.events is not None
    assert rt.reconciliation is not None
    reconcile(rt.harvester, stop, rt.reconciliation)
    if stop.is_set():
        return False  # Orthanc is stopping: _on_stopped joins this thread before stopping what it started
    rt.harvester.start()
    if rt.schedules is not None:
        rt.scheduler = ScheduleRunner(rt.schedules)
        rt.scheduler.start()
    rt.started = True
    rt.events.write(Level.INFO, "app", f"rtharvest {__version__} started with {rt.config.workers} worker(s), "
                   f"store index {rt.config.store_index}")
    return False


def _on_stopped() -> None:
    rt = _runtime
    assert rt is not None
    if rt.startup is not None:
        rt.startup.stop(30)
    if rt.scheduler is not None:
        rt.scheduler.stop()
    if rt.harvester is not None:
        rt.harvester.stop()
    if rt.exports is not None:
        rt.exports.stop()
    if rt.log_retention is not None:
        rt.log_retention.stop(10)
    if rt.health_probe is not None:
        rt.health_probe.stop(PROBE_TIMEOUT_S + 5)
    rt.started = False
    if rt.events is not None:
        rt.events.write(Level.INFO, "app", "rtharvest stopped")
    if rt.log_handler is not None:
        logging.getLogger("rtharvest").removeHandler(rt.log_handler)
        rt.log_handler.close()
    if rt.db is not None:
        rt.db.close()


def source_limits(config: HarvesterConfig) -> tuple[dict[str, SourceLimits], SourceLimits]:
    """Politeness settings per source and for sources without their own section."""
    def limits(s: SourceSettings) -> SourceLimits:
        return SourceLimits(s.max_concurrent, s.quiet_hours, s.time_zone)

    return {name: limits(s) for name, s in config.sources.items()}, limits(config.source_defaults)


def build_runtime(config: HarvesterConfig, orthanc: Mapping[str, Any] | None = None) -> Runtime:
    """Open the database and build every service (no threads, no Orthanc calls: testable outside).

    ``orthanc`` is the whole configuration (for sections other than ``RtHarvest``'s harvest settings,
    such as ``RtHarvest.Export`` and ``DicomWeb.Servers``).
    """
    central_settings = load_central(orthanc or {})  # ConfigError before anything is opened
    os.makedirs(config.database_path.parent, exist_ok=True)
    db = Database(str(config.database_path))
    db.migrate()
    limits, defaults = source_limits(config)
    policy = RetryPolicy(max_attempts=config.max_attempts, base_delay=config.backoff_base,
                         max_delay=max(config.backoff_max, config.backoff_base))
    queue = JobQueue(db, policy, limits, defaults)
    events = EventLog(db)
    tracker = Tracker(db)
    harvests = HarvestService(config, queue, tracker, events)

    def source_of_aet(aet: str) -> str | None:
        return next((m.name for m in config.modalities.values() if m.aet == aet), None)

    ingest = Ingest(db, queue, tracker, events, harvests.routing, source_of_aet,
                    unpack_mim_sessions=config.unpack_mim_sessions)

    try:
        schedules = ScheduleService.from_config(config, db, harvests, queue, events)
    except (ValueError, ScheduleError) as exc:
        db.close()
        raise ConfigError(str(exc)) from None
    router = Router()
    health = HealthMonitor(config.storage_directory, int(config.min_free_storage_mb * 2**20), config.store_index)
    runtime = Runtime(router=router, config=config, db=db, queue=queue, events=events, tracker=tracker,
                      harvests=harvests, ingest=ingest, schedules=schedules, health=health)

    def read_file(orthanc_id: str) -> bytes:
        if runtime.harvester is None:
            raise ApiError(503, "the harvester is still starting; try again in a few seconds")
        check = health.last_store_check()
        if check is not None and check.fault in (FaultClass.STORE_INDEX, FaultClass.LOOPBACK):
            # Answer now rather than after a loopback timeout per object: the store cannot be read.
            raise ApiError(503, f"the manifest reads stored objects and the store is unavailable "
                           f"({check.fault.value}): try again when GET /rtharvest/status shows "
                           "Health.StoreIndex.State Ok")
        return runtime.harvester.store.read(orthanc_id)

    manifest = ManifestService(tracker, queue, read_file)
    harvests.manifest_mismatches = manifest.patient_id_mismatches
    build_routes(router, harvests, queue, events, lambda: status_document(runtime), manifest=manifest)

    def wake_scheduler() -> None:
        if runtime.scheduler is not None:
            runtime.scheduler.wake()

    build_schedule_routes(router, schedules, wake_scheduler)
    explorer_routes.register(router)
    exports = export_routes.build_export_service(orthanc or {}, config, events, manifest, tracker, harvests,
                                                 schedules)
    export_routes.register(router, exports)
    runtime.exports = exports
    if central_settings.enabled:
        def held_store() -> Any:
            if runtime.harvester is None:
                raise ApiError(503, "the archive is still starting; try again in a few seconds")
            return runtime.harvester.store

        central = CentralService(central_settings, db, events, held_store)
        central_routes.register(router, central)
        runtime.central = central
    return runtime


def _error_router(error: str) -> Router:
    router = Router()

    def status(_: HttpRequest) -> HttpResponse:
        assert _runtime is not None
        return HttpResponse.json(status_document(_runtime))

    def unavailable(_: HttpRequest) -> HttpResponse:
        return HttpResponse.error(503, f"harvesting is disabled by a configuration error: {error}")

    router.add("GET", "/rtharvest/status", status)
    explorer_routes.register(router)
    for method, pattern in (("POST", r"/rtharvest/harvests"), ("GET", r"/rtharvest/harvests"),
                            ("GET", r"/rtharvest/jobs"), ("GET", r"/rtharvest/log"),
                            ("GET", r"/rtharvest/schedules"), ("POST", r"/rtharvest/schedules"),
                            ("POST", r"/rtharvest/exports"), ("GET", r"/rtharvest/exports")):
        router.add(method, pattern, unavailable)
    return router


def _orthanc_version() -> str | None:
    """The running Orthanc's version when it is one the start-up checks know about, else None.

    Asked with ``CheckVersionAdvanced``: at initialisation Orthanc refuses ``RestApiGet("/system")`` (it may
    reach the index) and logs "Plugin trying to call the database during its initialization".
    """
    try:
        return next((v for v in sorted(CRASHES_ON_HTTPS) if sdk.orthanc_is(v)), None)
    except Exception:  # the start-up checks then skip what depends on the version
        log.info("Orthanc's version is not available at start-up; version-specific checks skipped")
        return None


#: ``sys.setswitchinterval`` of the plugin's interpreter (see :func:`install`).
GIL_SWITCH_INTERVAL_S = 0.0005


def install() -> Runtime:
    """Register everything with Orthanc. Called once by the PythonScript entry."""
    global _runtime
    # The C-STORE response waits for OnStoredInstance, which needs the GIL: while the ingest thread or a
    # worker runs Python, the callback waits up to the switch interval (5 ms by default) before the
    # interpreter hands the GIL over, once per arrival. 0.5 ms keeps that wait short; measured with
    # benchmarks/harvest_vs_wire.py's clinic, two A/B runs of 4 rounds each: median harvest 4-11 % faster.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    sdk.install_log_handler()
    try:
        recording = RecordingConfiguration(sdk.configuration())
        config = load_checked(recording, sdk.configuration_dir(), _orthanc_version())
        _runtime = build_runtime(config, recording.orthanc)
        # Every section parser has run now: what none of them read is a typo or a stale setting.
        credential = first_run_credential_warning(recording.orthanc)
        _runtime.config = with_warnings(config, recording.unknown_keys() + ([credential] if credential else []))
    except (ConfigError, OSError) as exc:
        # Keep the plugin loaded so /rtharvest/status can tell the operator what to fix.
        error = str(exc)
        log.error("configuration error, harvesting disabled: %s", error)
        _runtime = Runtime(router=_error_router(error), config_error=error)
    else:
        assert _runtime.events is not None and _runtime.ingest is not None
        _runtime.log_handler = EventLogHandler(_runtime.events)
        _runtime.log_handler.setLevel(logging.WARNING)
        logging.getLogger("rtharvest").addHandler(_runtime.log_handler)
        for warning in _runtime.config.warnings:  # named keys, on the page and in Orthanc's log
            log.warning("configuration: %s", warning)
        if config.store_index == "SQLite":
            # Now, before Orthanc opens (or creates) its index, which it does after initialising the plugins:
            # nothing else has the file open (edge/indexstats.py).
            ensure_statistics_logged(index_file(config.index_directory), "at start-up")
        ingest = _runtime.ingest
        sdk.register_on_stored_instance(lambda inst: ingest.on_stored(inst.instance_id, inst.data, inst.remote_aet))
    sdk.extend_explorer(explorer_routes.explorer_extension())
    sdk.register_router(_runtime.router)
    sdk.register_lifecycle(_on_started, _on_stopped)
    return _runtime

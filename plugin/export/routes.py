"""``/rtharvest/exports`` routes and the export service's place in the plugin."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from ..core.manifest import ManifestService
from ..edge.config import HarvesterConfig
from ..harvest.harvests import HarvestService
from ..harvest.schedules import ScheduleService
from ..store.eventlog import EventLog
from ..store.jobqueue import RetryPolicy
from ..store.tracking import Decision, Tracker
from ..web.httpapi import HttpRequest, HttpResponse, Router
from ..web.openapi import Param, RouteDoc
from .service import ExportService
from .settings import load_settings

__all__ = ["build_export_service", "clinical_sources", "register"]

_ID = r"([0-9a-zA-Z_-]{1,64})"


def clinical_sources(config: HarvesterConfig, harvests: HarvestService,
                     schedules: ScheduleService | None) -> Callable[[], dict[str, str]]:
    """Names of the clinical systems the harvester reads, each with why: every source and lookup source of
    a harvest (any state: its database keeps them all) or schedule, and every ``RtHarvest.Sources`` entry."""

    def find() -> dict[str, str]:
        why: dict[str, str] = {}
        for source, lookup, harvest_id in harvests.queue.db.query(
                "SELECT source, json_extract(params, '$.LookupSources'), min(id) FROM harvests GROUP BY 1, 2"):
            why.setdefault(source, f"the Source of harvest {harvest_id}")
            for name in json.loads(lookup) if lookup else []:
                why.setdefault(str(name), f"a lookup source of harvest {harvest_id}")
        for schedule in schedules.all() if schedules is not None else []:
            why.setdefault(schedule.source, f"the Source of schedule {schedule.id}")
            for name in schedule.lookup_sources:
                why.setdefault(name, f"a lookup source of schedule {schedule.id}")
        for name in config.sources:
            why.setdefault(name, "a source configured in RtHarvest.Sources")
        return why

    return find


def build_export_service(orthanc: Mapping[str, Any], config: HarvesterConfig, events: EventLog,
                         manifest: ManifestService, tracker: Tracker, harvests: HarvestService,
                         schedules: ScheduleService | None = None) -> ExportService:
    """The export service over the harvest's manifest and tracker (``ConfigError`` for bad settings)."""
    settings = load_settings(orthanc, config)
    policy = RetryPolicy(max_attempts=config.max_attempts, base_delay=config.backoff_base,
                         max_delay=max(config.backoff_max, config.backoff_base))
    return ExportService(settings, events, manifest.build, lambda h: tracker.objects(h, Decision.KEPT),
                         lambda h: harvests.visible_state(harvests.get(h)), policy=policy,
                         lease_seconds=config.lease_seconds,
                         clinical_sources=clinical_sources(config, harvests, schedules))


def register(router: Router, service: ExportService) -> None:
    """``POST/GET /rtharvest/exports``, ``GET /rtharvest/exports/{id}``, ``POST .../cancel``,
    ``GET .../failed`` and ``GET /rtharvest/destinations`` (names and kinds an export may use)."""

    def create(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.create(request.json_object()))

    def list_exports(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.list_exports(request.query_int("limit", 100, 1, 10_000)))

    def get_export(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.document(request.groups[0]))

    def cancel(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(service.cancel(request.groups[0]))

    def failed(request: HttpRequest) -> HttpResponse:
        service.document(request.groups[0])
        return HttpResponse.json(service.failed_items(request.groups[0], request.query_int("limit", 100, 1, 10_000)))

    def findings(request: HttpRequest) -> HttpResponse:
        service.document(request.groups[0])
        return HttpResponse.json(service.findings(request.groups[0], request.query_int("limit", 100, 1, 10_000),
                                                  request.query_int("offset", 0, 0, 10_000_000)))

    def destinations(_: HttpRequest) -> HttpResponse:
        return HttpResponse.json({"Site": service.settings.site, "Destinations": service.destinations()})

    export_id = Param("id", "export ID", "path")
    limit = Param("limit", "at most this many items (1-10000, default 100)", type="integer")
    unknown = (404, "unknown export")
    router.add("GET", r"/rtharvest/destinations", destinations, RouteDoc(
        "The site name and every destination an export may name, with its kind (dicom, dicomweb, folder), "
        "whether it is marked a research archive, and whether an export may use it (Refused: why not: it is a "
        "source or lookup source of a harvest or schedule)",
        response='{"Site", "Destinations": [{"Name", "Kind", "ResearchArchive", "Allowed", "Refused"?}, ...]}',
        tag="exports"))
    router.add("POST", r"/rtharvest/exports", create, RouteDoc(
        "Start a de-identified export of a harvest's plans (PS3.15 Basic Profile with the options of Profile)",
        body='{"Harvest": ID, "Destination": NAME, "Plans": "Complete" | "All" | {"Status": [...], '
             '"PlanIntent": [...], "PlanUIDs": [...], "PatientIDs": [...]}, "Profile": {"Dates": "shift" | "keep" | '
             '"remove", "Descriptors": "keep" | "clean", "RetainPatientCharacteristics": bool, '
             '"RetainInstitutionIdentity": bool, "MaxShiftDays": int, "Sponsor": str, "Protocol": str, '
             '"OnPhiFound": "clean" | "hold"}, '
             '"Label": str}',
        response='{"ID", "State"}', tag="exports",
        errors=((400, "invalid request body, naming the field (Destination: a clinical source, not a research "
                      "archive)"), (404, "Harvest: unknown harvest"),
                (409, "Harvest: not Completed yet"))))
    router.add("GET", r"/rtharvest/exports", list_exports, RouteDoc(
        "Exports with state and progress, newest first", (limit,), response="[export, ...]", tag="exports"))
    router.add("GET", rf"/rtharvest/exports/{_ID}", get_export, RouteDoc(
        "One export: State (Running, Completed, HeldBack, VerificationFailed, Failed, Paused, Cancelled), "
        "Progress (PlansSelected, InstancesTotal, InstancesSent, InstancesFailed, InstancesPending, InstancesHeld, "
        "InstancesVerified, InstancesResent), PreSendCheck (what the check before sending cleaned or held: "
        "SOPInstanceUID, Attribute, Kind, Action; never the value), Verification, Errors", (export_id,),
        tag="exports", errors=(unknown,)))
    router.add("POST", rf"/rtharvest/exports/{_ID}/cancel", cancel, RouteDoc(
        "Cancel an export", (export_id,), tag="exports",
        errors=(unknown, (409, "not possible in the export's state"))))
    router.add("GET", rf"/rtharvest/exports/{_ID}/failed", failed, RouteDoc(
        "Items of an export that failed, with why", (export_id, limit), response="[item, ...]", tag="exports",
        errors=(unknown,)))
    router.add("GET", rf"/rtharvest/exports/{_ID}/findings", findings, RouteDoc(
        "Every cleaning and hold of the check before sending (de-identified SOPInstanceUID, Attribute, Kind, "
        "Action: cleaned or held; never the value)",
        (export_id, limit, Param("offset", "skip this many (default 0)", type="integer")),
        response='[{"SOPInstanceUID", "Attribute", "Kind", "Action"}, ...]', tag="exports", errors=(unknown,)))

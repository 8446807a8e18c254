"""``/rtharvest/exports`` routes and the export service's place in the plugin."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import HarvesterConfig
from ..eventlog import EventLog
from ..harvests import HarvestService
from ..httpapi import HttpRequest, HttpResponse, Router
from ..jobqueue import RetryPolicy
from ..manifest import ManifestService
from ..tracking import Decision, Tracker
from .service import ExportService
from .settings import load_settings

__all__ = ["build_export_service", "register"]

_ID = r"([0-9a-zA-Z_-]{1,64})"


def build_export_service(orthanc: Mapping[str, Any], config: HarvesterConfig, events: EventLog,
                         manifest: ManifestService, tracker: Tracker, harvests: HarvestService) -> ExportService:
    """The export service over the harvest's manifest and tracker (``ConfigError`` for bad settings)."""
    settings = load_settings(orthanc, config)
    policy = RetryPolicy(max_attempts=config.max_attempts, base_delay=config.backoff_base,
                         max_delay=max(config.backoff_max, config.backoff_base))
    return ExportService(settings, events, manifest.build, lambda h: tracker.objects(h, Decision.KEPT),
                         harvests.get, policy=policy, lease_seconds=config.lease_seconds)


def register(router: Router, service: ExportService) -> None:
    """``POST/GET /rtharvest/exports``, ``GET /rtharvest/exports/{id}``, ``POST .../cancel``,
    ``GET .../failed``."""

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

    router.add("POST", r"/rtharvest/exports", create)
    router.add("GET", r"/rtharvest/exports", list_exports)
    router.add("GET", rf"/rtharvest/exports/{_ID}", get_export)
    router.add("POST", rf"/rtharvest/exports/{_ID}/cancel", cancel)
    router.add("GET", rf"/rtharvest/exports/{_ID}/failed", failed)

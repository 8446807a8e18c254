"""Composition root inside Orthanc: configuration, database, queue, routes, callbacks and workers.

:func:`install` is all the entry script calls. It registers callbacks and routes at import time (the
only moment Orthanc allows it) and defers every thread to ``ORTHANC_STARTED``, stopping and joining them
on ``ORTHANC_STOPPED``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from . import __version__, sdk
from .config import ConfigError, HarvesterConfig, load_config
from .httpapi import HttpRequest, HttpResponse, Router

log = logging.getLogger("rtharvest.app")


@dataclass
class Runtime:
    """What the running plugin holds; created once by :func:`install`."""

    config: HarvesterConfig | None
    config_error: str | None
    router: Router
    started: bool = False


_runtime: Runtime | None = None


def status_document(runtime: Runtime) -> dict[str, Any]:
    """The body of ``GET /rtharvest/status``."""
    versions = sdk.versions()
    doc: dict[str, Any] = {
        "Plugin": "rtharvest",
        "PluginVersion": __version__,
        "OrthancVersion": versions.orthanc,
        "OrthancApiVersion": versions.api,
        "PythonPluginVersion": versions.python_plugin,
        "Started": runtime.started,
    }
    if runtime.config_error:
        doc["ConfigurationError"] = runtime.config_error
    if runtime.config is not None:
        doc["Aet"] = runtime.config.aet
        doc["Sources"] = sorted(runtime.config.modalities)
        if runtime.config.warnings:
            doc["ConfigurationWarnings"] = list(runtime.config.warnings)
    return doc


def _status(request: HttpRequest) -> HttpResponse:
    assert _runtime is not None
    return HttpResponse.json(status_document(_runtime))


def build_router() -> Router:
    """All REST routes of the plugin."""
    router = Router()
    router.add("GET", "/rtharvest/status", _status)
    return router


def _on_started() -> None:
    assert _runtime is not None
    _runtime.started = True
    log.info("rtharvest %s started", __version__)


def _on_stopped() -> None:
    assert _runtime is not None
    _runtime.started = False
    log.info("rtharvest stopped")


def install() -> Runtime:
    """Register everything with Orthanc. Called once by the PythonScript entry."""
    global _runtime
    sdk.install_log_handler()
    config: HarvesterConfig | None = None
    error: str | None = None
    try:
        config = load_config(sdk.configuration(), sdk.configuration_dir())
    except ConfigError as exc:
        # Keep the plugin loaded so /rtharvest/status can tell the operator what to fix.
        error = str(exc)
        log.error("configuration error, harvesting disabled: %s", error)
    router = build_router()
    _runtime = Runtime(config=config, config_error=error, router=router)
    sdk.register_router(router)
    sdk.register_lifecycle(_on_started, _on_stopped)
    return _runtime

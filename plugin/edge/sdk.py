"""The only module that talks to the ``orthanc`` module of Orthanc's Python plugin.

Everything Orthanc-specific sits here behind small typed functions, so every other module imports
without Orthanc. Version facts that shape the design (see docs/platform.md):

* Python plugin 4.0 holds the GIL during every ``orthanc.*`` call and has no ``AllowThreads``: a
  long call (a remote C-FIND, a synchronous move) freezes all Python callbacks, including the
  OnStoredInstance of the very instances it brings in. Long operations therefore go through Orthanc's
  REST API over HTTP on loopback (:func:`loopback_authorization` gives the credential) or pynetdicom,
  from worker threads; the direct ``rest_*`` calls here are for short local look-ups only.
* There is no ``SetMetadata``: metadata is written with ``RestApiPut`` on ``/instances/{id}/metadata`` or
  ``/series/{id}/metadata`` (provenance goes on the series where it is uniform: :mod:`rtharvest.core.provenance`).
* An uncaught exception in a REST callback becomes a bare HTTP 500, so :func:`register_router` answers
  every outcome explicitly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orthanc

from ..store.eventlog import PhiSafeFormatter
from ..web.httpapi import CATCH_ALL, HttpRequest, HttpResponse, Router


class OrthancLogHandler(logging.Handler):
    """Sends Python log records to Orthanc's own log (the one place an operator looks)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                orthanc.LogError(message)
            elif record.levelno >= logging.WARNING:
                orthanc.LogWarning(message)
            else:
                orthanc.LogInfo(message)
        except Exception:  # logging must never take the plugin down
            self.handleError(record)


def install_log_handler(level: int = logging.INFO) -> None:
    """Attach one :class:`OrthancLogHandler` to the ``rtharvest`` logger (idempotent, no basicConfig)."""
    logger = logging.getLogger("rtharvest")
    if not any(isinstance(h, OrthancLogHandler) for h in logger.handlers):
        handler = OrthancLogHandler()
        # Tracebacks keep their frames but not the exception's message, which may quote a dataset.
        handler.setFormatter(PhiSafeFormatter("rtharvest %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def configuration() -> dict[str, Any]:
    """Orthanc's whole configuration as a dict."""
    return dict(json.loads(orthanc.GetConfiguration()))


def configuration_dir() -> Path | None:
    """Folder of the configuration file Orthanc was started with (relative paths resolve there)."""
    try:
        path = orthanc.GetConfigurationPath()
    except Exception:
        return None
    if not path:
        return None
    p = Path(path)
    return p if p.is_dir() else p.parent


def loopback_authorization() -> str:
    """A token granting full REST access, for HTTP calls to this Orthanc from worker threads.

    Using it avoids a dedicated user in ``RegisteredUsers`` (Orthanc ≥ 1.8.1).
    """
    return str(orthanc.GenerateRestApiAuthorizationToken())


def rest_get(uri: str) -> Any:
    """GET on Orthanc's REST API, parsed as JSON. Raises ``LookupError`` for a missing resource."""
    try:
        return json.loads(orthanc.RestApiGet(uri))
    except orthanc.OrthancException as exc:
        raise LookupError(f"GET {uri}: {exc}") from None


def rest_put(uri: str, body: bytes | str) -> None:
    """PUT on Orthanc's REST API (e.g. metadata). Raises ``LookupError`` for a missing resource."""
    try:
        orthanc.RestApiPut(uri, body)
    except orthanc.OrthancException as exc:
        raise LookupError(f"PUT {uri}: {exc}") from None


def rest_delete(uri: str) -> None:
    """DELETE on Orthanc's REST API. Raises ``LookupError`` for a missing resource."""
    try:
        orthanc.RestApiDelete(uri)
    except orthanc.OrthancException as exc:
        raise LookupError(f"DELETE {uri}: {exc}") from None


def lookup_instance(sop_instance_uid: str) -> str | None:
    """Orthanc ID of the stored instance with this SOPInstanceUID, or ``None``."""
    try:
        found = orthanc.LookupInstance(sop_instance_uid)
    except orthanc.OrthancException:
        return None
    return str(found) if found else None


def lookup_series(series_instance_uid: str) -> str | None:
    """Orthanc ID of the stored series with this SeriesInstanceUID, or ``None``."""
    try:
        found = orthanc.LookupSeries(series_instance_uid)
    except orthanc.OrthancException:
        return None
    return str(found) if found else None


@dataclass(frozen=True)
class Versions:
    """What ``/rtharvest/status`` reports about the host."""

    orthanc: str
    api: int
    python_plugin: str


def versions() -> Versions:
    """Orthanc and Python-plugin versions, detected at run time (never assumed)."""
    system = rest_get("/system")
    try:
        plugin = rest_get("/plugins/python").get("Version", "unknown")
    except LookupError:
        plugin = "unknown"
    return Versions(str(system.get("Version", "unknown")), int(system.get("ApiVersion", 0)), str(plugin))


def orthanc_is(version: str) -> bool:
    """Whether the running Orthanc is exactly release ``version`` ("1.10.1"), asked without its database.

    During plugin initialisation Orthanc refuses every call that may reach its index (``RestApiGet`` is one:
    "Plugin trying to call the database during its initialization"); ``CheckVersionAdvanced`` compares the
    core's version string only.
    """
    major, minor, revision = (int(part) for part in version.split("."))
    return bool(orthanc.CheckVersionAdvanced(major, minor, revision)) and not bool(
        orthanc.CheckVersionAdvanced(major, minor, revision + 1))


def _request_from_orthanc(uri: str, request: dict[str, Any]) -> HttpRequest:
    body = request.get("body", b"")
    if isinstance(body, str):
        body = body.encode("utf-8")
    return HttpRequest(
        method=str(request.get("method", "GET")).upper(),
        path=uri,
        groups=tuple(request.get("groups", ()) or ()),
        query={str(k): str(v) for k, v in (request.get("get") or {}).items()},
        headers={str(k).lower(): str(v) for k, v in (request.get("headers") or {}).items()},
        body=body or b"",
    )


def _answer(output: Any, response: HttpResponse) -> None:
    if response.status == 405:
        # Orthanc reserves 405 for this call: it sets the Allow header and sends no body (its HttpOutput
        # refuses a 405 through SendHttpStatus, and clears other headers here).
        output.SendMethodNotAllowed(", ".join(response.allow))
        return
    for name, value in response.headers:
        output.SetHttpHeader(name, value)
    if response.status == 200:
        output.AnswerBuffer(response.body, response.content_type)
    else:
        # SendHttpStatus carries a body for error statuses (the contract's JSON error) but no content type of
        # its own: the header set before it is sent with it. Plugin 4.0 takes (status, str, size-in-bytes)
        # and refuses bytes.
        output.SetHttpHeader("Content-Type", response.content_type)
        output.SendHttpStatus(response.status, response.body.decode("utf-8", "replace"), len(response.body))


def register_router(router: Router) -> None:
    """Register one Orthanc REST callback per route pattern of ``router``, then the catch-all.

    Orthanc hands a request to the first registered pattern that matches its URI, so :data:`CATCH_ALL`
    comes last: any other ``/rtharvest/...`` path reaches :meth:`Router.handle` and answers the API's
    ``{"Error"}`` 404 rather than Orthanc's own error document.
    """

    def make_callback(answer: Callable[[HttpRequest], HttpResponse]) -> Callable[..., None]:
        def callback(output: Any, uri: str, **request: Any) -> None:
            try:
                response = answer(_request_from_orthanc(uri, request))
            except Exception:  # the router already guards handlers; this guards the adapter itself
                logging.getLogger("rtharvest.sdk").exception("REST adapter failed on %s", uri[:200])
                response = HttpResponse.error(500, "internal error in the rtharvest plugin")
            _answer(output, response)

        return callback

    for pattern in router.patterns:
        orthanc.RegisterRestCallback(pattern, make_callback(partial(router.dispatch, pattern)))
    orthanc.RegisterRestCallback(CATCH_ALL, make_callback(router.handle))


@dataclass(frozen=True)
class StoredInstance:
    """What OnStoredInstance knows about an arriving instance."""

    instance_id: str
    remote_aet: str
    origin: str
    data: bytes


_ORIGINS = {
    "DICOM_PROTOCOL": "DicomProtocol",
    "REST_API": "RestApi",
    "PLUGIN": "Plugin",
    "LUA": "Lua",
    "WEB_DAV": "WebDav",
}


def _origin_name(value: Any) -> str:
    for attr, name in _ORIGINS.items():
        if getattr(orthanc.InstanceOrigin, attr, object()) == value:
            return name
    return "Unknown"


def register_on_stored_instance(handler: Callable[[StoredInstance], None]) -> None:
    """Call ``handler`` for every stored instance (duplicates too). Exceptions are logged, not raised."""

    def callback(dicom: Any, instance_id: str) -> None:
        try:
            handler(
                StoredInstance(
                    instance_id=instance_id,
                    remote_aet=str(dicom.GetInstanceRemoteAet() or ""),
                    origin=_origin_name(dicom.GetInstanceOrigin()),
                    data=bytes(dicom.GetInstanceData()),
                )
            )
        except Exception:
            logging.getLogger("rtharvest.sdk").exception("OnStoredInstance handler failed for %s", instance_id)

    orthanc.RegisterOnStoredInstanceCallback(callback)


def register_lifecycle(on_started: Callable[[], None], on_stopped: Callable[[], None]) -> None:
    """Run ``on_started`` once Orthanc serves requests and ``on_stopped`` when it shuts down.

    Plugin 4.0 has no way to subscribe to some change types only: Orthanc calls this for every change
    (each stored instance, each metadata value written), taking the GIL each time. The callback therefore
    compares the type with two values looked up once and returns at once for everything else.
    """
    started, stopped = orthanc.ChangeType.ORTHANC_STARTED, orthanc.ChangeType.ORTHANC_STOPPED

    def callback(change_type: Any, _level: Any, _resource_id: str) -> None:
        if change_type != started and change_type != stopped:
            return
        try:
            if change_type == started:
                on_started()
            else:
                on_stopped()
        except Exception:
            logging.getLogger("rtharvest.sdk").exception("lifecycle handler failed")

    orthanc.RegisterOnChangeCallback(callback)


def extend_explorer(javascript: str) -> None:
    """Add JavaScript to Orthanc Explorer (served at ``/plugins/explorer.js``)."""
    orthanc.ExtendOrthancExplorer(javascript)

"""Exports never reach a clinical system by accident: a destination that is a source or lookup source of a
harvest or schedule (or a configured source) is refused, unless ``RtHarvest.Export.ResearchArchives``
marks it. The services are wired as the plugin wires them (``build_export_service`` over a real harvest
database with a schedule of orthanc.json and a harvest started over the API's service)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rtharvest.core.manifest import ManifestService
from rtharvest.edge.config import load_config
from rtharvest.export.destinations import DestinationError, DicomWebServer
from rtharvest.export.routes import build_export_service, register
from rtharvest.harvest.harvests import HarvestService
from rtharvest.harvest.schedules import ScheduleService
from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog
from rtharvest.store.jobqueue import JobQueue
from rtharvest.store.tracking import Tracker
from rtharvest.web.httpapi import HttpRequest, Router

NIGHTLY = {"Name": "nightly", "Source": "ARIA", "LookupSources": ["ARIA", "MIM"], "At": "01:00",
           "TimeZone": "UTC", "OverlapDays": 2, "From": "20300101"}


WEB = {"SECUREWEB": {"Url": "https://archive.example.org/dicom-web", "Username": "u", "Password": "p"},
       "PLAINWEB": {"Url": "http://10.0.0.5/dicom-web", "Username": "u", "Password": "p"},
       "LOCALWEB": {"Url": "http://127.0.0.1:1/dicom-web", "Username": "u", "Password": "p"},
       "OPENWEB": {"Url": "http://10.0.0.6/dicom-web"}}


def _router(tmp_path: Path, archives: list[str] | None = None,
            plain_http: object = None) -> tuple[Router, HarvestService]:
    export: dict[str, Any] = {"Site": "SITEA", "Secret": "0123456789abcdef0123", "Folders": {
        "FOLDER": str(tmp_path / "exports")}, "DicomWeb": WEB}
    if archives is not None:
        export["ResearchArchives"] = archives
    if plain_http is not None:
        export["AllowCredentialsOverHttp"] = plain_http
    orthanc = {
        "DicomModalities": {name: [name, "127.0.0.1", 11112 + i]
                            for i, name in enumerate(("ARIA", "MIM", "AUX", "CENTRAL", "PACS2"))},
        "RtHarvest": {"DatabasePath": str(tmp_path / "q.sqlite"), "Schedules": [NIGHTLY],
                      "ScheduleNow": "2030-01-04T23:00:00Z", "Sources": {"PACS2": {"MaxConcurrent": 1}},
                      "Export": export},
    }
    config = load_config(orthanc)
    db = Database(str(config.database_path))
    db.migrate()
    queue = JobQueue(db)
    events = EventLog(db)
    tracker = Tracker(db)
    harvests = HarvestService(config, queue, tracker, events)
    schedules = ScheduleService.from_config(config, db, harvests, queue, events)
    manifest = ManifestService(tracker, queue, lambda orthanc_id: b"")
    service = build_export_service(orthanc, config, events, manifest, tracker, harvests, schedules)
    router = Router()
    register(router, service)
    return router, harvests


def _post(router: Router, destination: str) -> tuple[int, dict[str, Any]]:
    answer = router.handle(HttpRequest("POST", "/rtharvest/exports", body=json.dumps(
        {"Harvest": "0123456789abcdef", "Destination": destination}).encode()))
    return answer.status, json.loads(answer.body)


def test_sources_of_harvests_schedules_and_configuration_are_refused(tmp_path: Path) -> None:
    router, harvests = _router(tmp_path)
    harvests.start({"Source": "AUX", "PatientIDs": ["P1"]})
    for name, why in (("ARIA", "the Source of schedule nightly"), ("MIM", "a lookup source of schedule nightly"),
                      ("AUX", "the Source of harvest"), ("PACS2", "a source configured in RtHarvest.Sources")):
        status, body = _post(router, name)
        assert status == 400, (name, body)
        assert body["Error"].startswith(f"Destination: {name} is {why}"), body
        assert "ResearchArchives" in body["Error"]
    # Neither a source nor a lookup source: the request goes on to the harvest (unknown here).
    for name in ("CENTRAL", "FOLDER"):
        status, body = _post(router, name)
        assert status == 404 and body["Error"].startswith("Harvest:"), (name, body)
    listed = json.loads(router.handle(HttpRequest("GET", "/rtharvest/destinations")).body)
    allowed = {d["Name"]: d["Allowed"] for d in listed["Destinations"]}
    assert allowed == {"ARIA": False, "MIM": False, "AUX": False, "PACS2": False, "CENTRAL": True, "FOLDER": True,
                       "SECUREWEB": True, "PLAINWEB": False, "LOCALWEB": False, "OPENWEB": True}
    aria = next(d for d in listed["Destinations"] if d["Name"] == "ARIA")
    assert aria["Refused"].startswith("ARIA is the Source of schedule nightly") and not aria["ResearchArchive"]


def test_a_source_marked_as_research_archive_is_allowed(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, archives=["MIM"])
    status, body = _post(router, "MIM")
    assert status == 404 and body["Error"].startswith("Harvest:"), body
    assert _post(router, "ARIA")[0] == 400
    listed = json.loads(router.handle(HttpRequest("GET", "/rtharvest/destinations")).body)
    mim = next(d for d in listed["Destinations"] if d["Name"] == "MIM")
    assert mim["Allowed"] and mim["ResearchArchive"] and "Refused" not in mim


@pytest.mark.parametrize(("setting", "allowed"), [
    (None, {"SECUREWEB", "OPENWEB"}), ("loopback", {"SECUREWEB", "OPENWEB", "LOCALWEB"}),
    (True, {"SECUREWEB", "OPENWEB", "LOCALWEB", "PLAINWEB"})])
def test_dicomweb_credentials_over_plain_http_are_refused_unless_allowed(tmp_path: Path, setting: object,
                                                                       allowed: set[str]) -> None:
    router, _ = _router(tmp_path, plain_http=setting)
    for name in WEB:
        status, body = _post(router, name)
        if name in allowed:
            assert status == 404 and body["Error"].startswith("Harvest:"), (name, body)
        else:
            assert status == 400 and "Password over plain http://" in body["Error"], (name, body)
            assert "AllowCredentialsOverHttp" in body["Error"] and "'p'" not in body["Error"]


def test_a_dicomweb_client_never_sends_credentials_over_plain_http() -> None:
    """Even built by hand, the client refuses before it connects (the message is the refusal, not a
    connection error of the unroutable address)."""
    server = DicomWebServer("PLAINWEB", "http://192.0.2.1:9/dicom-web", "u", "p", timeout=30)
    with pytest.raises(DestinationError, match="over plain http://"):
        list(server.fetch([("2.25.1", "2.25.2")]))


def test_the_secret_comes_from_the_environment_the_configuration_or_its_own_file(tmp_path: Path) -> None:
    from rtharvest.edge.config import ConfigError
    from rtharvest.export.settings import SECRET_ENV, load_settings

    orthanc: dict[str, Any] = {"DicomModalities": {}, "RtHarvest": {"DatabasePath": str(tmp_path / "q.sqlite"),
                                                                    "Export": {"Secret": "configured-secret-0123"}}}
    config = load_config(orthanc)
    assert load_settings(orthanc, config, {}).secret == b"configured-secret-0123"
    assert load_settings(orthanc, config, {SECRET_ENV: "environment-secret-01"}).secret == b"environment-secret-01"
    with pytest.raises(ConfigError, match=SECRET_ENV) as refused:
        load_settings(orthanc, config, {SECRET_ENV: "short"})
    assert "'short'" not in str(refused.value)
    orthanc["RtHarvest"]["Export"] = {"SecretFile": str(tmp_path / "keys" / "export.secret")}
    settings = load_settings(orthanc, config, {})
    assert settings.secret is None and settings.secret_path == tmp_path / "keys" / "export.secret"
    default = load_settings({"RtHarvest": {"DatabasePath": str(tmp_path / "q.sqlite")}}, config, {})
    assert default.secret_path == tmp_path / "q-exports.secret"

"""A tiny HTTP server with the plugin's real REST routes, for CLI and page tests without Orthanc.

The routes are ``rtharvest.web.rest.build_routes`` on a :class:`~rtharvest.web.httpapi.Router` with the real
queue, event log, tracker and harvest service on a temporary database, plus the page routes of
``rtharvest.web.pages`` and the manifest (``rtharvest.core.manifest.ManifestService``) reading "stored"
files from a dictionary — the same wiring the plugin gets inside Orthanc, minus Orthanc. Optional Basic
authentication mimics Orthanc's (401 with a ``WWW-Authenticate`` challenge).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from rtharvest.core.manifest import ManifestService
from rtharvest.edge.config import load_config
from rtharvest.harvest.harvests import HarvestService
from rtharvest.harvest.schedules import ScheduleService
from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog
from rtharvest.store.jobqueue import JobQueue, RetryPolicy
from rtharvest.store.tracking import FailureCode, Tracker
from rtharvest.web import pages as explorer_routes
from rtharvest.web.httpapi import HttpRequest, HttpResponse, Router
from rtharvest.web.rest import build_routes, build_schedule_routes

SOURCES = {"ARIA": ["ARIA", "127.0.0.1", 11112], "MIM": ["MIM", "127.0.0.1", 11113]}


@dataclass
class ApiServer:
    """The services, the router and the HTTP server (``url`` once started)."""

    root: Path
    auth: tuple[str, str] | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = load_config({"DicomModalities": SOURCES, "StorageDirectory": str(self.root)})
        self.db = Database(str(self.root / "rtharvest.sqlite"))
        self.db.migrate()
        self.queue = JobQueue(self.db, RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0))
        self.events = EventLog(self.db)
        self.tracker = Tracker(self.db)
        self.harvests = HarvestService(self.config, self.queue, self.tracker, self.events)
        self.manifest = ManifestService(self.tracker, self.queue, self.read_file)
        self.router = Router()
        build_routes(self.router, self.harvests, self.queue, self.events, self.status, manifest=self.manifest)
        explorer_routes.register(self.router)
        self.schedules = ScheduleService.from_config(self.config, self.db, self.harvests, self.queue, self.events)
        build_schedule_routes(self.router, self.schedules, lambda: None)
        # The whole-store manifest route proposed to the lead (CONTRACT: "usable for the whole store").
        self.router.add("GET", r"/rtharvest/manifest", self._store_manifest)
        self._lock = threading.Lock()
        self._watches: list[tuple[str, str, threading.Event]] = []
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def answered(self, method: str, path: str) -> threading.Event:
        """An event set once a ``method path`` request (query ignored) has been answered: its response is
        built, so a test can change the state afterwards knowing what the client saw before."""
        event = threading.Event()
        with self._lock:
            self._watches.append((method, path, event))
        return event

    def read_file(self, orthanc_id: str) -> bytes:
        return self.files[orthanc_id]

    def status(self) -> dict[str, Any]:
        counts = self.queue.counts()
        return {"Plugin": "rtharvest", "PluginVersion": "test", "OrthancVersion": "1.10.1", "Started": True,
                "WorkersAlive": 2, "Workers": 2, "Sources": sorted(SOURCES),
                "Queue": {state.value: n for state, n in counts.items()}}

    def _store_manifest(self, request: HttpRequest) -> HttpResponse:
        fmt = (request.query.get("format") or "json").lower()
        return self.manifest(None, "csv" if fmt == "csv" else "json")

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str],
                                                                                               bytes]:
        """One HTTP exchange (authentication, then the router)."""
        parts = urlsplit(target)
        self.requests.append((method, target))
        if self.auth is not None:
            expected = "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            if headers.get("authorization") != expected:
                return 401, {"WWW-Authenticate": 'Basic realm="Orthanc Secure Area"',
                             "Content-Type": "text/plain"}, b""
        request = HttpRequest(method, parts.path, (), dict(parse_qsl(parts.query, keep_blank_values=True)),
                              headers, body)
        with self._lock:
            response = self.router.handle(request)
            for watched_method, watched_path, event in self._watches:
                if watched_method == method and watched_path == parts.path:
                    event.set()
        return response.status, {"Content-Type": response.content_type, **dict(response.headers)}, response.body

    def start(self) -> ApiServer:
        """Serve on a free loopback port in a daemon thread."""
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _run(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, out_headers, payload = api.handle(self.command, self.path, headers, body)
                self.send_response(status)
                for k, v in out_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _run  # noqa: N815 - http.server's naming

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="apiserver",
                         daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop serving and close the database."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.db.close()


def json_body(raw: bytes) -> Any:
    """Parse a JSON answer (tests)."""
    return json.loads(raw.decode("utf-8"))


def fail_job(queue: JobQueue, harvest_id: str, error: str, dimse_status: int | None = None,
             kinds: Callable[[str], bool] = lambda k: True) -> int:
    """Lease the harvest's next job and fail it for good (not retryable); returns its id."""
    job = queue.claim("test-owner", 60)
    assert job is not None and job.harvest_id == harvest_id and kinds(job.kind)
    queue.fail(job.id, "test-owner", error, dimse_status=dimse_status, retryable=False)
    return job.id


def load_harvest(api: ApiServer, root: Path, truth: Any, window_name: str = "all", source: str = "ARIA",
                 label: str = "") -> str:
    """Record a perfect harvest of one ground-truth window: a harvest, its kept objects in the tracker,
    the "stored" files for the manifest, and the not-found retrieves of its dangling references as
    failed jobs (what the harvester leaves behind)."""
    from rtharvest.core.classify import HarvestWindow
    from rtharvest.core.references import extract_from_bytes
    from rtharvest.store.jobqueue import EnqueueItem
    from rtharvest.store.tracking import Decision, ObjectRecord

    w = truth.window(window_name)
    window = HarvestWindow(w.date_from, w.date_to, tuple(w.patient_ids or ()))
    harvest = api.queue.create_harvest(source, label or f"synthetic clinic, window {w.name}",
                                       {"LookupSources": [source], "Window": window.to_dict()})
    with api.db.transaction():
        for uid in w.expected:
            info = truth.objects[uid]
            data = (root / info.path).read_bytes()
            refs = extract_from_bytes(data)
            oid = f"oid-{uid[-20:]}"
            api.files[oid] = data
            role = info.role.upper()
            if refs.record is not None:
                role = "RECORD" if window.includes(refs.patient_id, refs.record.treatment_date) else "PLAN_RECORD"
            api.tracker.record(ObjectRecord(
                harvest_id=harvest.id, sop_uid=uid, orthanc_id=oid, decision=Decision.KEPT, reason="test",
                role=role, hop=role, source=source, job_id=None, moved=True, patient_id=refs.patient_id,
                study_uid=refs.study_uid, series_uid=refs.series_uid, modality=refs.modality,
                sop_class_uid=refs.sop_class_uid, frame_of_reference_uid=refs.frame_of_reference_uid,
                plan_uids=refs.record.plan_uids if refs.record else (),
                treatment_date=refs.record.treatment_date if refs.record else None))
    dangling = sorted({d.uid for d in truth.dangling})
    api.queue.enqueue_many(EnqueueItem(harvest.id, "RetrieveInstance", source,
                                       {"sop_uid": uid, "role": "PLAN", "hop": "RTRECORD->RTPLAN"},
                                       f"RetrieveInstance|{uid}") for uid in dangling)
    for _ in dangling:
        job = api.queue.claim("loader", 60, kinds=["RetrieveInstance"])
        assert job is not None
        api.queue.fail(job.id, "loader", f"RTRECORD->RTPLAN: {job.payload['sop_uid']} not found at {source}",
                       retryable=False)
        api.tracker.note_failure(job.id, FailureCode.NOT_FOUND)  # as the harvester records it
    api.tracker.mark_cleanup(harvest.id)
    return harvest.id

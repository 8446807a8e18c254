"""The ``/rtharvest`` REST routes of CONTRACT.md, on top of the services (no Orthanc calls here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .eventlog import EventLog, Level, parse_since
from .harvests import HarvestService
from .httpapi import ApiError, HttpRequest, HttpResponse, Router
from .jobqueue import HarvestState, Job, JobQueue, JobState, QueueError

_ID = r"([0-9a-zA-Z_-]{1,64})"


def job_document(job: Job) -> dict[str, Any]:
    """A job as ``GET /rtharvest/jobs`` lists it."""
    payload = job.payload
    target = (payload.get("sop_uid") or payload.get("series_uid") or payload.get("for_uid")
              or ",".join(payload.get("criterion", {}).get("uids", [])) or payload.get("patient_id") or "")
    return {
        "ID": job.id,
        "Harvest": job.harvest_id,
        "Kind": job.kind,
        "Hop": payload.get("hop"),
        "Source": job.source,
        "Target": target,
        "State": job.state.value,
        "Attempts": job.attempts,
        "MaxAttempts": job.max_attempts,
        "Crashes": job.crashes,
        "LastError": job.last_error,
        "DimseStatus": None if job.dimse_status is None else f"0x{job.dimse_status:04X}",
        "Note": job.note,
    }


def build_routes(router: Router, harvests: HarvestService, queue: JobQueue, events: EventLog,
                 status: Callable[[], dict[str, Any]],
                 manifest: Callable[[str | None, str], HttpResponse] | None = None) -> None:
    """Register every route of the harvester on ``router``."""

    def get_status(_: HttpRequest) -> HttpResponse:
        return HttpResponse.json(status())

    def start(request: HttpRequest) -> HttpResponse:
        harvest = harvests.start(request.json_object())
        return HttpResponse.json({"ID": harvest.id, "State": harvests.visible_state(harvest)})

    def list_harvests(request: HttpRequest) -> HttpResponse:
        # Paged, newest first: ?limit= (at most 10,000 per page) and ?offset= reach every harvest.
        limit = request.query_int("limit", 100, 1, 10_000)
        offset = request.query_int("offset", 0, 0, 1 << 62)
        state = request.query.get("state") or None
        if state is not None:
            try:
                state = HarvestState.parse(state).value
            except ValueError:
                allowed = ", ".join(s.value for s in HarvestState)
                raise ApiError(400, f"state must be one of {allowed}, got {state[:40]!r}") from None
        found = queue.list_harvests(state=state, limit=limit, offset=offset)
        return HttpResponse.json([harvests.document(h) for h in found])

    def get_harvest(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(harvests.document(harvests.get(request.groups[0])))

    def control(action: str) -> Callable[[HttpRequest], HttpResponse]:
        def handler(request: HttpRequest) -> HttpResponse:
            harvest = harvests.control(request.groups[0], action)
            return HttpResponse.json({"ID": harvest.id, "State": harvests.visible_state(harvest)})
        return handler

    def list_jobs(request: HttpRequest) -> HttpResponse:
        harvest = request.query.get("harvest") or None
        state = request.query.get("state") or None
        if state is not None:
            try:
                state = JobState.parse(state).value
            except ValueError:
                allowed = ", ".join(s.value for s in JobState)
                raise ApiError(400, f"state must be one of {allowed}, got {state[:40]!r}") from None
        if harvest is not None:
            harvests.get(harvest)
        jobs = queue.list_jobs(harvest_id=harvest, state=state, limit=request.query_int("limit", 100, 1, 10_000),
                               offset=request.query_int("offset", 0, 0, 10_000_000))
        return HttpResponse.json([job_document(j) for j in jobs])

    def retry_job(request: HttpRequest) -> HttpResponse:
        try:
            job_id = int(request.groups[0])
        except ValueError:
            raise ApiError(400, f"job id must be a number, got {request.groups[0][:40]!r}") from None
        if not 0 < job_id < 2**63:  # SQLite integers are 64-bit: a larger one cannot even be looked up
            raise ApiError(404, f"unknown job {request.groups[0][:40]}; list jobs with GET /rtharvest/jobs")
        try:
            job = queue.retry(job_id)
        except LookupError:
            raise ApiError(404, f"unknown job {job_id}; list jobs with GET /rtharvest/jobs") from None
        except QueueError as exc:
            raise ApiError(409, str(exc)) from None
        events.write(Level.INFO, "rest", "failed job retried by a user", harvest_id=job.harvest_id, job_id=job.id)
        return HttpResponse.json(job_document(job))

    def get_log(request: HttpRequest) -> HttpResponse:
        harvest = request.query.get("harvest") or None
        level, since = request.query.get("level") or None, request.query.get("since") or None
        try:
            min_level = None if level is None else Level.parse(level)
        except ValueError:
            names = ", ".join(lv.name.lower() for lv in Level)
            raise ApiError(400, f"level must be one of {names}, got {str(level)[:20]!r}") from None
        try:
            since_epoch = None if since is None else parse_since(since)
        except ValueError as exc:
            raise ApiError(400, f"since: {exc}") from None
        try:
            found = events.query(
                min_level=min_level,
                harvest_id=harvest,
                since=since_epoch,
                component=request.query.get("component") or None,
                source=request.query.get("source") or None,
                limit=request.query_int("limit", 100, 1, 10_000),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return HttpResponse.json([e.as_json() for e in found])

    def manifest_of(harvest_id: str | None, request: HttpRequest) -> HttpResponse:
        fmt = (request.query.get("format") or "json").lower()
        if fmt not in ("json", "csv"):
            raise ApiError(400, f"format must be json or csv, got {fmt[:20]!r}")
        if manifest is None:
            raise ApiError(501, "the manifest is not available in this version")
        return manifest(harvest_id, fmt)

    def get_manifest(request: HttpRequest) -> HttpResponse:
        harvests.get(request.groups[0])
        return manifest_of(request.groups[0], request)

    def get_store_manifest(request: HttpRequest) -> HttpResponse:
        return manifest_of(None, request)

    router.add("GET", r"/rtharvest/status", get_status)
    router.add("POST", r"/rtharvest/harvests", start)
    router.add("GET", r"/rtharvest/harvests", list_harvests)
    router.add("GET", rf"/rtharvest/harvests/{_ID}", get_harvest)
    for action in ("pause", "resume", "cancel"):
        router.add("POST", rf"/rtharvest/harvests/{_ID}/{action}", control(action))
    router.add("GET", rf"/rtharvest/harvests/{_ID}/manifest", get_manifest)
    router.add("GET", r"/rtharvest/manifest", get_store_manifest)
    router.add("GET", r"/rtharvest/jobs", list_jobs)
    router.add("POST", r"/rtharvest/jobs/([^/]+)/retry", retry_job)
    router.add("GET", r"/rtharvest/log", get_log)

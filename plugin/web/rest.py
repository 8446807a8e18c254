"""The ``/rtharvest`` REST routes (docs/contract.md), on top of the services (no Orthanc calls here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import __version__
from ..harvest.harvests import HarvestService
from ..harvest.schedules import ScheduleService
from ..store.eventlog import EventLog, Level, parse_since
from ..store.jobqueue import HarvestState, Job, JobQueue, JobState, QueueError
from .httpapi import ApiError, HttpRequest, HttpResponse, Router
from .openapi import Param, RouteDoc, openapi_document

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
        # Where the last failure was (StoreIndex, DiskFull, SourceTimeout...), None after a success.
        "FaultClass": job.fault,
        "DimseStatus": None if job.dimse_status is None else f"0x{job.dimse_status:04X}",
        "Note": job.note,
    }


def _state_query(request: HttpRequest, states: type[HarvestState] | type[JobState]) -> str | None:
    """The ``?state=`` filter as the stored value (any case), or None; 400 naming the allowed ones."""
    state = request.query.get("state") or None
    if state is None:
        return None
    try:
        return states.parse(state).value
    except ValueError:
        allowed = ", ".join(s.value for s in states)
        raise ApiError(400, f"state must be one of {allowed}, got {state[:40]!r}") from None


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
        state = _state_query(request, HarvestState)
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
        state = _state_query(request, JobState)
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

    def get_openapi(_: HttpRequest) -> HttpResponse:
        # Built on request: routes registered after this one (the page, exports, schedules) are included.
        return HttpResponse.json(openapi_document(router.described(), __version__))

    harvest_id = Param("id", "harvest ID (16 hex digits)", "path")
    limit = Param("limit", "at most this many items (1-10000, default 100)", type="integer")
    offset = Param("offset", "skip this many items first (paging)", type="integer")
    unknown_harvest = (404, "unknown harvest")
    router.add("GET", r"/rtharvest/status", get_status, RouteDoc(
        "Plugin, Orthanc and Python-plugin versions, queue counts by state, workers alive, configuration "
        "errors and warnings; per source RecordDiscovery {Method, Unbounded} (how a window's treatment records "
        "are found and what the window does not bound) and SourceActivity {Open, Peak, Operations, Waited, "
        "Finds, Moves} (associations of this harvester, counted against MaxConcurrent); StartupReconciliation "
        "{Done, Checked, PlannedFromStore, Failed, Seconds[, Error]} (objects the queue believed missing, checked "
        "against the store before the workers started, and how many the store held)", tag="status"))
    router.add("GET", r"/rtharvest/openapi.json", get_openapi, RouteDoc(
        "This OpenAPI 3 description of every /rtharvest route", tag="status"))
    router.add("POST", r"/rtharvest/harvests", start, RouteDoc(
        "Start a harvest", body='{"Source": NAME, "LookupSources": [NAME, ...], "From": "YYYYMMDD", "To": '
        '"YYYYMMDD", "PatientIDs": [...], "Label": "..."}: Source plus dates and/or PatientIDs',
        response='{"ID", "State"}', tag="harvests", errors=((400, "invalid request body, naming the field"),)))
    router.add("GET", r"/rtharvest/harvests", list_harvests, RouteDoc(
        "Harvests with state and progress, newest first, paged",
        (limit, offset, Param("state", "Running (Waiting harvests included), Paused, Completed or Cancelled")),
        response="[harvest, ...]",
        tag="harvests", errors=((400, "bad state, limit or offset"),)))
    router.add("GET", rf"/rtharvest/harvests/{_ID}", get_harvest, RouteDoc(
        "One harvest: ID, Source, LookupSources, Label, State, CreatedAt, From, To, PatientIDs, Progress, "
        "Patients, PlansReferenced, PlansCollected, IngestFailures, RecordDiscovery {Method, Unbounded}, "
        "PatientIDMismatches {Count, Reasons} (records a source returned for another PatientID, kept out), "
        "Discarded {Count, ByReason} (answers and arrivals a rule discarded, by reason code)",
        (harvest_id,), tag="harvests",
        errors=(unknown_harvest,)))
    for action in ("pause", "resume", "cancel"):
        router.add("POST", rf"/rtharvest/harvests/{_ID}/{action}", control(action), RouteDoc(
            f"{action.capitalize()} a harvest", (harvest_id,), response='{"ID", "State"}', tag="harvests",
            errors=(unknown_harvest, (409, "not possible in the harvest's state"))))
    manifest_format = Param("format", "json (default) or csv (one row per plan)")
    # The manifest reads stored files through the harvester, which exists once Orthanc has started.
    starting = (503, "the harvester is still starting: try again in a few seconds")
    router.add("GET", rf"/rtharvest/harvests/{_ID}/manifest", get_manifest, RouteDoc(
        "The harvest's manifest: Summary and, per treated plan, Status (Complete, Incomplete, Missing, "
        "Invalid) with every missing link and why, and PatientIDMismatches (objects collected by UID whose "
        "PatientID is not the plan's); Summary.PatientIDMismatches counts those and the records kept out "
        "because their PatientID differs from the one searched; per plan Treatments equals Fractions (distinct "
        "fractions delivered, counted from the records' content), beside FractionsPlanned, Records (delivery "
        "records) and SummaryRecords (RT Treatment Summary Records, never a fraction)", (harvest_id, manifest_format),
        response='{"Harvest", "Summary", "Plans", ...} or CSV', tag="manifest", other_content_types=("text/csv",),
        errors=(unknown_harvest, (400, "bad format"), starting)))
    router.add("GET", r"/rtharvest/manifest", get_store_manifest, RouteDoc(
        "The manifest of the whole store (every harvest merged)", (manifest_format,), tag="manifest",
        response='{"Harvest": null, "Summary", "Plans", ...} or CSV', other_content_types=("text/csv",),
        errors=((400, "bad format"), starting)))
    router.add("GET", r"/rtharvest/jobs", list_jobs, RouteDoc(
        "Jobs with kind, hop, target UID, state, attempts, crashes, last error, DIMSE status, note",
        (Param("harvest", "only this harvest's jobs"), Param("state", "pending, leased, waiting, done, failed "
                                                                     "or cancelled"), limit, offset),
        response="[job, ...]", tag="jobs", errors=((400, "bad state or limit"), unknown_harvest)))
    router.add("POST", r"/rtharvest/jobs/([^/]+)/retry", retry_job, RouteDoc(
        "Give a failed job another round of attempts", (Param("id", "job ID", "path", "integer"),),
        response="job", tag="jobs", errors=((400, "job id is not a number"), (404, "unknown job"),
                                            (409, "the job is not failed"))))
    router.add("GET", r"/rtharvest/log", get_log, RouteDoc(
        "Events, newest first (no patient data: objects are named by harvest, job and UID)",
        (Param("level", "debug, info, warning or error: this level and above"), Param("harvest", "harvest ID"),
         Param("since", "ISO 8601 time or a duration such as 1h"), Param("component", "e.g. ingest, harvester"),
         Param("source", "a DicomModalities name"), limit), response="[event, ...]", tag="log",
        errors=((400, "bad level, since or limit"),)))


def build_schedule_routes(router: Router, schedules: ScheduleService, wake: Callable[[], None]) -> None:
    """``GET/POST /rtharvest/schedules`` and ``GET/DELETE /rtharvest/schedules/{id}``."""

    def list_schedules(_: HttpRequest) -> HttpResponse:
        return HttpResponse.json([schedules.document(s) for s in schedules.all()])

    def create(request: HttpRequest) -> HttpResponse:
        schedule = schedules.create(request.json_object())
        wake()
        return HttpResponse.json(schedules.document(schedule))

    def get_one(request: HttpRequest) -> HttpResponse:
        return HttpResponse.json(schedules.document(schedules.get(request.groups[0])))

    def delete(request: HttpRequest) -> HttpResponse:
        schedules.delete(request.groups[0])
        return HttpResponse.json({"ID": request.groups[0], "Deleted": True})

    schedule_id = Param("id", "schedule ID (its Name)", "path")
    document = ('{"ID", "Name", "Source", "LookupSources", "At", "TimeZone", "OverlapDays", "From", "Label", '
                '"Origin": "config"|"api", "CreatedAt", "CoveredTo", "NextRun", "Waiting", "Warnings", '
                '"Runs": [{"Harvest", "Slot", "From", "To", "State"}, ...]}')
    router.add("GET", r"/rtharvest/schedules", list_schedules, RouteDoc(
        "Recurring incremental harvests (RtHarvest.Schedules and those created over REST) with their runs",
        response=f"[{document}, ...]", tag="schedules"))
    router.add("POST", r"/rtharvest/schedules", create, RouteDoc(
        "Create a schedule: every day at At (TimeZone) it harvests from the end of the last completed window "
        "minus OverlapDays to yesterday; each run is an ordinary harvest",
        body='{"Name": ID, "Source": NAME, "LookupSources": [NAME, ...], "At": "HH:MM", "TimeZone": IANA, '
             '"OverlapDays": 7, "From": "YYYYMMDD", "Label": "..."}: Source, At and TimeZone required',
        response=document, tag="schedules",
        errors=((400, "invalid definition, naming the field"), (409, "a schedule of that Name exists"))))
    router.add("GET", rf"/rtharvest/schedules/{_ID}", get_one, RouteDoc(
        "One schedule with its runs", (schedule_id,), response=document, tag="schedules",
        errors=((404, "unknown schedule"),)))
    router.add("DELETE", rf"/rtharvest/schedules/{_ID}", delete, RouteDoc(
        "Delete a schedule created over REST (its harvests stay)", (schedule_id,), response='{"ID", "Deleted"}',
        tag="schedules", errors=((404, "unknown schedule"),
                                 (409, "defined in orthanc.json: remove it there and restart"))))

"""Workers: claim a job, run its operation against the sources, verify arrival, record the outcome.

A job's operation is turned into C-FIND/C-MOVE steps by :func:`rtharvest.core.strategies.search_steps` for
the source's capability, and run here against a :class:`~rtharvest.dimse.base.SourceBackend`. What a
step would retrieve is first looked up in the local store: what is already stored is never moved again,
it is planned from the local copy instead. Before a move, the worker records which instances it expects
(OnStoredInstance attributes arrivals by that), and after the move it checks that every expected
instance arrived: a "successful" move that delivered nothing (dcmqrscp does that for unknown UIDs) is a
failure, and a partial arrival is retried for what is missing.

Each worker is a plain thread. It never calls ``orthanc.*`` (the GIL trap of plugin 4.0): the local
store is Orthanc's REST API over loopback HTTP, and sources are reached through backends whose waits
release the GIL, so a slow source never stalls the ingestion of instances arriving from another move.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..background import BackgroundLoop
from ..core.operations import (
    FindReferencing,
    FindSeriesInFrameOfReference,
    FindTreatmentRecords,
    Operation,
    RetrieveInstance,
    RetrieveSeries,
    Role,
    UnpackMimSession,
    operation_from_dict,
)
from ..core.planner import ReasonCode, leaves_kept_alone, reason_text
from ..core.provenance import StoredSeries
from ..core.references import extract_from_bytes
from ..core.strategies import DiscardReason, QueryLevel, SourceCapability, execute, unbounded_search
from ..dimse.base import InstanceKey, MoveResult, SourceError
from ..dimse.politeness import SourceGate, SourceUnavailable
from ..edge.loopback import LoopbackError
from ..store.eventlog import EventLog, Level, exception_summary
from ..store.findcache import FindCache, find_key
from ..store.jobqueue import HarvestState, Job, JobQueue, QueueError, SourceLimits
from ..store.tracking import Decision, Expectation, FailureCode, ObjectRecord, Tracker
from .cleanup import HarvestCleanup
from .faults import FaultClass, HealthMonitor, Outage, fault_of_source_error
from .ingest import HarvestRouting, Ingest
from .mimsessions import SessionGone, SessionUnpacker, session_search
from .provenance_writer import ProvenanceWriter

log = logging.getLogger("rtharvest.harvester")

_STUDY, _SERIES, _SOP, _PATIENT = "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"


class LocalStore(Protocol):
    """The harvester's own Orthanc store, as the workers need it."""

    def lookup(self, sop_uid: str) -> str | None:
        """Orthanc ID of the stored instance, or None."""

    def lookup_many(self, sop_uids: Sequence[str]) -> dict[str, str]:
        """SOPInstanceUID → Orthanc ID of those of ``sop_uids`` that are stored (batched index look-ups)."""

    def series_instances(self, series_uid: str) -> dict[str, str]:
        """SOPInstanceUID → Orthanc ID of the stored instances of a series."""

    def read(self, orthanc_id: str) -> bytes:
        """The stored DICOM file."""

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        """All metadata of an instance."""

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        """Write one metadata value."""

    def series_of(self, orthanc_id: str) -> StoredSeries:
        """The series of a stored instance (``LookupError`` when it is gone)."""

    def series_metadata(self, series_id: str) -> dict[str, str]:
        """All metadata of a series (``LookupError`` when it is gone)."""

    def set_series_metadata(self, series_id: str, name: str, value: str) -> None:
        """Write one metadata value of a series."""

    def delete(self, orthanc_id: str) -> None:
        """Remove an instance from the store."""

    def upload(self, data: bytes) -> str:
        """Store a DICOM file (unpacked MIM session objects); its Orthanc ID."""


class _MovedByAnotherJob(Exception):
    """Instances this job needs are being moved by another running job: the job goes back to the queue
    (its attempt not counted) and looks again shortly, instead of holding one of the source's job slots
    while it waits."""

    def __init__(self, count: int) -> None:
        super().__init__(f"waiting: {count} instance(s) are being moved by another job")


class _NotHere(Exception):
    """This source does not hold the target after all: try the next lookup source. ``moved`` and ``local``:
    what the search's other targets brought from this source before the job moves on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.moved = 0
        self.local = 0


class JobFailure(Exception):
    """A job attempt failed; ``retryable`` says whether the queue should try again."""

    def __init__(self, message: str, retryable: bool = True, dimse_status: int | None = None,
                 code: FailureCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.dimse_status = dimse_status
        self.code = code


@dataclass(frozen=True)
class Target:
    """One retrieve a search step asked for, with the instances it should bring."""

    source: str
    level: QueryLevel
    identifier: dict[str, Any]
    candidate: bool


@dataclass(frozen=True)
class _Move:
    """What one target still needs from its source: a whole series, or single instances of a series."""

    target: Target
    level: QueryLevel  # SERIES or IMAGE
    patient: str
    study: str
    series: str
    missing: list[str]


@dataclass(frozen=True)
class SourceAccess:
    """A source as the workers use it: backend, capability and timeouts."""

    name: str
    backend: Any  # dimse.base.SourceBackend
    capability: SourceCapability
    find_timeout: float
    move_timeout: float


@dataclass
class JobOutcome:
    """What one attempt achieved (for the job's note and the log)."""

    moved: int = 0
    local: int = 0
    targets: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    def note(self) -> str:
        """Short human summary stored on the job."""
        took = time.monotonic() - self.started
        return (f"{self.targets} target(s), {self.moved} instance(s) moved, {self.local} already stored, "
                f"{took:.2f} s")


@dataclass
class RoundTrips:
    """The DIMSE operations one job sent, and the C-FINDs answered by earlier searches of its harvest."""

    finds: int = 0
    reused: int = 0
    moves: int = 0

    def note(self) -> str:
        """For the job's note (where a harvest's round trips go: ``GET /rtharvest/jobs``)."""
        return f"{self.finds} C-FIND ({self.reused} more answered by earlier searches), {self.moves} C-MOVE"


class Harvester:
    """Runs jobs on its worker threads; its maintenance loop composes the lease keeper, the
    :class:`ProvenanceWriter` and the :class:`HarvestCleanup`."""

    def __init__(
        self,
        queue: JobQueue,
        tracker: Tracker,
        events: EventLog,
        ingest: Ingest,
        store: LocalStore,
        sources: Mapping[str, SourceAccess],
        routing_of: Callable[[str], HarvestRouting | None],
        *,
        workers: int = 4,
        lease_seconds: float = 900.0,
        delete_rejected: bool = True,
        poll_interval: float = 0.2,
        gate: SourceGate | None = None,
        finds: FindCache | None = None,
        health: HealthMonitor | None = None,
        outage_backoff_max: float = 3600.0,
    ) -> None:
        self.queue = queue
        self.tracker = tracker
        self.events = events
        self.ingest = ingest
        self.store = store
        self.sources = dict(sources)
        self.routing_of = routing_of
        self.worker_count = workers
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.gate = gate or SourceGate({}, SourceLimits(max_concurrent=1_000_000))
        self._stop = threading.Event()
        # Jobs inside a DIMSE operation (job id -> owner, last lease extension), for extend_leases().
        self._in_operation: dict[int, tuple[str, float]] = {}
        self._leases_lock = threading.Lock()
        # Worker loops: woken whenever new jobs are enqueued, so an idle worker starts the next hop at once
        # instead of at its next poll (a chain of ten hops would otherwise wait ten poll intervals).
        self._workers: list[BackgroundLoop] = []
        # Provenance, clean-up, leases: woken when a harvest's last job ends, so its provenance and clean-up
        # run (and it shows Completed) at once rather than at the maintenance loop's next look.
        self._maintenance = BackgroundLoop("rtharvest-maintenance", self._maintenance_pass,
                                           lambda: self.MAINTENANCE_INTERVAL_S)
        self._owner_prefix = f"{socket.gethostname()}:{os.getpid()}"
        self.sessions = SessionUnpacker(store, tracker, ingest, events)
        #: Job ID → instances it moved whose ingest failed and that it planned from the store (for its note).
        self._replanned: dict[int, int] = {}
        #: C-FIND answers of each running harvest, reused by its later jobs (:mod:`rtharvest.store.findcache`).
        self.finds = finds if finds is not None else FindCache()
        #: Job ID → the round trips of its current attempt (for its note).
        self._round_trips: dict[int, RoundTrips] = {}
        #: Job ID → when it first found its instances being moved by another job (monotonic seconds).
        self._waiting_since: dict[int, float] = {}
        #: Drains the provenance outbox when arrivals pause (:mod:`rtharvest.harvest.provenance_writer`).
        self.provenance = ProvenanceWriter(store, tracker, events, lambda: ingest.last_arrival)
        #: Finishes harvests whose jobs have all ended (:mod:`rtharvest.harvest.cleanup`).
        self.cleanup = HarvestCleanup(store, tracker, events, self.finds, delete_rejected=delete_rejected)
        #: The store's and the sources' health: blames failures and holds jobs back during outages.
        self.health = health
        self.outage_backoff_max = outage_backoff_max

    #: How long an idle worker sleeps when no job is pending at all (enqueuing a job wakes it).
    IDLE_WAIT_S = 2.0

    #: How soon a job given back while another job moves its instances is due again.
    RECHECK_IN_FLIGHT_S = 0.25


    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover leases of a previous run and start the worker and maintenance loops."""
        recovered = self.queue.recover_stale_leases()
        if recovered:
            self.events.write(Level.WARNING, "harvester", f"{recovered} job(s) were running when the plugin "
                              "stopped; they are pending again")
        self._stop.clear()
        self._workers = [
            BackgroundLoop(f"rtharvest-worker-{i}", functools.partial(self._work_pass, f"{self._owner_prefix}:w{i}"),
                           self.idle_wait, error_wait=1.0)
            for i in range(self.worker_count)]
        for loop in self._workers:
            loop.start()
        self._maintenance.start()
        self.ingest.start()  # arrivals are decided off the C-STORE path from now on

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every loop to stop and join them (running jobs finish their current DIMSE call)."""
        self._stop.set()  # running jobs see it (source gate waits, in-flight checks)
        loops = [*self._workers, self._maintenance]
        for loop in loops:  # all asked first, so they wind down together
            loop.request_stop()
        deadline = time.monotonic() + timeout
        for loop in loops:
            loop.stop(max(0.1, deadline - time.monotonic()))
        self._workers = [w for w in self._workers if w.alive]
        self.ingest.stop(max(0.1, deadline - time.monotonic()))

    def wake(self) -> None:
        """New work was enqueued: let idle workers look now."""
        for loop in self._workers:
            loop.wake()

    @property
    def alive(self) -> int:
        """Worker threads alive (for the status route)."""
        return sum(1 for loop in self._workers if loop.alive)

    # -- worker loop --------------------------------------------------------------------------------

    def _work_pass(self, owner: str) -> bool:
        """Claim a job and run it; False when none was due (a claim that raises is logged by the loop)."""
        job = self.queue.claim(owner, self.lease_seconds)
        if job is None:
            return False
        self.run(job, owner)
        return True

    def idle_wait(self) -> float:
        """How long a worker that found nothing to claim waits before it looks again (enqueuing wakes it).

        Pending jobs that are not due yet (a retry's backoff, a job waiting for another's move) or whose
        source is saturated: ``poll_interval``. No pending job at all: ``IDLE_WAIT_S``, so an idle harvester
        does not query its queue twenty times a second for months.
        """
        try:
            pending = self.queue.has_pending()
        except Exception:
            pending = True  # the queue will say what is wrong at the next claim
        return self.poll_interval if pending else max(self.poll_interval, self.IDLE_WAIT_S)

    def run(self, job: Job, owner: str) -> None:
        """Run one leased job to completion or failure (never raises)."""
        waiting = False
        try:
            waiting = self._run(job, owner)
        finally:
            self._round_trips.pop(job.id, None)
            if not waiting:
                self._waiting_since.pop(job.id, None)

    def _run(self, job: Job, owner: str) -> bool:
        """Run the job; True when it was given back to wait for another job's move."""
        try:
            if self.health is not None:
                # Every job reads the store; while it is known to be unavailable the job would only hang in
                # a loopback call until its timeout (a minute per job, workers blocked): hold it back now.
                outage = self.health.store_fault()
                if outage is not None:
                    raise outage
            outcome = self._execute(job, owner)
        except _MovedByAnotherJob as exc:
            # Not an attempt: the job is due again shortly and then finds the instances stored (or moves
            # what the other move did not deliver). No note and nothing logged: a job with a last error
            # counts as retried and would ask its C-FINDs again instead of reusing the harvest's answers.
            self.tracker.drop_expectations(job.id)
            log.debug("job %s: %s", job.id, exc)
            try:
                self.queue.release(job.id, owner, not_before=time.time() + self.RECHECK_IN_FLIGHT_S)
            except QueueError:
                return False
            return True
        except Outage as exc:
            self._defer(job, owner, exc)
        except JobFailure as exc:
            fault = FaultClass.SOURCE_FAILURE if exc.retryable else FaultClass.NOT_AVAILABLE
            if not self._held_back(job, owner, exc, None):
                self._fail(job, owner, exc.message, exc.retryable, exc.dimse_status, fault, exc.code)
        except SourceError as exc:
            if not self._held_back(job, owner, exc, exc):
                # Some errors are worth fewer attempts than MaxAttempts (Cxxx "unable to process": retry_limit).
                spent = exc.retry_limit is not None and job.attempts >= exc.retry_limit
                message = f"{exc} (gave up after {job.attempts} attempts)" if exc.retryable and spent else str(exc)
                self._fail(job, owner, message, exc.retryable and not spent, exc.dimse_status,
                           fault_of_source_error(exc))
        except LoopbackError as exc:
            if not self._held_back(job, owner, exc, None):
                # Method, path and status only: Orthanc's message may quote what it was asked about.
                what = "timed out" if exc.timed_out else (f"HTTP {exc.status}" if exc.status else "no connection")
                self._fail(job, owner, f"the harvester's own REST API failed: {exc.method} {exc.path}: {what}",
                           True, None, FaultClass.LOOPBACK)
        except SourceUnavailable as exc:
            # Quiet hours of a source this job must talk to, or the harvest was paused: give the job back
            # without counting the attempt; it runs again when the source may be contacted.
            try:
                self.queue.release(job.id, owner, not_before=exc.until, note=f"waiting: {exc.reason}")
            except QueueError:
                pass
            self.tracker.drop_expectations(job.id)
            if exc.until is not None:
                self.events.write(Level.INFO, "harvester", f"{job.kind} deferred: {exc.reason}",
                                  harvest_id=job.harvest_id, job_id=job.id, source=job.source)
        except QueueError as exc:  # lease lost (e.g. expired while a source hung): someone else runs it
            self.events.write(Level.WARNING, "harvester", f"job lease lost: {exc}", harvest_id=job.harvest_id,
                              job_id=job.id)
        except Exception as exc:  # a bug: fail the attempt visibly rather than kill the worker
            log.exception("job %s failed unexpectedly", job.id)
            # The type only (exception_summary): a bug's message may quote the dataset it choked on; the
            # traceback's frames are in Orthanc's log.
            if not self._held_back(job, owner, exc, None):
                self._fail(job, owner, f"internal error: {exception_summary(exc)}", True, None, FaultClass.INTERNAL)
        else:
            try:
                # One transaction: once the job (and maybe its harvest) is finished, nothing more can
                # arrive in its name.
                note = f"{outcome.note()}; {self._round_trips.pop(job.id, RoundTrips()).note()}"
                if replanned := self._replanned.pop(job.id, 0):
                    note += f"; {replanned} planned from the store after their ingest failed (see the log)"
                with self.tracker.db.transaction():
                    self.tracker.drop_expectations(job.id)
                    self.queue.complete(job.id, owner, note=note)
                if self.queue.get_harvest(job.harvest_id).state == HarvestState.COMPLETED:
                    # Its last job: a job that reopens the harvest later (a retry, a late search) asks again.
                    self.finds.forget(job.harvest_id)
                    self._maintenance.wake()
            except QueueError as exc:
                self.events.write(Level.WARNING, "harvester", f"could not complete job: {exc}",
                                  harvest_id=job.harvest_id, job_id=job.id)
                self.tracker.drop_expectations(job.id)
        return False

    def _held_back(self, job: Job, owner: str, exc: Exception, source_error: SourceError | None) -> bool:
        """Whether the failure ``exc`` is an outage (then the job was deferred without spending its attempt).

        The store is checked first: while Orthanc's index or disk is unavailable, every move "fails at the
        source" (its C-STOREs to the harvester are refused), and lookups over loopback time out. Then a
        source that could not be connected to is checked with a C-ECHO: one that does not answer it is down.
        """
        if self.health is None:
            return False
        # A fresh check (not the one of a few seconds ago): the failure may be the first sign of the outage.
        outage = self.health.store_fault(max_age=1.0)
        if outage is not None:
            self._defer(job, owner, Outage(outage.fault, f"{outage.reason} (the job's own error: "
                                                         f"{_short(exc)})"))
            return True
        if source_error is None:
            return False
        fault = fault_of_source_error(source_error)
        self.health.source_error(source_error.source, fault, str(source_error))
        # Only "no connection" can mean the source is down. A refusal is the source's answer (it is up: our
        # AET unknown, or too busy), and a source that accepts and then never answers is up but stuck: both
        # spend attempts and end as manual-intervention items rather than waiting for ever.
        if fault is not FaultClass.SOURCE_UNREACHABLE:
            return False
        access = self.sources.get(source_error.source)
        if access is None or self._stop.is_set():
            return False
        try:
            access.backend.echo()
        except SourceError as echo_error:
            self.health.source_error(source_error.source, fault, str(source_error), down=True)
            self._defer(job, owner, Outage(fault, f"source {source_error.source} is down (no answer to C-ECHO: "
                                                  f"{echo_error.kind.value}); {source_error}"))
            return True
        except Exception:
            log.exception("C-ECHO of %s failed unexpectedly", source_error.source)
        return False

    def _defer(self, job: Job, owner: str, outage: Outage) -> None:
        """Hold the job back until the outage is likely over (no attempt spent), and say why."""
        self._replanned.pop(job.id, None)
        self._round_trips.pop(job.id, None)
        try:
            with self.tracker.db.transaction():
                self.tracker.drop_expectations(job.id)
                updated = self.queue.defer(job.id, owner, outage.fault.value, f"waiting: {outage}",
                                           self.outage_backoff_max)
        except QueueError as exc:
            self.events.write(Level.WARNING, "harvester", f"could not hold the job back: {exc}",
                              harvest_id=job.harvest_id, job_id=job.id)
            self.tracker.drop_expectations(job.id)
            return
        delay = max(0.0, updated.next_attempt_at - time.time())
        # The first hold of a job is a warning (a fault to look at); later ones of the same outage are INFO.
        level = Level.WARNING if updated.outages == 1 else Level.INFO
        self.events.write(level, "harvester", f"{job.kind} waits {delay:.0f} s for {outage} (attempt not "
                          f"counted; held back {updated.outages} time(s))", harvest_id=job.harvest_id,
                          job_id=job.id, source=job.source, fault=outage.fault.value)

    def _fail(self, job: Job, owner: str, message: str, retryable: bool, status: int | None,
              fault: FaultClass | None = None, code: FailureCode | None = None) -> None:
        self._replanned.pop(job.id, None)
        self._round_trips.pop(job.id, None)
        try:
            with self.tracker.db.transaction():  # as in run(): expectations end with the attempt
                self.tracker.drop_expectations(job.id)
                self.tracker.note_failure(job.id, code)  # what the failure means, for the manifest
                updated = self.queue.fail(job.id, owner, message, dimse_status=status, retryable=retryable,
                                          fault=None if fault is None else fault.value)
        except QueueError as exc:
            self.events.write(Level.WARNING, "harvester", f"could not record failure: {exc}",
                              harvest_id=job.harvest_id, job_id=job.id)
            self.tracker.drop_expectations(job.id)
            return
        # A retry is scheduled: nothing for a person to do yet (INFO). Failed for good: a manual-intervention
        # item (ERROR), shown in the page's warnings.
        if updated.state.value == "failed":
            self._maintenance.wake()  # maybe the harvest's last job: see run()
        level = Level.ERROR if updated.state.value == "failed" else Level.INFO
        what = "failed for good" if updated.state.value == "failed" else f"failed (attempt {updated.attempts})"
        self.events.write(level, "harvester", f"{job.kind} {what}: {message}", harvest_id=job.harvest_id,
                          job_id=job.id, source=job.source, dimse_status=status,
                          fault=None if fault is None else fault.value)

    # -- executing an operation ---------------------------------------------------------------------

    def _execute(self, job: Job, owner: str) -> JobOutcome:
        routing = self.routing_of(job.harvest_id)
        if routing is None:
            raise JobFailure(f"harvest {job.harvest_id} has no routing (deleted?)", retryable=False)
        try:
            op = operation_from_dict(job.payload)
        except (KeyError, ValueError, TypeError) as exc:
            # Payloads carry PatientIDs and dates, which a parsing error may quote: the type only.
            raise JobFailure(f"job payload is not a valid {job.kind} operation: {exception_summary(exc)}",
                             retryable=False) from None
        outcome = JobOutcome()
        if isinstance(op, UnpackMimSession):
            return self._unpack_session(job, op, routing.source_for(op))
        if isinstance(op, RetrieveInstance):
            orthanc_id = self.store.lookup(op.sop_uid)
            if orthanc_id is not None:
                self._plan_local(job, op, routing.source_for(op), {op.sop_uid: orthanc_id}, False)
                outcome.local += 1
                return outcome
        unbounded = unbounded_search(op)
        if unbounded is not None:
            # Reported with the plan (manifest Missing) instead of scanning a whole source by accident.
            raise JobFailure(f"not sent: {unbounded}", retryable=False)
        names = routing.sources_of(op)
        # An object named by UID is taken from the first lookup source that has it. A reverse search
        # (doses or records of a plan, REGs of a FoR, series sharing a FoR) asks every lookup source: a
        # FoR's series are often split between the PACS and the fusion system. What one source delivered
        # is found locally when the next source offers it too, so nothing moves twice.
        search_all = isinstance(op, (FindReferencing, FindSeriesInFrameOfReference))
        errors: list[SourceError] = []
        found_any = False
        for name in names:
            access = self.sources.get(name)
            if access is None:
                raise JobFailure(f"source {name!r} is not configured (DicomModalities)", retryable=False)
            try:
                targets = self._search(job, owner, op, access)
                if not targets:
                    continue
                outcome.targets += len(targets)
                moved, local = self._fetch(job, owner, op, targets)
                outcome.moved += moved
                outcome.local += local
                found_any = True
                if not search_all:
                    return outcome
            except _NotHere as exc:
                outcome.moved += exc.moved
                outcome.local += exc.local
                continue
            except SourceError as exc:
                # Another lookup source may still have it; report this one only if none answers.
                errors.append(exc)
                continue
        if errors:
            # A search that reached only some sources must run again, or it would miss what the others hold.
            raise errors[0]
        if found_any:
            return outcome
        if session_search(op, self.ingest.unpack_mim_sessions) is not None:
            assert isinstance(op, RetrieveInstance)
            if self._from_sessions(job, owner, op, names, outcome):
                return outcome
        if isinstance(op, (RetrieveInstance, RetrieveSeries)):
            uid = op.sop_uid if isinstance(op, RetrieveInstance) else op.series_uid
            raise JobFailure(f"{op.hop}: {uid} not found at {', '.join(names)}", retryable=False,
                             code=FailureCode.NOT_FOUND)
        return outcome  # a search that finds nothing is a valid, final answer

    def _from_sessions(self, job: Job, owner: str, op: RetrieveInstance, names: Sequence[str],
                       outcome: JobOutcome) -> bool:
        """An RTSTRUCT/REG no source holds as an object may sit inside a MIM session: retrieve the patient's
        sessions as candidates for ``op`` (their unpacking judges the embedded objects against it)."""
        search = session_search(op, True)
        assert search is not None
        for name in names:
            access = self.sources[name]
            targets = self._search(job, owner, search, access)
            moved, local = self._fetch(job, owner, op, targets)
            outcome.targets += len(targets)
            outcome.moved += moved
            outcome.local += local
        return outcome.targets > 0

    def _unpack_session(self, job: Job, op: UnpackMimSession, source: str) -> JobOutcome:
        """A MIM session stored here: unpack it and plan what it carries (:mod:`rtharvest.harvest.mimsessions`)."""
        try:
            done = self.sessions.run(job, op, source)
        except SessionGone as exc:
            raise JobFailure(str(exc), retryable=False) from None
        return JobOutcome(moved=done.stored, local=done.local, targets=done.objects)

    def _search(self, job: Job, owner: str, op: Operation, access: SourceAccess) -> list[Target]:
        targets: list[Target] = []

        def find(level: QueryLevel, identifier: dict[str, Any]) -> list[Mapping[str, Any]]:
            local = self._local_frame_of_reference(job, access.name, level, identifier)
            if local is not None:
                return local
            return self._find(job, owner, access, level, identifier)

        def retrieve(level: QueryLevel, identifier: dict[str, Any], candidate: bool) -> None:
            targets.append(Target(access.name, level, dict(identifier), candidate))

        discarded: Counter[DiscardReason] = Counter()
        execute(op, access.capability, find, retrieve, discarded)
        if discarded:
            # Counted whatever happens next: a rule discarded them, and nothing a rule drops goes uncounted.
            with self.tracker.db.transaction():
                self.tracker.add_discards(job.harvest_id, {r.value: n for r, n in discarded.items()})
        return targets

    # -- every DIMSE operation goes through here: politeness, pause, lease ----------------------------

    @contextlib.contextmanager
    def _contact(self, job: Job, owner: str, source: str, kind: str) -> Iterator[None]:
        """Around one C-FIND or C-MOVE to ``source``: the harvest must still be running, the operation
        counts against the source's MaxConcurrent and QuietHours, and the job's lease is extended while
        the operation runs (a move may outlast the lease it started with)."""
        state = self.queue.get_harvest(job.harvest_id).state
        if state != HarvestState.RUNNING:
            raise SourceUnavailable(f"harvest {state.value.lower()}")

        def heartbeat() -> None:
            self.queue.heartbeat(job.id, owner, self.lease_seconds)

        with self.gate.slot(source, waiting=heartbeat, stop=self._stop, kind=kind):
            heartbeat()
            with self._leases_lock:
                self._in_operation[job.id] = (owner, time.monotonic())
            try:
                yield
            finally:
                with self._leases_lock:
                    self._in_operation.pop(job.id, None)
        if self.health is not None:
            self.health.source_ok(source)

    def extend_leases(self) -> None:
        """Extend the lease of every job whose DIMSE operation has run for a third of LeaseSeconds.

        A C-MOVE of a large series may outlast the lease it started with; without this another worker
        would take the job over and move the same series again while the first move still runs.
        """
        now = time.monotonic()
        interval = max(1.0, self.lease_seconds / 3)
        with self._leases_lock:
            due = [(job_id, owner) for job_id, (owner, since) in self._in_operation.items() if now - since >= interval]
            for job_id, owner in due:
                self._in_operation[job_id] = (owner, now)
        for job_id, owner in due:
            try:
                self.queue.heartbeat(job_id, owner, self.lease_seconds)
            except QueueError:
                pass  # lost already; the worker finds out when it completes
            except Exception:
                log.exception("extending the lease of job %s failed", job_id)

    def _find(self, job: Job, owner: str, access: SourceAccess, level: QueryLevel,
              identifier: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """One C-FIND, unless this harvest already asked this source the same question (then its answer)."""
        trips = self._round_trips.setdefault(job.id, RoundTrips())

        def ask() -> list[Mapping[str, Any]]:
            with self._contact(job, owner, access.name, "find"):
                trips.finds += 1
                return list(access.backend.find(level, identifier, timeout=access.find_timeout))

        retried = job.attempts > 1 or job.last_error is not None
        answers, reused = self.finds.answers(find_key(job.harvest_id, access.name, level, identifier), ask,
                                             fresh=retried,
                                             waiting=lambda: self.queue.heartbeat(job.id, owner, self.lease_seconds))
        trips.reused += reused
        if "FrameOfReferenceUID" in identifier and not identifier["FrameOfReferenceUID"]:
            self.finds.note_frames_of_reference(job.harvest_id, access.name, answers)
        return answers

    def _move(self, job: Job, owner: str, access: SourceAccess, level: QueryLevel, **kwargs: Any) -> MoveResult:
        return self._counted_move(job, owner, access, 1,
                                  lambda: access.backend.move(level, timeout=access.move_timeout, **kwargs))

    def _move_instances(self, job: Job, owner: str, access: SourceAccess,
                        instances: Sequence[InstanceKey]) -> MoveResult:
        # One C-MOVE request per instance (one association): counted as the source counts them.
        return self._counted_move(job, owner, access, len(instances),
                                  lambda: access.backend.move_instances(instances, timeout=access.move_timeout))

    def _counted_move(self, job: Job, owner: str, access: SourceAccess, requests: int,
                      move: Callable[[], MoveResult]) -> MoveResult:
        """Run ``move`` through the source's gate, counting its ``requests`` C-MOVE requests for the job."""
        self._round_trips.setdefault(job.id, RoundTrips()).moves += requests
        with self._contact(job, owner, access.name, "move"):
            return move()

    def _local_frame_of_reference(self, job: Job, source: str, level: QueryLevel,
                                  identifier: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
        """Answer "the FrameOfReferenceUID of series S" without asking, when it is known: S is stored here,
        or an earlier answer of this harvest from this source showed S with its FoR (a series-level answer
        of a source that fills FoR there).

        FoR is an image-level attribute, so a source answers it by listing every image of the series (and
        Orthanc reads each file to do so); every image of a series shares one FoR (PS3.3 C.7.4.1.1.1).
        """
        series = identifier.get(_SERIES)
        if level != QueryLevel.IMAGE or identifier.get("FrameOfReferenceUID") != "" or not series:
            return None
        known = self.tracker.series_frame_of_reference(str(series))
        if known is None:
            answered = self.finds.frame_of_reference(job.harvest_id, source, str(series))
            if answered is None:
                return None
            known = ("", answered)  # no SOP UID: the step after a FoR answer moves the whole series
        sop_uid, for_uid = known
        return [{_STUDY: identifier.get(_STUDY, ""), _SERIES: series, _SOP: sop_uid, "FrameOfReferenceUID": for_uid}]

    def _fetch(self, job: Job, owner: str, op: Operation, targets: Sequence[Target]) -> tuple[int, int]:
        """Bring the targets of one search in (or plan them from local copies); returns (moved, already local).

        Every target is looked at first (local copies planned, expectations recorded), then moved: the
        single instances of several series (a patient's treatment records, a plan's doses) in one
        :meth:`~rtharvest.dimse.base.SourceBackend.move_instances` call, so on one association instead of
        one association per instance (at 10 ms each way an association's set-up and release cost ~60 ms),
        whole series one move each. Each target's arrivals are then verified as before.
        """
        moves: list[_Move] = []
        local = 0
        not_here: _NotHere | None = None
        seen: set[tuple[str, str, str]] = set()
        for target in targets:
            key = (target.source, target.level.value,
                   str(target.identifier.get(_SOP) or target.identifier.get(_SERIES) or ""))
            if key in seen:  # an answer listed twice: one move
                continue
            seen.add(key)
            try:
                move, here = self._prepare(job, owner, op, target)
            except _NotHere as exc:
                # The other targets still move from here; the job then asks the next source for this one.
                not_here = not_here or exc
                continue
            local += here
            if move is not None:
                moves.append(move)
        if moves:
            self.queue.heartbeat(job.id, owner, self.lease_seconds)
            singles: dict[str, list[_Move]] = {}  # per source (one search's targets share one)
            for m in moves:
                if m.level is QueryLevel.IMAGE:
                    singles.setdefault(m.target.source, []).append(m)
            batches = [*singles.values(), *([m] for m in moves if m.level is not QueryLevel.IMAGE)]
            for batch in batches:
                self._move_and_verify(job, owner, op, batch)
        moved = sum(len(m.missing) for m in moves)
        if not_here is not None:
            not_here.moved, not_here.local = moved, local
            raise not_here
        return moved, local

    def _prepare(self, job: Job, owner: str, op: Operation, target: Target) -> tuple[_Move | None, int]:
        """Look one target up: plan what is stored, record the expectations of what must move; returns what
        to move (None: nothing) and how many instances were found locally."""
        access = self.sources[target.source]
        whole_series = target.level == QueryLevel.SERIES
        ident = target.identifier
        study, series = str(ident.get(_STUDY) or ""), str(ident.get(_SERIES) or "")
        if target.level == QueryLevel.IMAGE:
            sop = str(ident.get(_SOP) or "")
            if not sop:
                raise JobFailure(f"{op.hop}: the source answered without SOPInstanceUID", retryable=False)
            wanted = [sop]
            if leaves_kept_alone(op) and self.tracker.has_kept(job.harvest_id, sop):
                # Already kept by this harvest, and this search could add nothing to it (a plan's record
                # search offering the records the window's search kept): no look-up, read or re-plan.
                return None, 1
            existing = {sop: oid} if (oid := self.store.lookup(sop)) else {}
            if not existing and _fetches_its_series(op) and study and series:
                # The image a contour (or a REG) names is wanted for its series, which the planner asks for
                # as soon as it arrives. Bringing the series now takes one C-MOVE instead of this one plus
                # an instance-level C-MOVE per remaining slice later. The other slices arrive as candidates
                # of this request: the series request then claims them from the store, and if it never
                # comes (the image is not CT/MR/PT) the end-of-harvest cleanup removes them.
                listing = self._find(job, owner, access, QueryLevel.IMAGE,
                                     {_STUDY: study, _SERIES: series, _SOP: ""})
                others = sorted({str(a.get(_SOP)) for a in listing if a.get(_SOP)} - {sop})
                stored = self.store.series_instances(series) if others else {}
                if others and not stored:
                    wanted, whole_series = [sop, *others], True
        else:
            if not series:
                raise JobFailure(f"{op.hop}: the source answered without SeriesInstanceUID", retryable=False)
            listing = self._find(job, owner, access, QueryLevel.IMAGE, {_STUDY: study, _SERIES: series, _SOP: ""})
            wanted = sorted({str(a.get(_SOP)) for a in listing if a.get(_SOP)})
            if not wanted:
                raise _NotHere(f"series {series} lists no instances at {target.source}")
            existing = {uid: oid for uid, oid in self.store.series_instances(series).items() if uid in wanted}
        missing = [uid for uid in wanted if uid not in existing]
        if missing:
            arrived_meanwhile = self._check_in_flight(job, missing, series, access.move_timeout)
            if arrived_meanwhile:
                existing.update(arrived_meanwhile)
                missing = [uid for uid in missing if uid not in arrived_meanwhile]
        if existing:
            self._plan_local(job, op, target.source, existing, target.candidate)
        if target.candidate and missing:
            known = self.tracker.known_rejections(op.dedupe_key(), missing)
            for uid, reason in known.items():
                with self.tracker.db.transaction():
                    self.tracker.record(ObjectRecord(job.harvest_id, uid, None, Decision.REJECTED,
                                                     reason_text(ReasonCode.INSPECTED_BEFORE, reason=reason),
                                                     op.role.value, op.hop, target.source, job.id, moved=False,
                                                     reason_code=ReasonCode.INSPECTED_BEFORE.value))
            missing = [uid for uid in missing if uid not in known]
        if not missing:
            return None, len(existing)
        named = str(ident.get(_SOP) or "")
        expectations = {
            uid: Expectation(job.harvest_id, uid, job.id, target.source, op.role.value, op.hop,
                             target.candidate or (target.level == QueryLevel.IMAGE and uid != named), op.to_dict())
            for uid in missing
        }
        busy = self.tracker.expect_unless_in_flight(list(expectations.values()), job.id)
        if busy:
            # Another job started moving some of them between our look and our claim: wait for its move,
            # plan what arrived, and claim the rest (its move ended without them).
            meanwhile = self._check_in_flight(job, sorted(busy), series, access.move_timeout)
            if meanwhile:
                self._plan_local(job, op, target.source, meanwhile, target.candidate)
                existing.update(meanwhile)
                missing = [uid for uid in missing if uid not in meanwhile]
            self.tracker.expect(expectations[uid] for uid in missing if uid in busy)
            if not missing:
                return None, len(existing)
        patient = str(ident.get(_PATIENT) or "") or _patient_of(op)
        # Only what is missing moves: instance-level C-MOVEs when part of the series is stored.
        level = QueryLevel.SERIES if whole_series and len(missing) == len(wanted) else QueryLevel.IMAGE
        return _Move(target, level, patient, study, series, missing), len(existing)

    def _move_and_verify(self, job: Job, owner: str, op: Operation, batch: Sequence[_Move]) -> None:
        """One move call for ``batch`` (one series, or single instances of any series), then every expected
        instance must have arrived and been decided."""
        access = self.sources[batch[0].target.source]
        if self.health is not None:
            # No move starts into a store that cannot keep it (index down, disk full): nothing would be lost
            # (the source keeps its copy) but the attempt would be spent and the source blamed.
            outage = self.health.store_fault()
            if outage is not None:
                raise outage
        results: list[MoveResult] = []
        warning: SourceError | None = None
        try:
            if batch[0].level is QueryLevel.SERIES:
                only = batch[0]
                results.append(self._move(job, owner, access, QueryLevel.SERIES, patient_id=only.patient,
                                          study_uid=only.study, series_uid=only.series))
            else:
                results.append(self._move_instances(job, owner, access, [
                    InstanceKey(m.study, m.series, uid) for m in batch for uid in m.missing]))
        except SourceError as exc:
            # A warning (0xB000: some sub-operations failed) still delivered the rest: what arrived is checked
            # below, and what did not is retried, so only that part moves again.
            if exc.dimse_status is None or not 0xB000 <= exc.dimse_status <= 0xBFFF:
                raise
            warning = exc
        still: list[str] = []
        for move in batch:
            arrived = self._settle_arrivals(job, op, move.target, move.missing)
            still += [uid for uid in move.missing if uid not in arrived]
        if still:
            expected = sum(len(m.missing) for m in batch)
            failed = sum(max(r.failed, 0) for r in results)
            status = next((r.status for r in results if r.status), None)
            if warning is not None:
                status = warning.dimse_status
            raise JobFailure(
                f"{op.hop}: {len(still)} of {expected} instance(s) did not arrive from {access.name}"
                f" (source reported {failed} failed sub-operation(s)); first missing {still[0]}",
                retryable=True, dimse_status=status,
            )

    def _check_in_flight(self, job: Job, missing: Sequence[str], series: str,
                         limit: float) -> dict[str, str]:
        """Instances another running job is moving (e.g. the series a contour image brought): those that
        arrived already (SOP UID → Orthanc ID). Moving them again would only send duplicates, so while
        some are still on their way the job is given back to the queue (:class:`_MovedByAnotherJob`)
        rather than holding one of the source's job slots idle; after ``limit`` seconds of that (the
        other move hangs) the job stops waiting and moves what is still missing itself."""
        # Who is still moving is read *before* the store: a job that ended before this read had stored all
        # it delivered, so the store read below sees it (read the other way round, a move ending between
        # the two reads would leave its last instances looking missing, and they would move twice).
        busy = self.tracker.in_flight(missing, job.id)
        if not busy:
            return {}
        # One index query for the whole series rather than one look-up per slice.
        stored = self.store.series_instances(series) if series else {
            uid: oid for uid in busy if (oid := self.store.lookup(uid)) is not None}
        arrived = {uid: stored[uid] for uid in busy if uid in stored}
        still = busy.difference(arrived)
        if still and not self._stop.is_set():
            since = self._waiting_since.setdefault(job.id, time.monotonic())
            if time.monotonic() - since < limit:
                raise _MovedByAnotherJob(len(still))
        return arrived

    def _settle_arrivals(self, job: Job, op: Operation, target: Target, uids: Sequence[str]) -> set[str]:
        """Which of ``uids`` arrived; every one that did has a decision of this harvest when this returns.

        OnStoredInstance runs before the C-STORE response, so once the move returned every delivered
        instance is in the store and was seen by ingest, whose thread decides it: ``settle`` waits for that.
        One stored without a decision means ingest failed for it (a busy database, a bug) or could not
        parse it: it is planned from the store now, so the chain goes on; if that fails too, the job fails
        with the reason instead of completing silently.
        """
        self.ingest.settle(self.sources[target.source].move_timeout)
        decided = {uid for uid in uids if self.tracker.has_object(job.harvest_id, uid)}
        undecided = {uid: oid for uid in uids if uid not in decided and (oid := self.store.lookup(uid)) is not None}
        if not undecided:
            return decided
        first = next(iter(undecided))
        self.events.write(Level.WARNING, "harvester", f"{op.hop}: {len(undecided)} stored instance(s) had no "
                          "decision after the move (ingest failed); planning them from the store",
                          harvest_id=job.harvest_id, job_id=job.id, sop_uid=first, source=target.source)
        try:
            self._plan_local(job, op, target.source, undecided, target.candidate, moved=True, shared=False)
        except JobFailure as exc:
            raise JobFailure(f"ingest failed for {len(undecided)} stored instance(s) after the move; "
                             f"{exc.message}", retryable=True) from None
        self._replanned[job.id] = self._replanned.get(job.id, 0) + len(undecided)
        unplanned = [uid for uid in undecided if not self.tracker.has_object(job.harvest_id, uid)]
        if unplanned:
            raise JobFailure(f"{op.hop}: {len(unplanned)} stored instance(s) have no decision after planning "
                             f"them from the store (first {unplanned[0]})", retryable=True)
        return decided | set(undecided)

    def _plan_local(self, job: Job, op: Operation, source: str, existing: Mapping[str, str],
                    candidate: bool, *, moved: bool = False, shared: bool = True) -> None:
        """Plan from stored copies, as if they had just arrived (nothing moves unless ``moved``: they were
        moved by this job and only their planning failed on arrival).

        ``shared``: the copies are images of one series found locally, which share every series-level
        fact the planner uses, so only the first is read. Otherwise each one is read (arrivals whose
        ingest failed may be anything, unreadable ones included).
        """
        copies = [(Expectation(job.harvest_id, uid, job.id, source, op.role.value, op.hop, candidate, op.to_dict()),
                   oid) for uid, oid in existing.items()]
        self.plan_stored(copies, moved=moved, shared=shared)

    def plan_stored(self, copies: Sequence[tuple[Expectation, str]], *, moved: bool, shared: bool = False) -> int:
        """Plan stored copies (``(expectation, Orthanc ID)``) for their expectations, as if they had just
        arrived; returns how many were planned.

        The one place where the store stands in for a move: a worker's look-up before moving, an ingest
        that failed on arrival, and the start-up reconciliation (:mod:`rtharvest.harvest.reconcile`) all come
        here. ``shared`` as in :meth:`_plan_local`. Raises :class:`JobFailure` naming the instance when
        one cannot be planned.
        """
        # Every stored copy is judged under its expectation's operation, also one the harvest already decided
        # on: a copy rejected for another rule (a candidate) may be exactly what this rule wants, and one kept
        # under another role still brings this role's hops (a CT that is one plan's planning series and
        # another plan's registered series asks for the REGs of its FoR only as a planning series). The
        # decision of a kept copy does not change (see ``Tracker.record``). For a series, the hops are the
        # series' (planned once per series and operation), so one copy already kept stands for the others.
        todo = list(copies)
        if shared:
            kept = [i for i, (exp, _) in enumerate(copies) if self.tracker.has_kept(exp.harvest_id, exp.sop_uid)]
            skip = set(kept[1:])
            todo = [copy for i, copy in enumerate(copies) if i not in skip]
        refs = None
        for exp, oid in todo:
            if refs is None or not shared:
                refs = extract_from_bytes(self.store.read(oid))
            try:
                # The SOP UID is the store's (an unreadable copy yields none, and it must still get a decision).
                self.ingest.process(dataclasses.replace(refs, sop_uid=exp.sop_uid), oid, [exp], moved=moved)
            except Exception as exc:
                log.exception("planning stored instance %s for job %s failed", exp.sop_uid, exp.job_id)
                raise JobFailure(f"{exp.hop}: planning stored instance {exp.sop_uid} from the store failed: "
                                 f"{exception_summary(exc)}", retryable=True) from None
        return len(todo)

    def local_expectation(self, job: Job) -> Expectation | None:
        """A retrieve of one named instance (``RetrieveInstance``) as the expectation a worker plans it with
        when the store holds it (see :meth:`_execute`); None for other jobs or a harvest without routing."""
        routing = self.routing_of(job.harvest_id)
        if routing is None or job.kind != RetrieveInstance.kind.value:
            return None
        try:
            op = operation_from_dict(job.payload)
        except (KeyError, ValueError, TypeError):
            return None  # the worker fails it with the reason
        if not isinstance(op, RetrieveInstance):
            return None
        return Expectation(job.harvest_id, op.sop_uid, job.id, routing.source_for(op), op.role.value, op.hop,
                           False, op.to_dict())

    # -- maintenance: provenance, end-of-harvest cleanup --------------------------------------------

    #: How often the maintenance thread looks for provenance to write and harvests to finish when idle.
    MAINTENANCE_INTERVAL_S = 0.25

    def _maintenance_pass(self) -> bool:
        """Keep leases, write provenance when due, finish harvests, report; True if there was more to do."""
        self.extend_leases()
        finishing = self.tracker.harvests_to_clean()
        busy = self.provenance.write() if self.provenance.due(bool(finishing)) else False
        self.cleanup.finish(finishing)
        self.ingest.report_unsolicited()
        self.cleanup.purge_ended_expectations()
        return busy


def _short(exc: Exception) -> str:
    """What failed, without a message that may quote a dataset (source errors are PHI-free by design)."""
    if isinstance(exc, (SourceError, JobFailure)):
        return str(exc)
    if isinstance(exc, LoopbackError):
        return f"{exc.method} {exc.path}: " + ("timed out" if exc.timed_out else f"HTTP {exc.status}")
    return exception_summary(exc)


def _fetches_its_series(op: Operation) -> bool:
    return isinstance(op, RetrieveInstance) and op.role in (Role.PLANNING_IMAGE, Role.REGISTERED_IMAGE)


def _patient_of(op: Operation) -> str:
    if isinstance(op, FindTreatmentRecords):
        return op.patient_id or ""
    if isinstance(op, (RetrieveInstance, RetrieveSeries, FindReferencing, FindSeriesInFrameOfReference)):
        return op.patient_id or ""
    return ""

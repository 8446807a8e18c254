"""The OnStoredInstance path: attribute an arriving object, let the planner decide, enqueue the next hops.

Orthanc sends the C-STORE response only after OnStoredInstance returns, and plugin 4.0 holds the GIL for
the whole callback, so :meth:`Ingest.on_stored` does as little as it can there: it reads the dataset's
SOPInstanceUID (the file meta and a few elements, never the whole header) and makes one indexed look-up
of who expects the instance. Everything else runs on the ingest thread (:meth:`Ingest.start`): parsing
the header, the planner (pure), and the SQLite transaction recording the decision, the follow-up jobs
and the provenance to write. Nothing here issues a network operation or calls ``orthanc.*``.

Guarantees kept from the synchronous design: every expected arrival gets a decision before the job that
moved it checks (:meth:`Ingest.settle`, called by the worker once its move returned); a decision that
fails is logged with harvest and job and the worker plans the instance from the store; an arrival no
harvest expects is inspected for header problems when arrivals pause (or counted as not inspected when
the backlog is full). Without the thread (tests, start-up) everything runs inline, as before.

The same :meth:`Ingest.process` plans from a local copy when a worker finds that an object it was about
to retrieve is already stored: a re-harvest continues the chain without moving a byte.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..background import BackgroundLoop
from ..core.classify import HarvestWindow
from ..core.operations import FindReferencing, FindTreatmentRecords, Hop, Operation, operation_from_dict
from ..core.planner import Arrival, HarvestContext, ReasonCode, plan_arrival, reason_text
from ..core.references import ObjectRefs, Problem, ProblemCode, extract_from_bytes, peek_sop_instance_uid
from ..core.rulebook import LinkName, names
from ..store.db import Database
from ..store.eventlog import EventLog, Level, exception_summary
from ..store.jobqueue import EnqueueItem, JobQueue
from ..store.tracking import Decision, Expectation, ObjectRecord, Tracker

log = logging.getLogger("rtharvest.ingest")


@dataclass(frozen=True)
class HarvestRouting:
    """Where a harvest's operations run: records at ``source``, everything else in ``lookup_sources``."""

    harvest_id: str
    window: HarvestWindow
    source: str
    lookup_sources: tuple[str, ...]

    def source_for(self, op: Operation) -> str:
        """The queue's ``source`` of a job: the first source it contacts."""
        return self.sources_of(op)[0]

    def sources_of(self, op: Operation) -> tuple[str, ...]:
        """Every source ``op`` may contact, in order (each DIMSE operation counts against its own)."""
        if isinstance(op, FindTreatmentRecords):
            return (self.source,)
        if (isinstance(op, FindReferencing) and op.modality == "RTRECORD"
                and self.source not in self.lookup_sources):
            # Step 4 (every record of a plan): the records live where the seed records came from, even
            # when LookupSources leaves the record-and-verify system out.
            return (self.source, *self.lookup_sources)
        return self.lookup_sources


# Job order: the hops that start the longest remaining chain first (critical path first, the classic
# list-scheduling rule). Bulk image moves take seconds each and the two or so associations a source allows
# are the scarce resource: a cheap search that reveals the next series must not wait behind them, so
# records, plans, structure sets and registrations go first, the image series they reveal next, and the
# leaves (a plan's later records and its doses) last. Equal priorities run oldest first.
_PRIORITY_BY_HOP = {
    Hop.WINDOW_RECORD: 70,
    Hop.RECORD_PLAN: 60,
    Hop.PLAN_STRUCTURE_SET: 50,
    Hop.DOSE_STRUCTURE_SET: 50,
    Hop.STRUCTURE_SET_IMAGE: 40,   # the planning series (its first slice starts the FoR searches)
    Hop.STRUCTURE_SET_SERIES: 40,
    Hop.IMAGE_SERIES: 40,
    Hop.FOR_REG: 35,          # registrations, then their series
    Hop.FOR_RAW: 35,
    Hop.REG_SERIES: 30,
    Hop.REG_IMAGE: 30,
    Hop.REG_FOR: 30,
    Hop.SERIES_FOR: 30,       # series sharing a FoR: leaves, but bulk
    Hop.PLAN_DOSE: 20,    # leaves, unless the plan names no structure set (see job_priority)
    Hop.PLAN_RECORD: 10,
}


def job_priority(op: Operation) -> int:
    """Queue priority of ``op`` (higher runs first): by its hop (:data:`_PRIORITY_BY_HOP`); unpacking a MIM
    session is local work that stands in for a registration search, and goes with those. The dose search
    of a plan that names no structure set (TomoTherapy) is the only way to that plan's structure set and
    so to its images: it ranks with the structure set retrieve, not with the leaves."""
    if op.kind.value == "UnpackMimSession":
        return _PRIORITY_BY_HOP[Hop.FOR_REG]
    if isinstance(op, FindReferencing) and op.hop is Hop.PLAN_DOSE and not op.plan_has_structure_set:
        return _PRIORITY_BY_HOP[Hop.PLAN_STRUCTURE_SET]
    return _PRIORITY_BY_HOP.get(op.hop, 25)


def job_for(routing: HarvestRouting, op: Operation) -> EnqueueItem:
    """The queue item that runs ``op`` for this harvest (deduplicated on the operation's key, ranked by
    :func:`job_priority`)."""
    return EnqueueItem(routing.harvest_id, op.kind.value, routing.source_for(op), op.to_dict(), op.dedupe_key(),
                       job_priority(op))


_STRUCTURAL = frozenset({ProblemCode.UNREADABLE, ProblemCode.TRUNCATED, ProblemCode.NO_FILE_META})


def problem_summary(p: Problem) -> str:
    """One problem as events and ``rth_objects.problems`` keep it: its code and attribute path. Messages may
    quote header values (a PlanIntent typed by hand, names: PHI), so one is added only for structural
    problems and only when it quotes nothing."""
    return (f"{p.code.value} {p.attribute}".strip()
            + (f" ({p.message[:200]})" if p.code in _STRUCTURAL and not any(q in p.message for q in "'\"")
               else ""))


def _problem_summary(refs: ObjectRefs, limit: int = 8) -> str:
    """:func:`problem_summary` of the first ``limit`` problems."""
    parts = [problem_summary(p) for p in refs.problems[:limit]]
    more = len(refs.problems) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "") if parts else "no details"


def _event_level(keep: bool, candidate: bool, image: bool, moved: bool) -> Level | None:
    """How loud a decision is in the event log (``None``: not logged; it is in ``rth_objects`` anyway).

    Warnings are for what needs a person: an object asked for by UID that turned out not to be what its
    reference promised. Rejecting a candidate is the expected outcome of inspecting it (INFO; nothing for
    the slices of a series brought in for one image, which are claimed by the series request). Images
    kept, and decisions planned from copies already in the store (a re-harvest), are summed up once when
    the harvest finishes instead of one event per instance.
    """
    if not keep:
        if not candidate:
            return Level.WARNING
        return None if image else Level.INFO
    return Level.INFO if moved and not image else None


@dataclass(frozen=True)
class _Arrival:
    """A stored instance waiting for the ingest thread (``expectations`` empty: only to inspect)."""

    orthanc_id: str
    data: bytes
    remote_aet: str
    sop_uid: str
    expectations: tuple[Expectation, ...]


class Ingest:
    """Turns arrivals into decisions and follow-up jobs."""

    #: Bytes of arrivals the ingest thread may hold; past it an expected arrival is decided on the C-STORE
    #: path (as without the thread) and an unexpected one is not inspected (counted in the report).
    MAX_BACKLOG_BYTES = 128 * 1024 * 1024
    #: Unexpected arrivals are inspected once no arrival came for this long (a push of a whole study
    #: must not compete with its own C-STOREs for the GIL).
    INSPECT_AFTER_QUIET_S = 0.2

    def __init__(self, db: Database, queue: JobQueue, tracker: Tracker, events: EventLog,
                 routing_of: Callable[[str], HarvestRouting | None], source_of_aet: Callable[[str], str | None],
                 *, unpack_mim_sessions: bool = False):
        self.db = db
        self.queue = queue
        self.tracker = tracker
        self.events = events
        self._routing_of = routing_of
        #: RtHarvest.UnpackMimSessions (the planner's HarvestContext carries it).
        self.unpack_mim_sessions = unpack_mim_sessions
        self._source_of_aet = source_of_aet
        self._lock = threading.Lock()
        self.arrivals = 0
        self.unsolicited = 0
        #: Arrivals whose decision could not be recorded on arrival (see :meth:`_decide`).
        self.failures = 0
        #: Unexpected arrivals not inspected for header problems because the backlog was full.
        self.uninspected = 0
        self._reported_unsolicited = 0
        self._reported_uninspected = 0
        self._planned_series: set[tuple[str, str, str]] = set()
        #: Called after follow-up jobs were committed (the harvester wakes its idle workers).
        self.on_enqueue: Callable[[], None] | None = None
        self._last_unsolicited_from = ""
        # The backlog of the ingest thread: expected arrivals (decided first, in order) and unexpected
        # ones to inspect. ``_queued``/``_done`` count expected arrivals, for settle().
        self._cond = threading.Condition(self._lock)
        self._expected: collections.deque[_Arrival] = collections.deque()
        self._to_inspect: collections.deque[_Arrival] = collections.deque()
        self._backlog_bytes = 0
        self._queued = 0
        self._done = 0
        self._last_arrival = 0.0
        self._stopping = False
        self._loop = BackgroundLoop("rtharvest-ingest", self._drain, on_stop=self._ask_to_stop)

    # -- the ingest thread --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ingest thread: from now on arrivals are decided off the C-STORE path."""
        with self._lock:
            if self._loop.alive:
                return
            self._stopping = False
            self._loop.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Decide what is waiting (inspections are dropped), then stop the thread; later arrivals run inline."""
        self._loop.stop(timeout)

    def _ask_to_stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @property
    def last_arrival(self) -> float:
        """``time.monotonic()`` of the last arrival this process saw (0.0 before the first)."""
        with self._lock:
            return self._last_arrival

    @property
    def running(self) -> bool:
        """Whether arrivals are decided on the ingest thread."""
        return self._loop.alive and not self._stopping

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until every expected arrival stored so far has its decision (or failed trying).

        A worker calls this once its move returned: every instance the move delivered went through
        OnStoredInstance by then, so it is decided or waiting here. False if the deadline passed.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._queued
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._loop.alive:
                    return self._done >= target
                self._cond.wait(min(left, 1.0))
        return True

    def _defer(self, arrival: _Arrival) -> bool:
        """Hand ``arrival`` to the ingest thread; False when it is not running or the backlog is full."""
        with self._cond:
            if (self._stopping or not self._loop.alive
                    or self._backlog_bytes + len(arrival.data) > self.MAX_BACKLOG_BYTES):
                return False
            self._backlog_bytes += len(arrival.data)
            if arrival.expectations:
                self._expected.append(arrival)
                self._queued += 1
                self._cond.notify_all()
            else:
                # No wake-up: inspection waits for a pause anyway, and waking the thread per arrival would
                # make it compete with the C-STORE callbacks for the GIL.
                self._to_inspect.append(arrival)
        return True

    def _next(self) -> _Arrival | None:
        """The next arrival to work on; None when the thread should stop."""
        with self._cond:
            while True:
                if self._expected:
                    return self._expected.popleft()
                if self._stopping:
                    self._backlog_bytes -= sum(len(a.data) for a in self._to_inspect)
                    self._to_inspect.clear()
                    return None
                if self._to_inspect:
                    quiet = time.monotonic() - self._last_arrival
                    if quiet >= self.INSPECT_AFTER_QUIET_S:
                        return self._to_inspect.popleft()
                    self._cond.wait(self.INSPECT_AFTER_QUIET_S - quiet)
                else:
                    self._cond.wait(self.INSPECT_AFTER_QUIET_S)  # unexpected arrivals come without a wake-up

    def _drain(self) -> bool:
        """The ingest loop's one pass: decide arrivals until asked to stop (what is expected is decided
        first); returns False then, and the loop ends."""
        while (arrival := self._next()) is not None:
            try:
                if arrival.expectations:
                    self._decide(arrival)
                else:
                    self._inspect(arrival)
            except Exception:  # _decide/_inspect log their own failures; this keeps the thread alive
                log.exception("ingest thread failed on stored instance %s", arrival.orthanc_id)
            finally:
                with self._cond:
                    self._backlog_bytes -= len(arrival.data)
                    if arrival.expectations:
                        self._done += 1
                    self._cond.notify_all()
        return False

    # -- arrivals -----------------------------------------------------------------------------------

    def on_stored(self, orthanc_id: str, data: bytes, remote_aet: str) -> None:
        """OnStoredInstance: identify the arrival and hand it to the ingest thread (never raises; a failure
        is logged with the harvest and job that expected the instance, or with its SOP UID only when
        finding them is what failed)."""
        sop_uid = peek_sop_instance_uid(data)
        if sop_uid is None:
            # No usable SOPInstanceUID where it belongs: the whole header says what is wrong (rare).
            self._on_stored_parsed(orthanc_id, data, remote_aet)
            return
        expectations = self._expectations(orthanc_id, sop_uid)
        if expectations is None:
            return
        with self._lock:
            self._last_arrival = time.monotonic()
            self.arrivals += 1
            if not expectations:
                self.unsolicited += 1
                self._last_unsolicited_from = remote_aet
        arrival = _Arrival(orthanc_id, data, remote_aet, sop_uid, expectations)
        if self._defer(arrival):
            return
        if expectations:
            self._decide(arrival)
        elif self.running:
            with self._lock:
                self.uninspected += 1  # the backlog is full: count, do not parse on the C-STORE path
        else:
            self._inspect(arrival)

    def _expectations(self, orthanc_id: str, sop_uid: str) -> tuple[Expectation, ...] | None:
        """Who expects ``sop_uid``; None when the look-up failed (counted and logged, never raised).

        Which harvest expected the instance is exactly what failed, so the log names the instance only.
        The job that moved it (if any) finds it in the store without a decision and plans it from there
        (``Harvester._settle_arrivals``); an instance nobody expected stays stored, as any unsolicited one.
        """
        try:
            return tuple(self.tracker.expectations_for(sop_uid))
        except Exception as exc:
            with self._lock:
                self.arrivals += 1
                self.failures += 1
            log.error("ingest of stored instance %s failed looking up the harvests that expect it (%s); a job "
                      "that moved it plans it from the store", orthanc_id, exception_summary(exc),
                      extra={"sop_uid": sop_uid, "component": "ingest"})
            return None

    def _on_stored_parsed(self, orthanc_id: str, data: bytes, remote_aet: str) -> None:
        """The arrival whose identity only the whole header gives: parse, then decide or report, inline."""
        refs = extract_from_bytes(data)
        if not refs.sop_uid:
            self._report_unreadable(orthanc_id, refs, remote_aet)
            return
        expectations = self._expectations(orthanc_id, refs.sop_uid)
        if expectations is None:
            return
        with self._lock:
            self.arrivals += 1
            if not expectations:
                self.unsolicited += 1
                self._last_unsolicited_from = remote_aet
        if expectations:
            self._decide(_Arrival(orthanc_id, data, remote_aet, refs.sop_uid, expectations), refs)
        else:
            self._report_problems(orthanc_id, refs, remote_aet)

    def _source(self, remote_aet: str) -> str | None:
        return (self._source_of_aet(remote_aet) if remote_aet else None) or remote_aet or None

    def _report_unreadable(self, orthanc_id: str, refs: ObjectRefs, remote_aet: str) -> None:
        self.events.write(Level.WARNING, "ingest", f"stored instance {orthanc_id} is unreadable: "
                          + _problem_summary(refs), source=self._source(remote_aet))

    def _report_problems(self, orthanc_id: str, refs: ObjectRefs, remote_aet: str) -> None:
        # Well-formed unexpected arrivals are counted, not logged one by one: the maintenance thread
        # reports the count (report_unsolicited).
        if refs.problems:
            self.events.write(Level.WARNING, "ingest", f"instance {orthanc_id} arrived that no harvest expects;"
                              f" its header has problems: {_problem_summary(refs)}", sop_uid=refs.sop_uid,
                              source=self._source(remote_aet))

    def _inspect(self, arrival: _Arrival) -> None:
        """An arrival no harvest expects: say so if its header has problems."""
        refs = extract_from_bytes(arrival.data)
        if not refs.sop_uid:
            self._report_unreadable(arrival.orthanc_id, refs, arrival.remote_aet)
        else:
            self._report_problems(arrival.orthanc_id, refs, arrival.remote_aet)

    def _decide(self, arrival: _Arrival, refs: ObjectRefs | None = None) -> None:
        """Parse the header and decide for every harvest that expects the arrival (never raises)."""
        orthanc_id, expectations = arrival.orthanc_id, arrival.expectations
        sop_uid = arrival.sop_uid
        try:
            if refs is None:
                refs = extract_from_bytes(arrival.data)
            if not refs.sop_uid:
                # Unreadable past its identity: the job that moved it plans it from the store (and fails
                # with the parser's reason if that cannot decide either).
                self._report_unreadable(orthanc_id, refs, arrival.remote_aet)
                return
            sop_uid = refs.sop_uid
            self.process(refs, orthanc_id, expectations, moved=True)
        except Exception as exc:
            # Orthanc keeps the instance whatever happens here (the callback cannot refuse it), so a failed
            # decision must not end the chain silently: the worker that moved it finds it in the store
            # without a decision and plans it from there, or fails the job with this reason. Logged through
            # the event-log handler, which queues instead of writing (the database may be what failed).
            with self._lock:
                self.failures += 1
            for exp in expectations:
                log.error("ingest of stored instance %s failed (%s); the job that moved it plans it from "
                          "the store", orthanc_id, exception_summary(exc),
                          extra={"harvest_id": exp.harvest_id, "job_id": exp.job_id, "sop_uid": sop_uid,
                                 "series_uid": refs.series_uid if refs else None, "component": "ingest"})

    def _series_planned(self, exp: Expectation, refs: ObjectRefs, op: Operation) -> bool:
        """True when another image of this series, wanted by the same operation, was planned already.

        The planner's hops from an image are series-level, so the 2nd..Nth slice of a series would only
        re-enqueue the same (deduplicated) jobs: skip that work on the C-STORE path. Kept in memory only:
        after a restart the first slice plans again, and the queue's dedupe keys absorb it.
        """
        if refs.kind.value != "IMAGE" or not refs.series_uid:
            return False
        with self._lock:
            return (exp.harvest_id, refs.series_uid, op.dedupe_key()) in self._planned_series

    def _mark_series_planned(self, keys: list[tuple[str, str, str]]) -> None:
        # Marked only once the follow-ups are committed: a rolled-back transaction must plan again.
        with self._lock:
            if len(self._planned_series) > 100_000:
                self._planned_series.clear()
            self._planned_series.update(keys)

    def report_unsolicited(self) -> None:
        """Log how many instances arrived that no harvest expected since the last report."""
        with self._lock:
            new = self.unsolicited - self._reported_unsolicited
            self._reported_unsolicited = self.unsolicited
            skipped = self.uninspected - self._reported_uninspected
            self._reported_uninspected = self.uninspected
            aet = self._last_unsolicited_from
        if new:
            source = self._source_of_aet(aet) if aet else None
            origin = f"last from {source or aet}" if aet else "last through the REST API"
            self.events.write(Level.INFO, "ingest", f"{new} instance(s) arrived that no harvest expected ({origin});"
                              " stored by Orthanc, not part of any harvest", source=source)
        if skipped:
            self.events.write(Level.WARNING, "ingest", f"{skipped} instance(s) that no harvest expected were not "
                              "checked for header problems: they arrived faster than the ingest thread could "
                              "inspect them")

    def _record_late(self, exp: Expectation, refs: ObjectRefs, orthanc_id: str | None,
                     messages: list[tuple[Level, str, str, int | None]]) -> None:
        """An arrival for a job that has ended (its source still sending after the move ended, e.g. after a
        C-MOVE timeout): a rejected candidate of the harvest, not planned. The record reopens the harvest's
        clean-up, which removes it unless some harvest keeps it; a retry of the job finds it in the store
        and decides it under its rule (a keep replaces this rejection). A rule, not a guess: what the job
        did not receive while it ran is what its result (and the manifest) says it did not receive."""
        reason = reason_text(ReasonCode.ARRIVED_AFTER_JOB_ENDED, job=str(exp.job_id))
        first = self.tracker.record(ObjectRecord(
            harvest_id=exp.harvest_id, sop_uid=refs.sop_uid, orthanc_id=orthanc_id, decision=Decision.REJECTED,
            reason=reason, role=exp.role, hop=exp.hop, source=exp.source, job_id=exp.job_id, moved=True,
            patient_id=refs.patient_id, study_uid=refs.study_uid, series_uid=refs.series_uid,
            modality=refs.modality, sop_class_uid=refs.sop_class_uid,
            frame_of_reference_uid=refs.frame_of_reference_uid, reason_code=ReasonCode.ARRIVED_AFTER_JOB_ENDED.value))
        if first and refs.kind.value != "IMAGE":  # no event per slice: the harvest's summary counts them
            messages.append((Level.INFO, exp.harvest_id, f"{exp.hop} {refs.kind.value.lower()} {reason}",
                             exp.job_id))

    def process(self, refs: ObjectRefs, orthanc_id: str | None, expectations: Sequence[Expectation],
                moved: bool) -> list[tuple[str, bool]]:
        """Decide for every harvest that expects this object; returns ``(harvest_id, kept)`` pairs.

        One transaction: the decisions, the provenance outbox rows and the follow-up jobs commit together.
        """
        results: list[tuple[str, bool]] = []
        planned: list[tuple[str, str, str]] = []
        messages: list[tuple[Level, str, str, int | None]] = []
        # A running job (of any harvest) expecting the instance decides for its harvest, and the clean-up of
        # whatever it rejects is that harvest's: an ended job's expectation then adds nothing (recording it
        # would reopen an earlier, finished harvest for an instance a later one asked for).
        running = any(not e.late for e in expectations)
        enqueued = False
        with self.db.transaction():
            for exp in expectations:
                routing = self._routing_of(exp.harvest_id)
                if routing is None:
                    continue
                if exp.late:
                    if not running:
                        self._record_late(exp, refs, orthanc_id, messages)
                        results.append((exp.harvest_id, False))
                    continue
                try:
                    op = operation_from_dict(exp.operation)
                except (KeyError, ValueError, TypeError) as exc:
                    messages.append((Level.ERROR, exp.harvest_id, f"expectation of job {exp.job_id} has a bad "
                                     f"operation: {exception_summary(exc)}", exp.job_id))
                    continue
                context = HarvestContext(routing.window, exp.harvest_id, self.unpack_mim_sessions)
                decision = plan_arrival(Arrival(refs, op, exp.candidate), context)
                record = ObjectRecord(
                    harvest_id=exp.harvest_id, sop_uid=refs.sop_uid, orthanc_id=orthanc_id,
                    decision=Decision.KEPT if decision.keep else Decision.REJECTED, reason=decision.reason,
                    role=exp.role, hop=exp.hop, source=exp.source, job_id=exp.job_id, moved=moved,
                    patient_id=refs.patient_id, study_uid=refs.study_uid, series_uid=refs.series_uid,
                    modality=refs.modality, sop_class_uid=refs.sop_class_uid,
                    frame_of_reference_uid=refs.frame_of_reference_uid,
                    plan_uids=names(LinkName.PLAN_RECORD, refs),
                    treatment_date=refs.record.treatment_date if refs.record else None,
                    problems=tuple(problem_summary(p) for p in decision.problems),
                    reason_code=decision.code.value,
                )
                first = self.tracker.record(record)
                if exp.candidate and not decision.keep:
                    self.tracker.remember_rejection(refs.sop_uid, op.dedupe_key(), decision.reason)
                if decision.operations and not self._series_planned(exp, refs, op):
                    created = self.queue.enqueue_many(
                        job_for(routing, o) for o in decision.operations
                    )
                    enqueued = enqueued or any(new for _, new in created)
                    if refs.kind.value == "IMAGE" and refs.series_uid:
                        planned.append((exp.harvest_id, refs.series_uid, op.dedupe_key()))
                results.append((exp.harvest_id, decision.keep))
                level = _event_level(decision.keep, exp.candidate, refs.kind.value == "IMAGE", moved)
                if first and level is not None:
                    verb = "kept" if decision.keep else "rejected"
                    messages.append((level, exp.harvest_id, f"{exp.hop} {refs.kind.value.lower()} {verb}: "
                                     f"{decision.reason}", exp.job_id))
        self._mark_series_planned(planned)
        # Idle workers are woken only for new jobs: most arrivals (the slices of a series) enqueue nothing new,
        # and a wake per arrival had every idle worker query the queue for nothing (measured: a tenth of the
        # ingest thread's time in notify_all, plus the workers' claims).
        if self.on_enqueue is not None and enqueued:
            self.on_enqueue()
        for level, harvest_id, message, job_id in messages:
            self.events.write(level, "ingest", message, harvest_id=harvest_id, job_id=job_id, sop_uid=refs.sop_uid,
                              series_uid=refs.series_uid)
        return results

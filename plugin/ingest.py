"""The OnStoredInstance path: attribute an arriving object, let the planner decide, enqueue the next hops.

Runs on Orthanc's C-STORE thread, before the C-STORE response is sent, so it does only local work:
parse the header (no pixels), one indexed look-up of who expected the instance, the planner (pure), and
one SQLite transaction recording the decision, the follow-up jobs and the provenance to write. It never
issues a network operation and never calls ``orthanc.*`` (metadata and deletions are done by workers).

The same :meth:`Ingest.process` plans from a local copy when a worker finds that an object it was about
to retrieve is already stored: a re-harvest continues the chain without moving a byte.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .classify import HarvestWindow
from .db import Database
from .eventlog import EventLog, Level
from .jobqueue import EnqueueItem, JobQueue
from .operations import FindReferencing, FindTreatmentRecords, Operation, operation_from_dict
from .planner import Arrival, HarvestContext, plan_arrival
from .references import ObjectRefs, ProblemCode, extract_from_bytes
from .tracking import Decision, Expectation, ObjectRecord, Tracker

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


def job_for(routing: HarvestRouting, op: Operation, priority: int = 0) -> EnqueueItem:
    """The queue item that runs ``op`` for this harvest (deduplicated on the operation's key)."""
    return EnqueueItem(routing.harvest_id, op.kind.value, routing.source_for(op), op.to_dict(), op.dedupe_key(),
                       priority)


# Later hops first: finishing one patient's chain before starting the next keeps partial results useful
# and bounds the number of half-collected plans after an interruption.
_PRIORITY_BY_KIND = {
    "FindTreatmentRecords": 0,
    "RetrieveInstance": 20,
    "FindReferencing": 10,
    "RetrieveSeries": 15,
    "FindSeriesInFrameOfReference": 5,
    "UnpackMimSession": 20,  # local work that continues a chain
}


_STRUCTURAL = frozenset({ProblemCode.UNREADABLE, ProblemCode.TRUNCATED, ProblemCode.NO_FILE_META})


def _problem_summary(refs: ObjectRefs, limit: int = 8) -> str:
    """Problem codes and attribute paths: parser messages may quote header values (names are PHI), so a
    message is added only for structural problems and only when it quotes nothing."""
    parts = [f"{p.code.value} {p.attribute}".strip()
             + (f" ({p.message[:200]})" if p.code in _STRUCTURAL and not any(q in p.message for q in "'\"")
                else "")
             for p in refs.problems[:limit]]
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


class Ingest:
    """Turns arrivals into decisions and follow-up jobs."""

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
        #: Arrivals whose decision could not be recorded on the C-STORE path (see :meth:`on_stored`).
        self.failures = 0
        self._reported_unsolicited = 0
        self._planned_series: set[tuple[str, str, str]] = set()
        #: Called after follow-up jobs were committed (the harvester wakes its idle workers).
        self.on_enqueue: Callable[[], None] | None = None
        self._last_unsolicited_from = ""

    def on_stored(self, orthanc_id: str, data: bytes, remote_aet: str) -> None:
        """OnStoredInstance: parse, attribute, plan, enqueue (never raises; a failure is logged with the
        harvest and job that expected the instance)."""
        refs = extract_from_bytes(data)
        source = (self._source_of_aet(remote_aet) if remote_aet else None) or remote_aet or None
        if not refs.sop_uid:
            self.events.write(Level.WARNING, "ingest", f"stored instance {orthanc_id} is unreadable: "
                              + _problem_summary(refs), source=source)
            return
        expectations = self.tracker.expectations_for(refs.sop_uid)
        with self._lock:
            self.arrivals += 1
        if not expectations:
            with self._lock:
                self.unsolicited += 1
                self._last_unsolicited_from = remote_aet
            if refs.problems:
                self.events.write(Level.WARNING, "ingest", f"instance {orthanc_id} arrived that no harvest expects;"
                                  f" its header has problems: {_problem_summary(refs)}", sop_uid=refs.sop_uid,
                                  source=source)
            # Well-formed ones are counted, not logged one by one: a clinic pushing a study must not cost a
            # database write per image on the C-STORE path. The maintenance thread reports the count.
            return
        try:
            self.process(refs, orthanc_id, expectations, moved=True)
        except Exception as exc:
            # Orthanc keeps the instance whatever happens here (the callback cannot refuse it), so a failed
            # decision must not end the chain silently: the worker that moved it finds it in the store
            # without a decision and plans it from there, or fails the job with this reason. Logged through
            # the event-log handler, which queues instead of writing (the database may be what failed).
            with self._lock:
                self.failures += 1
            for exp in expectations:
                log.error("ingest of stored instance %s failed (%s: %s); the job that moved it plans it from "
                          "the store", orthanc_id, type(exc).__name__, exc,
                          extra={"harvest_id": exp.harvest_id, "job_id": exp.job_id, "sop_uid": refs.sop_uid,
                                 "series_uid": refs.series_uid, "component": "ingest"})

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
            aet = self._last_unsolicited_from
        if new:
            source = self._source_of_aet(aet) if aet else None
            origin = f"last from {source or aet}" if aet else "last through the REST API"
            self.events.write(Level.INFO, "ingest", f"{new} instance(s) arrived that no harvest expected ({origin});"
                              " stored by Orthanc, not part of any harvest", source=source)

    def process(self, refs: ObjectRefs, orthanc_id: str | None, expectations: Sequence[Expectation],
                moved: bool) -> list[tuple[str, bool]]:
        """Decide for every harvest that expects this object; returns ``(harvest_id, kept)`` pairs.

        One transaction: the decisions, the provenance outbox rows and the follow-up jobs commit together.
        """
        results: list[tuple[str, bool]] = []
        planned: list[tuple[str, str, str]] = []
        messages: list[tuple[Level, str, str, int | None]] = []
        with self.db.transaction():
            for exp in expectations:
                routing = self._routing_of(exp.harvest_id)
                if routing is None:
                    continue
                try:
                    op = operation_from_dict(exp.operation)
                except (KeyError, ValueError, TypeError) as exc:
                    messages.append((Level.ERROR, exp.harvest_id, f"expectation of job {exp.job_id} has a bad "
                                     f"operation: {exc}", exp.job_id))
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
                    plan_uids=refs.record.plan_uids if refs.record else (),
                    treatment_date=refs.record.treatment_date if refs.record else None,
                    problems=tuple(f"{p.code.value}: {p.message}" for p in decision.problems),
                )
                first = self.tracker.record(record)
                if exp.candidate and not decision.keep:
                    self.tracker.remember_rejection(refs.sop_uid, op.dedupe_key(), decision.reason)
                if decision.operations and not self._series_planned(exp, refs, op):
                    self.queue.enqueue_many(
                        job_for(routing, o, _PRIORITY_BY_KIND.get(o.kind.value, 0)) for o in decision.operations
                    )
                    if refs.kind.value == "IMAGE" and refs.series_uid:
                        planned.append((exp.harvest_id, refs.series_uid, op.dedupe_key()))
                results.append((exp.harvest_id, decision.keep))
                level = _event_level(decision.keep, exp.candidate, refs.kind.value == "IMAGE", moved)
                if first and level is not None:
                    verb = "kept" if decision.keep else "rejected"
                    messages.append((level, exp.harvest_id, f"{exp.hop} {refs.kind.value.lower()} {verb}: "
                                     f"{decision.reason}", exp.job_id))
        self._mark_series_planned(planned)
        if self.on_enqueue is not None and any(kept for _, kept in results):
            self.on_enqueue()
        for level, harvest_id, message, job_id in messages:
            self.events.write(level, "ingest", message, harvest_id=harvest_id, job_id=job_id, sop_uid=refs.sop_uid,
                              series_uid=refs.series_uid)
        return results

"""MIM sessions inside the harvester (``RtHarvest.UnpackMimSessions``): unpack a stored Raw Data object and
plan the RTSTRUCT and REG objects it carries like any other arrival.

The planner answers a Raw Data object with an :class:`~rtharvest.core.operations.UnpackMimSession` job (the REG
search of a frame of reference also searches the patient's Raw Data objects). A worker runs that job here,
off the OnStoredInstance thread (the C-STORE response waits for that callback, and every ``orthanc.*`` call
holds the GIL): it reads the session from the local store, unpacks it with
:mod:`rtharvest.converters.mim` (the same rules as ``rtharvest-convert mim``), announces each embedded
object as expected by this job and stores it through Orthanc's REST API on loopback. OnStoredInstance then
plans it with the operation the session stands in for, exactly as if a source had sent it; an object
already stored is planned from the stored copy instead.

Provenance: an embedded object's ``HarvestHop`` is ``RAW->REG`` / ``RAW->RTSTRUCT``, its ``HarvestSource``
the source of the session, and the metadata ``HarvestMimSession`` (declared in ``UserMetadata``) names the
session's SOP Instance UID. The session itself is a candidate the end-of-harvest cleanup removes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from typing import Protocol

from ..converters.mim import MimSessionError, unpack_bytes
from ..core.operations import (
    CriterionKind,
    FindReferencing,
    Operation,
    ReferenceCriterion,
    RetrieveInstance,
    Role,
    UnpackMimSession,
)
from ..core.planner import leaves_kept_alone
from ..core.references import extract
from ..store.eventlog import EventLog, Level, exception_summary
from ..store.jobqueue import Job
from ..store.tracking import Expectation, Tracker
from .ingest import Ingest

log = logging.getLogger("rtharvest.mimsessions")

#: Metadata naming the MIM session (Raw Data SOP Instance UID) an object was unpacked from.
SESSION_METADATA = "HarvestMimSession"


def session_search(op: Operation, enabled: bool) -> FindReferencing | None:
    """The search for the patient's MIM sessions when ``op`` (a structure set or registration wanted by UID)
    is found at no source as an object; ``None`` when that fallback does not apply.

    Every Raw Data object of the patient is a candidate: what a session carries is only known once it is
    unpacked (the unpack job judges its objects against ``op``: only the wanted UID is kept).
    """
    if not enabled or not isinstance(op, RetrieveInstance) or not op.patient_id:
        return None
    if op.modality not in ("RTSTRUCT", "REG") and op.role is not Role.STRUCTURE_SET:
        return None
    return FindReferencing("RAW", op.patient_id, None, ReferenceCriterion(CriterionKind.FRAME_OF_REFERENCE, ()),
                           op.role, op.hop.as_session_search())


class SessionStore(Protocol):
    """What unpacking needs of the harvester's own store."""

    def lookup(self, sop_uid: str) -> str | None:
        """Orthanc ID of the stored instance, or None."""

    def read(self, orthanc_id: str) -> bytes:
        """The stored DICOM file."""

    def upload(self, data: bytes) -> str:
        """Store a DICOM file; its Orthanc ID."""

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        """All metadata of an instance."""

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        """Write one metadata value."""


class SessionGone(LookupError):
    """The session to unpack is no longer in the store."""


@dataclass(frozen=True)
class UnpackOutcome:
    """What one unpack job did: embedded objects found, stored by unpacking, already stored, kept."""

    objects: int = 0
    stored: int = 0
    local: int = 0
    kept: int = 0


class SessionUnpacker:
    """Runs :class:`UnpackMimSession` jobs."""

    def __init__(self, store: SessionStore, tracker: Tracker, ingest: Ingest, events: EventLog) -> None:
        self.store = store
        self.tracker = tracker
        self.ingest = ingest
        self.events = events
        self._metadata_warned = False

    def run(self, job: Job, op: UnpackMimSession, default_source: str) -> UnpackOutcome:
        """Unpack the session and plan its objects; :class:`SessionGone` when it is not stored."""
        raw_id = self.store.lookup(op.sop_uid)
        if raw_id is None:
            raise SessionGone(f"MIM session {op.sop_uid} is no longer stored: nothing to unpack")
        try:
            result = unpack_bytes(self.store.read(raw_id))
        except MimSessionError as exc:
            # Another vendor's Raw Data object holds nothing to plan (INFO); a damaged session is reported
            # (WARNING) and the harvest goes on without it.
            level, what = (Level.WARNING, "is a MIM session that cannot be unpacked") if exc.damaged else (
                Level.INFO, "is not a MIM session")
            self.events.write(level, "mimsessions", f"Raw Data object {op.sop_uid} {what} "
                              f"({exception_summary(exc)})",
                              harvest_id=job.harvest_id, job_id=job.id, sop_uid=op.sop_uid)
            return UnpackOutcome()
        for message in result.warnings:  # e.g. a session recognised by its content under another creator text
            self.events.write(Level.WARNING, "mimsessions", f"MIM session {op.sop_uid}: {message}",
                              harvest_id=job.harvest_id, job_id=job.id, sop_uid=op.sop_uid)
        for problem in [*result.errors, *result.skipped]:
            level = Level.WARNING if problem in result.errors else Level.INFO
            self.events.write(level, "mimsessions", f"MIM session {op.sop_uid}: {problem.detail} ({problem.reason})",
                              harvest_id=job.harvest_id, job_id=job.id, sop_uid=op.sop_uid)
        inner = op.inner()
        source = self.tracker.source_of(job.harvest_id, op.sop_uid) or default_source
        stored = local = kept = 0
        for obj in result.objects:
            expectation = Expectation(job.harvest_id, obj.sop_uid, job.id, source, inner.role.value,
                                      f"RAW->{obj.modality}", True, inner.to_dict())
            self.tracker.expect([expectation])
            orthanc_id = self.store.lookup(obj.sop_uid)
            if orthanc_id is None:
                buffer = BytesIO()
                obj.dataset.save_as(buffer, enforce_file_format=True)
                # OnStoredInstance queues it before this call returns (the expectation names this job) and the
                # ingest thread plans it: settle waits for that.
                orthanc_id = self.store.upload(buffer.getvalue())
                self.ingest.settle()
                stored += 1
                planned = self.tracker.has_object(job.harvest_id, obj.sop_uid)
            else:
                local += 1
                # Rejected for another operation (e.g. the session was unpacked for a structure set it did not
                # carry) is no answer for this one; nor is a kept copy when this operation plans hops of its
                # own (a REG kept for one planning FoR brings the registered series of another): the same rule
                # as the worker's (planner.leaves_kept_alone).
                planned = leaves_kept_alone(inner) and self.tracker.has_kept(job.harvest_id, obj.sop_uid)
            if not planned:
                # Stored before this job announced it (another session, a source): plan the stored copy.
                self.ingest.process(extract(obj.dataset), orthanc_id, [expectation], moved=False)
            if self.tracker.has_kept(job.harvest_id, obj.sop_uid):
                kept += 1
                self._mark(orthanc_id, op.sop_uid)
        if kept:
            # The session mattered: a later harvest must inspect it again rather than skip it as rejected.
            self.tracker.forget_rejection(op.sop_uid, op.arrived_under)
        self.events.write(Level.INFO, "mimsessions", f"MIM session {op.sop_uid}: {len(result.objects)} object(s) "
                          f"unpacked ({stored} stored, {local} already stored), {kept} kept",
                          harvest_id=job.harvest_id, job_id=job.id, sop_uid=op.sop_uid)
        return UnpackOutcome(len(result.objects), stored, local, kept)

    def _mark(self, orthanc_id: str, session_uid: str) -> None:
        """Name the session in the object's metadata (the first session that brought it stays)."""
        try:
            if not self.store.metadata(orthanc_id).get(SESSION_METADATA):
                self.store.set_metadata(orthanc_id, SESSION_METADATA, session_uid)
        except Exception as exc:  # e.g. HarvestMimSession not declared in UserMetadata: provenance degrades
            if not self._metadata_warned:
                self._metadata_warned = True
                self.events.write(Level.WARNING, "mimsessions", f"cannot write {SESSION_METADATA} metadata "
                                  f"(declare it in UserMetadata): {exception_summary(exc)}")

"""The harvester's worker, ingest and tracker paths with in-memory edges (no Orthanc, no network, no threads).

:class:`World` wires the real :class:`~rtharvest.harvest.harvester.Harvester`,
:class:`~rtharvest.harvest.ingest.Ingest`,
:class:`~rtharvest.store.tracking.Tracker`, :class:`~rtharvest.store.jobqueue.JobQueue` and event log on a SQLite
file to two fakes: :class:`FakeStore` (the harvester's Orthanc store) and :class:`FakeBackend` (a source:
:class:`~rtharvest.synth.simulation.FakeSource` answers the C-FINDs and, for a C-MOVE, each instance is put into
the store and handed to ``Ingest.on_stored`` exactly as Orthanc's OnStoredInstance would, before the
move returns). :meth:`World.run` claims and runs jobs on the calling thread until none is left, so a
test observes every state without sleeping.
"""

from __future__ import annotations

import copy
import io
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.planner import HarvestContext, start_operations
from rtharvest.core.provenance import StoredSeries, resolve
from rtharvest.core.strategies import QueryLevel, SourceCapability
from rtharvest.dimse.base import InstanceKey, MoveResult, SourceError, SourceErrorKind
from rtharvest.harvest.harvester import Harvester, SourceAccess
from rtharvest.harvest.ingest import HarvestRouting, Ingest, job_for
from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog
from rtharvest.store.jobqueue import EnqueueItem, JobQueue, RetryPolicy
from rtharvest.store.tracking import Decision, Tracker
from rtharvest.synth.simulation import FakeSource, QueryRejected

AET = "RTHARVEST"


def dicom_bytes(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (explicit VR little endian), as a source would send it."""
    ds = copy.deepcopy(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class FakeStore:
    """The harvester's own store (``harvester.LocalStore``), in memory."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.by_sop: dict[str, str] = {}
        self.series: dict[str, dict[str, str]] = {}
        self.meta: dict[str, dict[str, str]] = {}
        #: Series metadata by series Orthanc ID (``series-`` + SeriesInstanceUID).
        self.series_meta: dict[str, dict[str, str]] = {}
        self.deleted: list[str] = []
        self._ids = itertools.count(1)
        #: Called with the Orthanc ID before each deletion (tests inject concurrent arrivals there).
        self.before_delete: Callable[[str], None] | None = None
        #: OnStoredInstance of a REST upload (``World`` wires the ingest): called before upload() returns.
        self.on_upload: Callable[[str, bytes], None] | None = None
        #: SOP Instance UIDs stored through upload() (``POST /instances``), in order.
        self.uploads: list[str] = []
        self._lock = threading.RLock()  # the workers and the maintenance thread share the store

    def put(self, sop_uid: str, series_uid: str, data: bytes) -> str:
        """Store an instance (a duplicate keeps its Orthanc ID, like Orthanc); returns the Orthanc ID."""
        with self._lock:
            oid = self.by_sop.get(sop_uid) or f"oid-{next(self._ids)}"
            self.files[oid] = data
            self.by_sop[sop_uid] = oid
            self.series.setdefault(series_uid, {})[sop_uid] = oid
            self.meta.setdefault(oid, {})
            return oid

    def lookup(self, sop_uid: str) -> str | None:
        return self.by_sop.get(sop_uid)

    def upload(self, data: bytes) -> str:
        """``POST /instances``: store a Part 10 file; OnStoredInstance (``on_upload``) runs before it returns."""
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        oid = self.put(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), data)
        self.uploads.append(str(ds.SOPInstanceUID))
        if self.on_upload is not None:
            self.on_upload(oid, data)
        return oid

    def lookup_many(self, sop_uids: Sequence[str]) -> dict[str, str]:
        with self._lock:
            return {uid: self.by_sop[uid] for uid in sop_uids if uid in self.by_sop}

    def series_instances(self, series_uid: str) -> dict[str, str]:
        with self._lock:
            return dict(self.series.get(series_uid, {}))

    def read(self, orthanc_id: str) -> bytes:
        with self._lock:
            if orthanc_id not in self.files:
                raise LookupError(orthanc_id)
            return self.files[orthanc_id]

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        with self._lock:
            if orthanc_id not in self.files:
                raise LookupError(orthanc_id)
            return dict(self.meta[orthanc_id])

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        with self._lock:
            if orthanc_id not in self.files:
                raise LookupError(orthanc_id)
            self.meta[orthanc_id][name] = value

    def series_of(self, orthanc_id: str) -> StoredSeries:
        with self._lock:
            for series_uid, members in self.series.items():
                if orthanc_id in members.values():
                    return StoredSeries(f"series-{series_uid}", frozenset(members.values()))
            raise LookupError(orthanc_id)

    def series_metadata(self, series_id: str) -> dict[str, str]:
        with self._lock:
            if not self.series.get(series_id.removeprefix("series-")):
                raise LookupError(series_id)
            return dict(self.series_meta.get(series_id, {}))

    def set_series_metadata(self, series_id: str, name: str, value: str) -> None:
        with self._lock:
            if not self.series.get(series_id.removeprefix("series-")):
                raise LookupError(series_id)
            self.series_meta.setdefault(series_id, {})[name] = value

    def provenance(self, orthanc_id: str) -> dict[str, str]:
        """An instance's provenance resolved instance → series (as ``OrthancLocalStore.provenance``)."""
        return resolve(self.metadata(orthanc_id), self.series_metadata(self.series_of(orthanc_id).orthanc_id))

    def delete(self, orthanc_id: str) -> None:
        if self.before_delete is not None:
            self.before_delete(orthanc_id)
        with self._lock:
            if orthanc_id not in self.files:
                raise LookupError(orthanc_id)
            del self.files[orthanc_id]
            self.meta.pop(orthanc_id, None)
            for sop, oid in list(self.by_sop.items()):
                if oid == orthanc_id:
                    del self.by_sop[sop]
            for series_uid, members in self.series.items():
                for sop, oid in list(members.items()):
                    if oid == orthanc_id:
                        del members[sop]
                if not members:  # Orthanc drops an emptied series, and its metadata with it
                    self.series_meta.pop(f"series-{series_uid}", None)
            self.deleted.append(orthanc_id)

    def holds(self, sop_uid: str) -> bool:
        """Whether the instance is stored."""
        with self._lock:
            return sop_uid in self.by_sop


@dataclass
class FakeBackend:
    """A source (``dimse.base.SourceBackend``) over a :class:`FakeSource`; a C-MOVE stores each instance
    and calls ``on_stored(orthanc_id, data, calling_aet)`` before returning, as Orthanc does.

    ``move_status``: a warning status (0xBxxx) to raise after delivering what the source holds, or None.
    ``withhold``: SOP UIDs the source lists but never delivers (a failed sub-operation).
    """

    name: str
    source: FakeSource
    store: FakeStore
    on_stored: Callable[[str, bytes, str], None]
    supports_sequence_keys: bool = False
    move_status: int | None = None
    withhold: set[str] = field(default_factory=set)
    moves: list[tuple[QueryLevel, tuple[str, ...]]] = field(default_factory=list)
    #: Every C-FIND sent: (level, identifier).
    finds: list[tuple[QueryLevel, dict[str, Any]]] = field(default_factory=list)

    def find(self, level: QueryLevel, keys: Mapping[str, Any], *, timeout: float | None = None) -> list[dict[str, Any]]:
        self.finds.append((level, dict(keys)))
        try:
            return self.source.find(level, keys)
        except QueryRejected as exc:
            raise SourceError(SourceErrorKind.BAD_REQUEST, str(exc), source=self.name, operation="find",
                              dimse_status=0xA900) from None

    def move(self, level: QueryLevel, *, patient_id: str | None, study_uid: str, series_uid: str | None = None,
             sop_uids: Sequence[str] = (), timeout: float | None = None) -> MoveResult:
        if level is QueryLevel.IMAGE:
            return self.move_instances([InstanceKey(study_uid, series_uid or "", sop) for sop in sop_uids])
        try:
            uids = self.source.retrieve(level, {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid})
        except QueryRejected as exc:
            raise SourceError(SourceErrorKind.BAD_REQUEST, str(exc), source=self.name, operation="move",
                              dimse_status=0xA900) from None
        return self._deliver(level, uids)

    def move_instances(self, instances: Sequence[InstanceKey], *, timeout: float | None = None) -> MoveResult:
        try:
            uids = [u for key in instances for u in self.source.retrieve(QueryLevel.IMAGE, {
                "StudyInstanceUID": key.study_uid, "SeriesInstanceUID": key.series_uid,
                "SOPInstanceUID": key.sop_uid})]
        except QueryRejected as exc:
            raise SourceError(SourceErrorKind.BAD_REQUEST, str(exc), source=self.name, operation="move",
                              dimse_status=0xA900) from None
        return self._deliver(QueryLevel.IMAGE, uids)

    def _deliver(self, level: QueryLevel, uids: Sequence[str]) -> MoveResult:
        """Store what one move call asked for (one entry in ``moves``), as the source would send it."""
        self.moves.append((level, tuple(uids)))
        sent = 0
        for uid in uids:
            if uid in self.withhold:
                continue
            inst = self.source.instances[uid]
            data = dicom_bytes(inst.ds)
            oid = self.store.put(uid, inst.series_uid, data)
            self.on_stored(oid, data, self.name)
            sent += 1
        if self.move_status is not None:
            raise SourceError(SourceErrorKind.FAILURE_STATUS, "some sub-operations failed", source=self.name,
                              operation="move", dimse_status=self.move_status)
        return MoveResult(0x0000, completed=sent, failed=len(uids) - sent, warning=0)


class World:
    """Queue, tracker, ingest and harvester on ``path`` with one fake source named ``SRC``."""

    def __init__(self, path: Path, datasets: Iterable[Dataset], capability: SourceCapability | None = None,
                 max_attempts: int = 3, store: FakeStore | None = None) -> None:
        self.db = Database(str(path))
        self.db.migrate()
        self.queue = JobQueue(self.db, RetryPolicy(max_attempts=max_attempts, base_delay=0.0, max_delay=0.0))
        self.events = EventLog(self.db)
        self.tracker = Tracker(self.db)
        self.routes: dict[str, HarvestRouting] = {}
        self.ingest = Ingest(self.db, self.queue, self.tracker, self.events, self.routes.get,
                             lambda aet: aet if aet == "SRC" else None)
        self.store = store if store is not None else FakeStore()
        # A REST upload has no calling AET (the harvester stores unpacked MIM session objects so).
        self.store.on_upload = lambda oid, data: self.on_stored(oid, data, "")
        cap = capability or SourceCapability(relational=True, sequence_return_keys=False,
                                             instance_return_keys=True)
        self.source = FakeSource(datasets, cap)
        self.backend = FakeBackend("SRC", self.source, self.store, lambda o, d, a: self.on_stored(o, d, a))
        access = SourceAccess("SRC", self.backend, cap, find_timeout=5.0, move_timeout=5.0)
        self.harvester = Harvester(self.queue, self.tracker, self.events, self.ingest, self.store, {"SRC": access},
                                   self.routes.get, workers=1, lease_seconds=60.0)

    def on_stored(self, orthanc_id: str, data: bytes, aet: str) -> None:
        """Orthanc's OnStoredInstance (replace to inject failures)."""
        self.ingest.on_stored(orthanc_id, data, aet)

    def start(self, window: HarvestWindow) -> str:
        """Create a harvest of ``window`` at SRC with its seed jobs; returns its id."""

        def seed(harvest_id: str) -> list[EnqueueItem]:
            self.routes[harvest_id] = routing = HarvestRouting(harvest_id, window, "SRC", ("SRC",))
            return [job_for(routing, op) for op in start_operations(HarvestContext(window, harvest_id))]

        return self.queue.create_harvest("SRC", "", {"LookupSources": ["SRC"], "Window": window.to_dict()},
                                         seed=seed).id

    def candidates_in_store(self, harvest_id: str) -> set[str]:
        """Instances the harvest moved in only to inspect, rejected, kept by no harvest, still stored."""
        kept = {o.sop_uid for o in self.tracker.objects(None, Decision.KEPT)}
        return {o.sop_uid for o in self.tracker.objects(harvest_id, Decision.REJECTED)
                if o.moved and o.sop_uid not in kept and self.store.holds(o.sop_uid)}

    def completed(self, harvest_id: str) -> bool:
        """What REST shows as ``Completed``: finished and cleaned up."""
        return (self.queue.get_harvest(harvest_id).state.value == "Completed"
                and self.tracker.cleanup_done(harvest_id))

    def run(self, max_jobs: int = 10_000, owner: str = "test:1:w0") -> int:
        """Claim and run jobs on this thread until none is due; returns how many ran."""
        ran = 0
        while ran < max_jobs:
            job = self.queue.claim(owner, 60.0)
            if job is None:
                return ran
            self.harvester.run(job, owner)
            ran += 1
        raise AssertionError(f"still jobs after {max_jobs} runs")

    def finish(self) -> None:
        """What the maintenance thread does: provenance, then the end-of-harvest clean-up."""
        while self.harvester.provenance.write():
            pass
        self.harvester.cleanup.finish()

    def close(self) -> None:
        """Close the database."""
        self.db.close()

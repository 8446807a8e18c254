"""The harvester's own store, reached over loopback HTTP (never a long ``orthanc.*`` call: the GIL trap).

Metadata reads and writes may go in process instead (:class:`InProcessMetadata`): each is one short index
transaction. Over loopback HTTP each also costs an HTTP request parsed on both sides and a pass through the
Python authorization filter, which needs the GIL too (when provenance was six of them per instance, about a
fifth of the harvester's CPU per instance in ``benchmarks/harvest_vs_wire.py``; it is now written per
series where it is uniform, see :mod:`rtharvest.core.provenance`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.provenance import StoredSeries, resolve
from .loopback import LoopbackClient, LoopbackError

#: SOP Instance UIDs per ``/tools/find`` of :meth:`OrthancLocalStore.lookup_many` (a UID is at most 64
#: characters: one request body stays small, and the index answers a list match with one look-up each).
LOOKUP_BATCH = 100


@dataclass(frozen=True)
class InProcessMetadata:
    """Orthanc's REST API called in process (``orthanc.RestApiGet``/``RestApiPut``, see :mod:`rtharvest.edge.sdk`),
    for metadata only: calls that hold the GIL for one short index transaction, never for network waits.

    Provenance goes through it too: ``/instances/{id}/series`` and series metadata are index reads and
    writes of the same size.

    ``get_json(uri)`` returns the parsed answer and ``put(uri, body)`` writes; both raise ``LookupError`` for a
    missing resource.
    """

    get_json: Callable[[str], Any]
    put: Callable[[str, str], None]


class OrthancLocalStore:
    """:class:`rtharvest.harvest.harvester.LocalStore` on Orthanc's REST API (metadata in process when given
    ``in_process``, everything else over loopback HTTP)."""

    def __init__(self, client: LoopbackClient, in_process: InProcessMetadata | None = None) -> None:
        self.client = client
        self.in_process = in_process

    def lookup(self, sop_uid: str) -> str | None:
        """Orthanc ID of the stored instance, or None.

        One ``/tools/find`` at instance level (an indexed match of the identifier), not ``/tools/lookup``,
        which looks the UID up at every level: measured on a harvester holding 30,000 instances, median
        13 ms against 28 ms per call, and a worker makes one per job.
        """
        found = self.client.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
        return str(found[0]) if found else None

    def lookup_many(self, sop_uids: Sequence[str]) -> dict[str, str]:
        """SOPInstanceUID → Orthanc ID of those of ``sop_uids`` that are stored, in batches of
        :data:`LOOKUP_BATCH` (one ``/tools/find`` each: a backslash-separated value is DICOM's list of UID
        matching, which Orthanc answers from its index)."""
        wanted = sorted(set(sop_uids))
        result: dict[str, str] = {}
        for start in range(0, len(wanted), LOOKUP_BATCH):
            batch = wanted[start:start + LOOKUP_BATCH]
            found = self.client.post("/tools/find", {"Level": "Instance", "Expand": True,
                                                     "Query": {"SOPInstanceUID": "\\".join(batch)}})
            for entry in found or []:
                uid = entry.get("MainDicomTags", {}).get("SOPInstanceUID")
                if uid in batch:
                    result[str(uid)] = str(entry["ID"])
        return result

    def series_instances(self, series_uid: str) -> dict[str, str]:
        """SOPInstanceUID → Orthanc ID of the stored instances of a series (one index query)."""
        found = self.client.post("/tools/find", {"Level": "Instance", "Expand": True,
                                                 "Query": {"SeriesInstanceUID": series_uid}})
        result: dict[str, str] = {}
        for entry in found or []:
            uid = entry.get("MainDicomTags", {}).get("SOPInstanceUID")
            if uid:
                result[str(uid)] = str(entry["ID"])
        return result

    def read(self, orthanc_id: str) -> bytes:
        """The stored DICOM file."""
        return self.client.get_instance_file(orthanc_id)

    def _get_json(self, uri: str) -> Any:
        """GET in process when possible; ``LookupError`` when the resource is gone."""
        if self.in_process is not None:
            return self.in_process.get_json(uri)
        try:
            return self.client.get(uri)
        except LoopbackError as exc:
            if exc.status == 404:
                raise LookupError(f"{uri} is not stored") from None
            raise

    def _put(self, uri: str, value: str) -> None:
        if self.in_process is not None:
            self.in_process.put(uri, value)
            return
        try:
            self.client.request("PUT", uri, raw=value, content_type="text/plain")
        except LoopbackError as exc:
            if exc.status == 404:
                raise LookupError(f"{uri} is not stored") from None
            raise

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        """All metadata of an instance; ``LookupError`` when the instance is gone."""
        found = self._get_json(f"/instances/{orthanc_id}/metadata?expand")
        return {str(k): str(v) for k, v in (found or {}).items()}

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        """Write one metadata value of an instance (``LookupError`` when the instance is gone)."""
        self._put(f"/instances/{orthanc_id}/metadata/{name}", value)

    def series_of(self, orthanc_id: str) -> StoredSeries:
        """The series of a stored instance (``LookupError`` when the instance is gone)."""
        found = self._get_json(f"/instances/{orthanc_id}/series")
        return StoredSeries(str(found["ID"]), frozenset(str(i) for i in found.get("Instances", ())))

    def series_metadata(self, series_id: str) -> dict[str, str]:
        """All metadata of a series; ``LookupError`` when the series is gone."""
        found = self._get_json(f"/series/{series_id}/metadata?expand")
        return {str(k): str(v) for k, v in (found or {}).items()}

    def set_series_metadata(self, series_id: str, name: str, value: str) -> None:
        """Write one metadata value of a series (``LookupError`` when the series is gone)."""
        self._put(f"/series/{series_id}/metadata/{name}", value)

    def provenance(self, orthanc_id: str) -> dict[str, str]:
        """An instance's provenance resolved instance → series (empty when it has none)."""
        own = self.metadata(orthanc_id)
        if own.get("HarvestId"):
            return resolve(own, {})
        return resolve(own, self.series_metadata(self.series_of(orthanc_id).orthanc_id))

    def upload(self, data: bytes) -> str:
        """Store a DICOM file (``POST /instances``; OnStoredInstance runs before this returns); its Orthanc ID."""
        answer = self.client.request("POST", "/instances", raw=data, content_type="application/dicom")
        return str(answer["ID"])

    def delete(self, orthanc_id: str) -> None:
        """Remove an instance from the store (missing is fine)."""
        self.client.delete_instance(orthanc_id)

"""The harvester's own store, reached over loopback HTTP (never a long ``orthanc.*`` call: the GIL trap).

Metadata reads and writes may go in process instead (:class:`InProcessMetadata`): each is one short index
transaction, and the provenance writer makes six of them per harvested instance. Over loopback HTTP each
also costs an HTTP request parsed on both sides and a pass through the Python authorization filter, which
needs the GIL too: about a fifth of the harvester's CPU per instance in ``benchmarks/harvest_vs_wire.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .loopback import LoopbackClient, LoopbackError

#: SOP Instance UIDs per ``/tools/find`` of :meth:`OrthancLocalStore.lookup_many` (a UID is at most 64
#: characters: one request body stays small, and the index answers a list match with one look-up each).
LOOKUP_BATCH = 100


@dataclass(frozen=True)
class InProcessMetadata:
    """Orthanc's REST API called in process (``orthanc.RestApiGet``/``RestApiPut``, see :mod:`rtharvest.sdk`),
    for metadata only: calls that hold the GIL for one short index transaction, never for network waits.

    ``get_json(uri)`` returns the parsed answer and ``put(uri, body)`` writes; both raise ``LookupError`` for a
    missing resource.
    """

    get_json: Callable[[str], Any]
    put: Callable[[str, str], None]


class OrthancLocalStore:
    """:class:`rtharvest.harvester.LocalStore` on Orthanc's REST API (metadata in process when given
    ``in_process``, everything else over loopback HTTP)."""

    def __init__(self, client: LoopbackClient, in_process: InProcessMetadata | None = None) -> None:
        self.client = client
        self.in_process = in_process

    def lookup(self, sop_uid: str) -> str | None:
        """Orthanc ID of the stored instance, or None."""
        return self.client.find_instance(sop_uid)

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

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        """All metadata of an instance; ``LookupError`` when the instance is gone."""
        if self.in_process is not None:
            found = self.in_process.get_json(f"/instances/{orthanc_id}/metadata?expand")
            return {str(k): str(v) for k, v in (found or {}).items()}
        try:
            found = self.client.get(f"/instances/{orthanc_id}/metadata?expand")
        except LoopbackError as exc:
            if exc.status == 404:
                raise LookupError(f"instance {orthanc_id} is not stored") from None
            raise
        return {str(k): str(v) for k, v in (found or {}).items()}

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        """Write one metadata value (``LookupError`` when the instance is gone, in process)."""
        if self.in_process is not None:
            self.in_process.put(f"/instances/{orthanc_id}/metadata/{name}", value)
            return
        self.client.set_metadata(orthanc_id, name, value)

    def upload(self, data: bytes) -> str:
        """Store a DICOM file (``POST /instances``; OnStoredInstance runs before this returns); its Orthanc ID."""
        answer = self.client.request("POST", "/instances", raw=data, content_type="application/dicom")
        return str(answer["ID"])

    def delete(self, orthanc_id: str) -> None:
        """Remove an instance from the store (missing is fine)."""
        self.client.delete_instance(orthanc_id)

"""The harvester's own store, reached over loopback HTTP (never ``orthanc.*``: the GIL trap)."""

from __future__ import annotations

from collections.abc import Sequence

from .loopback import LoopbackClient, LoopbackError

#: SOP Instance UIDs per ``/tools/find`` of :meth:`OrthancLocalStore.lookup_many` (a UID is at most 64
#: characters: one request body stays small, and the index answers a list match with one look-up each).
LOOKUP_BATCH = 100


class OrthancLocalStore:
    """:class:`rtharvest.harvester.LocalStore` on Orthanc's REST API."""

    def __init__(self, client: LoopbackClient) -> None:
        self.client = client

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
        try:
            found = self.client.get(f"/instances/{orthanc_id}/metadata?expand")
        except LoopbackError as exc:
            if exc.status == 404:
                raise LookupError(f"instance {orthanc_id} is not stored") from None
            raise
        return {str(k): str(v) for k, v in (found or {}).items()}

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        """Write one metadata value."""
        self.client.set_metadata(orthanc_id, name, value)

    def upload(self, data: bytes) -> str:
        """Store a DICOM file (``POST /instances``; OnStoredInstance runs before this returns); its Orthanc ID."""
        answer = self.client.request("POST", "/instances", raw=data, content_type="application/dicom")
        return str(answer["ID"])

    def delete(self, orthanc_id: str) -> None:
        """Remove an instance from the store (missing is fine)."""
        self.client.delete_instance(orthanc_id)

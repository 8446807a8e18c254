"""Backend driving Orthanc's own DICOM client (``DicomModalities``) through its REST API on loopback.

Every call is an HTTP request to the harvester on 127.0.0.1 (:class:`~rtharvest.edge.loopback.LoopbackClient`),
never ``orthanc.RestApi*``: the Python plugin holds the GIL for the whole of such a call, which would
freeze the OnStoredInstance callback of the very instances a move brings in (docs/platform.md, "The GIL trap").

Requests:

* echo: ``POST /modalities/{m}/echo``.
* find: ``POST /modalities/{m}/query {"Level", "Query", "Normalize": false}``, then
  ``GET /queries/{id}/answers?expand`` (the *non*-simplified form: it keeps sequences as nested
  tag maps and names each tag, so the answer is mapped tag by tag to keywords with the same value
  conventions as the pynetdicom backend; ``simplify`` would flatten that), then ``DELETE /queries/{id}``
  (Orthanc keeps only ``QueryRetrieveSize`` queries; deleting ours avoids evicting someone else's).
  ``"Normalize": false`` makes Orthanc send keys that are not "allowed" at the level (FrameOfReferenceUID,
  Modality at IMAGE level, TreatmentDate...) instead of silently dropping them and returning a superset.
* move: ``POST /modalities/{m}/move`` — synchronous in Orthanc 1.10.1 (``Asynchronous`` is ignored), fine
  here because the HTTP wait releases the GIL. It needs the full Study/Series/SOP hierarchy. Orthanc's
  answer is ``{}``: no sub-operation counts, so :class:`MoveResult` carries :data:`UNKNOWN_COUNT` and the
  caller verifies arrival (it must anyway).

What the Orthanc client always adds, whatever we ask: PatientID, AccessionNumber and SpecificCharacterSet
(plus MediaStorageSOPInstanceUID, StudyInstanceUID and SeriesInstanceUID at IMAGE level). Answers
therefore contain those keys too, and a strict hierarchical SCP (dcmqrscp ``-XF -XM``) refuses every
query below STUDY level with 0xA900 — use the pynetdicom backend for those.

Sequence keys: Orthanc's ``Query`` takes strings only, so ``supports_sequence_keys`` is False and a
sequence keyword in ``keys`` raises :class:`SourceError` (BAD_REQUEST) instead of being dropped — a silently
missing sequence would look like "no reference" to the planner.

Observed with Orthanc 1.10.1 as the client (tests/dimse/test_via_orthanc.py asserts each row):

====================  =======================  =======================  ===========================
source                IMAGE find by            FrameOfReferenceUID      IMAGE move of an unknown
                      SOPInstanceUID alone     at IMAGE level           SOP UID
====================  =======================  =======================  ===========================
Orthanc (plain)       found                    returned and matched     HTTP 422, DIMSE 0xC000 →
                                                                        FAILURE_STATUS (≤ 3 tries)
dcmqrscp (default)    found (Orthanc adds the  not returned; matching   HTTP 200 ``{}``: success,
                      empty Study/Series keys  ignored (superset)       nothing sent → MoveResult
                      dcmqrscp needs)
pynetdicom qrscp      found (same)             not returned; ignored    HTTP 200 ``{}`` (same)
dcmqrscp -XF -XM      0xA900 → BAD_REQUEST     (every SERIES/IMAGE      IMAGE/SERIES moves work (the
                                               find refused: 0xA900)    move identifier is clean);
                                                                        PATIENT move → 0xA900
====================  =======================  =======================  ===========================

STUDY and PATIENT finds work on all four. Also seen: a PATIENT-level move through Orthanc to
pynetdicom's qrscp answers 0xA801 (the pynetdicom backend's PATIENT move there succeeds).

Orthanc's errors and how they map: HTTP 404 (unknown modality) → NOT_FOUND; 400 (e.g. move without the
hierarchy) → BAD_REQUEST; 422/500 whose ``Details`` carry ``DIMSE status 0xNNNN`` → :func:`classify_status`;
"TCP Initialization Error" → UNREACHABLE; "Association Rejected" / "Peer aborted Association" → REFUSED;
"DIMSE No data available (timeout...)" or our HTTP timeout → TIMEOUT; anything else → PROTOCOL.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from ..edge.loopback import LoopbackClient, LoopbackError
from .base import (
    UNKNOWN_COUNT,
    FindAnswer,
    InstanceKey,
    MoveResult,
    QueryLevel,
    SourceError,
    SourceErrorKind,
    Timeouts,
    check_instance_keys,
    check_move_arguments,
    is_multi_valued,
    keyword_of,
    tag_of,
    vr_of,
)

__all__ = ["OrthancRestBackend"]

_ORTHANC_LEVEL = {
    QueryLevel.PATIENT: "Patient",
    QueryLevel.STUDY: "Study",
    QueryLevel.SERIES: "Series",
    QueryLevel.IMAGE: "Instance",
}

_DIMSE_STATUS = re.compile(r"DIMSE status 0x([0-9A-Fa-f]{4})")

#: Extra seconds the HTTP call waits beyond the DICOM deadline, so Orthanc's own error wins the race.
_HTTP_MARGIN = 10.0


class OrthancRestBackend:
    """C-ECHO/C-FIND/C-MOVE through the harvester's REST API (``/modalities/{modality}/...``).

    Args:
        client: REST client of the harvester itself (loopback).
        modality: the source's name in the harvester's ``DicomModalities``.
        harvester_aet: move destination (the harvester's own ``DicomAet``).
        timeouts: default deadlines when a call gives none.
    """

    supports_sequence_keys = False

    def __init__(self, client: LoopbackClient, modality: str, harvester_aet: str, *,
                 timeouts: Timeouts | None = None) -> None:
        self.client = client
        self.name = modality
        self.harvester_aet = harvester_aet
        self.timeouts = timeouts or Timeouts()
        self._path = f"/modalities/{urllib.parse.quote(modality, safe='')}"

    def __repr__(self) -> str:
        return f"OrthancRestBackend({self.name!r} -> {self.harvester_aet!r})"

    # --- operations ----------------------------------------------------------------------------------

    def echo(self) -> None:
        """C-ECHO the source through Orthanc."""
        timeout = self.timeouts.echo
        self._call("echo", "POST", f"{self._path}/echo", {"Timeout": _orthanc_timeout(timeout)}, timeout)

    def find(self, level: QueryLevel, keys: Mapping[str, Any], *, timeout: float | None = None) -> list[FindAnswer]:
        """C-FIND at ``level``; see the module docstring for what Orthanc adds and how answers are mapped."""
        level = QueryLevel(level)
        operation = f"find {level.value}"
        timeout = self.timeouts.find if timeout is None else timeout
        query = {keyword: self._query_value(keyword, value, operation) for keyword, value in keys.items()}
        body = {"Level": _ORTHANC_LEVEL[level], "Query": query, "Normalize": False,
                "Timeout": _orthanc_timeout(timeout)}
        created = self._call(operation, "POST", f"{self._path}/query", body, timeout)
        query_id = created.get("ID") if isinstance(created, dict) else None
        if not query_id:
            raise SourceError(SourceErrorKind.PROTOCOL, f"Orthanc answered the query without an ID: {created!r}",
                              source=self.name, operation=operation)
        query_path = f"/queries/{urllib.parse.quote(str(query_id), safe='')}"
        try:
            raw = self._call(operation, "GET", f"{query_path}/answers?expand", None, self.client.timeout)
        finally:
            try:
                self.client.delete(query_path)
            except LoopbackError:
                pass  # Orthanc evicts old queries by itself; losing this clean-up is harmless.
        if not isinstance(raw, list):
            raise SourceError(SourceErrorKind.PROTOCOL, f"unexpected answers from Orthanc: {type(raw).__name__}",
                              source=self.name, operation=operation)
        return [_answer_from_orthanc(item) for item in raw if isinstance(item, dict)]

    def move(self, level: QueryLevel, *, patient_id: str | None, study_uid: str, series_uid: str | None = None,
             sop_uids: Sequence[str] = (), timeout: float | None = None) -> MoveResult:
        """C-MOVE to the harvester; Orthanc issues one C-MOVE per resource on one association.

        ``patient_id`` is used at PATIENT level only (Study Root identifiers carry no patient keys).
        """
        level = QueryLevel(level)
        check_move_arguments(level, source=self.name, patient_id=patient_id, study_uid=study_uid,
                             series_uid=series_uid, sop_uids=sop_uids)
        timeout = self.timeouts.move if timeout is None else timeout
        resources: list[dict[str, str]]
        if level is QueryLevel.PATIENT:
            resources = [{"PatientID": str(patient_id)}]
        elif level is QueryLevel.STUDY:
            resources = [{"StudyInstanceUID": study_uid}]
        elif level is QueryLevel.SERIES:
            resources = [{"StudyInstanceUID": study_uid, "SeriesInstanceUID": str(series_uid)}]
        else:
            return self.move_instances([InstanceKey(study_uid, str(series_uid), sop) for sop in sop_uids],
                                       timeout=timeout)
        return self._move(level, resources, timeout)

    def move_instances(self, instances: Sequence[InstanceKey], *, timeout: float | None = None) -> MoveResult:
        """IMAGE-level C-MOVEs of instances of any series: one call, so one association (Orthanc's move
        job keeps its connection for all its resources)."""
        check_instance_keys(instances, source=self.name)
        timeout = self.timeouts.move if timeout is None else timeout
        resources = [{"StudyInstanceUID": key.study_uid, "SeriesInstanceUID": key.series_uid,
                      "SOPInstanceUID": key.sop_uid} for key in instances]
        return self._move(QueryLevel.IMAGE, resources, timeout)

    def _move(self, level: QueryLevel, resources: list[dict[str, str]], timeout: float) -> MoveResult:
        body = {"Level": _ORTHANC_LEVEL[level], "Resources": resources, "TargetAet": self.harvester_aet,
                "Timeout": _orthanc_timeout(timeout)}
        self._call(f"move {level.value}", "POST", f"{self._path}/move", body, timeout)
        return MoveResult(status=0x0000, completed=UNKNOWN_COUNT, failed=UNKNOWN_COUNT, warning=UNKNOWN_COUNT)

    # --- helpers -------------------------------------------------------------------------------------

    def _query_value(self, keyword: str, value: Any, operation: str) -> str:
        tag = tag_of(keyword)
        if tag is not None and vr_of(tag) == "SQ":
            raise SourceError(SourceErrorKind.BAD_REQUEST,
                              f"sequence key {keyword} cannot be sent through Orthanc's C-FIND client; "
                              "configure this source with Backend \"pynetdicom\" to use sequence return keys",
                              source=self.name, operation=operation)
        if value is None:
            return ""
        if isinstance(value, list | tuple):
            # UID-list (or multi-value) matching: DICOM's backslash-separated form.
            return "\\".join(str(v) for v in value)
        return str(value)

    def _call(self, operation: str, method: str, path: str, body: Any, timeout: float) -> Any:
        try:
            return self.client.request(method, path, body, timeout=timeout + _HTTP_MARGIN)
        except LoopbackError as exc:
            raise self._error(operation, exc, timeout) from exc

    def _error(self, operation: str, exc: LoopbackError, timeout: float) -> SourceError:
        def err(kind: SourceErrorKind, detail: str, **kw: Any) -> SourceError:
            return SourceError(kind, detail, source=self.name, operation=operation, **kw)

        details = exc.message
        if isinstance(exc.body, dict) and exc.body.get("Details"):
            details = str(exc.body["Details"])
        if exc.status == 0:
            if exc.timed_out:
                # Orthanc may still be running the operation: a synchronous REST move cannot be cancelled.
                return err(SourceErrorKind.TIMEOUT, f"no answer from the harvester's REST API within "
                           f"{timeout + _HTTP_MARGIN:g} s")
            return err(SourceErrorKind.PROTOCOL, f"harvester REST API unreachable: {exc.message}", retryable=True)
        if exc.status == 404:
            return err(SourceErrorKind.NOT_FOUND, f"the harvester does not know modality {self.name!r} "
                       f"(DicomModalities): {details}", retryable=False)
        if exc.status in (401, 403):
            return err(SourceErrorKind.PROTOCOL, f"the harvester refused the loopback credential (HTTP {exc.status})",
                       retryable=False)
        if exc.status == 400:
            return err(SourceErrorKind.BAD_REQUEST, f"Orthanc rejected the request (HTTP 400): {details}")
        match = _DIMSE_STATUS.search(details)
        if match:
            status = int(match.group(1), 16)
            return SourceError.from_status(status, source=self.name, operation=operation,
                                           detail=f"Orthanc: {details}")
        lowered = details.lower()
        if "tcp initialization error" in lowered or "connection refused" in lowered:
            return err(SourceErrorKind.UNREACHABLE, f"cannot connect: {details}")
        if any(s in lowered for s in ("tcp i/o error", "connection reset", "broken pipe", "connection timed out")):
            # The source went away mid-association (killed, restarted, network drop): transient, retried up
            # to MaxAttempts like an unreachable source, not bounded like an unexplained failure.
            return err(SourceErrorKind.UNREACHABLE, f"connection lost: {details}")
        if "association rejected" in lowered:
            return err(SourceErrorKind.REFUSED, f"association rejected: {details}")
        if "aborted" in lowered:
            return err(SourceErrorKind.REFUSED, f"association aborted: {details}")
        if "timeout" in lowered or "timed out" in lowered:
            return err(SourceErrorKind.TIMEOUT, f"no answer within the DICOM timeout: {details}")
        return err(SourceErrorKind.PROTOCOL, f"HTTP {exc.status}: {details}", retryable=True, retry_limit=3)


def _orthanc_timeout(timeout: float) -> int:
    # Measured on 1.10.1: with a silent peer, Orthanc gives up after about twice its "Timeout" (a DIMSE
    # timeout per message, applied twice on the way). Half the deadline keeps the whole call near it.
    # It is an integer number of seconds, at least 1.
    return max(1, math.ceil(timeout / 2))


def _answer_from_orthanc(item: Mapping[str, Any]) -> FindAnswer:
    """Map Orthanc's non-simplified answer ``{"0008,0018": {"Name", "Type", "Value"}}`` to keywords."""
    answer: FindAnswer = {}
    for tag_text, entry in item.items():
        tag = tag_of(tag_text)
        keyword = keyword_of(tag) if tag is not None else tag_text
        if not isinstance(entry, Mapping):
            continue
        kind = entry.get("Type")
        value = entry.get("Value")
        if kind == "Sequence":
            answer[keyword] = [_answer_from_orthanc(sub) for sub in (value or []) if isinstance(sub, Mapping)]
        elif kind == "String":
            text = str(value)
            answer[keyword] = _split(text) if tag is not None and is_multi_valued(tag) else text
        elif kind == "Null":
            answer[keyword] = [] if tag is not None and is_multi_valued(tag) else ""
        # "TooLong" and "Binary" values are not useful in a C-FIND answer: left out.
    return answer


def _split(text: str) -> list[str]:
    return text.split("\\") if text else []

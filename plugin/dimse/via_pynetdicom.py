"""Backend speaking DICOM itself with pynetdicom: strict hierarchical sources and sequence return keys.

Why this backend exists next to Orthanc's client: Orthanc always adds PatientID, AccessionNumber,
SpecificCharacterSet (and more at IMAGE level) to its C-FIND requests, which strict hierarchical SCPs
refuse (dcmqrscp ``-XF -XM`` answers 0xA900 below STUDY level), and it cannot send a sequence as a return
key. Here the identifier holds exactly the keys the caller gives plus QueryRetrieveLevel — so the caller
decides what a strict source sees (Study + Series + SOP UIDs at IMAGE level) — and ``[]`` for a sequence
keyword is sent as an empty sequence ("return this sequence", what ARIA-like relational SCPs answer).

Design:

* **One association per operation.** Clinical SCPs drop idle associations (and some allow very few at
  once); holding one open between queue jobs would fail at random and hog a slot. A fresh association
  per echo/find/move costs a few milliseconds on a LAN.
* Models: C-FIND Patient Root for PATIENT, Study Root for STUDY/SERIES/IMAGE; C-MOVE Study Root (Patient
  Root at PATIENT level) with the move destination = the harvester's AET. Identifiers carry the unique
  keys of each level above the retrieve level and nothing else (Study Root has no patient level). An
  IMAGE-level move of several SOP UIDs is one C-MOVE per UID on the same association (UID lists in a
  C-MOVE identifier are optional for SCPs; one request per instance works everywhere).
* **Timeouts**: one deadline per operation. When it passes we send C-CANCEL (the polite way, the SCP
  answers 0xFE00); if the SCP is still silent a few seconds later pynetdicom's DIMSE timeout aborts the
  association. Either way the caller gets SourceError(TIMEOUT).
* Errors: TCP connect failure → UNREACHABLE; A-ASSOCIATE-RJ → REFUSED (retryable only when the
  rejection is "transient"); abort or no accepted presentation context → REFUSED / BAD_REQUEST; ACSE or
  DIMSE timeout → TIMEOUT; failure statuses → :func:`~rtharvest.dimse.statuses.classify_status`.
* Runs in worker threads: pynetdicom's socket waits release the GIL, so Orthanc's callbacks keep running.

Observed with this backend (tests/dimse/test_via_pynetdicom.py asserts each cell):

=================  ===============  ==============  ===================  ==================  ==================
source             IMAGE: SOP UID   IMAGE: SOP UID  FrameOfReferenceUID  empty Referenced-   C-MOVE of an
                   + empty Study/   strictly alone  (hierarchical keys)  RTPlanSequence key  unknown SOP UID
                   Series keys                                           on an RTDOSE
=================  ===============  ==============  ===================  ==================  ==================
Orthanc (plain)    found            found           returned, matched    returned with its   0xC000 → FAILURE_
                                                                         items (no matching  STATUS (≤ 3 tries)
                                                                         inside sequences)
dcmqrscp           found            0xC000          not returned,        not returned        success,
                                                    match ignored                            0 completed
dcmqrscp -XF -XM   0xA900           0xA900          not returned,        not returned        success,
                                                    match ignored                            0 completed
pynetdicom qrscp   found            0xA900          not returned,        not returned        success,
                                                    match ignored                            0 completed
=================  ===============  ==============  ===================  ==================  ==================

So a *relational* look-up by SOP UID must carry ``StudyInstanceUID: ""`` and ``SeriesInstanceUID: ""``
(:func:`~rtharvest.dimse.base.sop_lookup_keys`): only Orthanc accepts the SOP UID strictly alone. A strict
source needs the real Study and Series UIDs, and refuses keys of other levels (``Modality`` at IMAGE level
→ 0xA900, while ``InstanceNumber`` or ``FrameOfReferenceUID`` pass). Sequence return keys are only useful
against sources that implement them (Orthanc here, ARIA-like relational SCPs in clinics); the others
silently leave them out, so an absent key means "not supported", not "empty".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from ..edge.config import Modality
from .base import (
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
from .statuses import CANCEL, classify_status, is_pending, is_warning
from .tcp import no_delay

__all__ = ["PynetdicomBackend", "answer_from_dataset", "identifier_from_keys"]

#: Seconds an SCP gets to answer our C-CANCEL before the association is aborted.
CANCEL_GRACE = 5.0

_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_BINARY_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "AT"})
_BINARY_FLOAT_VRS = frozenset({"FL", "FD"})


class PynetdicomBackend:
    """C-ECHO/C-FIND/C-MOVE with pynetdicom, one association per operation.

    Args:
        modality: the source (name, AE title, host, port) from the harvester's DicomModalities.
        calling_aet: our AE title — the harvester's, which the source knows.
        max_pdu: the largest PDU we accept (0: unlimited).
        timeouts: connect/ACSE deadlines and default find/move deadlines.
        move_destination: AE title the source sends moved instances to (default: ``calling_aet``).
    """

    supports_sequence_keys = True

    def __init__(self, modality: Modality, calling_aet: str, *, max_pdu: int = 65536,
                 timeouts: Timeouts | None = None, move_destination: str | None = None) -> None:
        self.modality = modality
        self.name = modality.name
        self.calling_aet = calling_aet
        self.max_pdu = max_pdu
        self.timeouts = timeouts or Timeouts()
        self.move_destination = move_destination or calling_aet

    def __repr__(self) -> str:
        m = self.modality
        return f"PynetdicomBackend({self.name!r}: {m.aet}@{m.host}:{m.port} as {self.calling_aet!r})"

    # --- operations ----------------------------------------------------------------------------------

    def echo(self) -> None:
        """C-ECHO the source."""
        timeout = self.timeouts.echo
        with self._association("echo", Verification, timeout) as assoc:
            status = assoc.send_c_echo()
            if not status or "Status" not in status:
                raise self._lost(assoc, "echo", timed_out=False)
            code = int(status.Status)
            kind, _ = classify_status(code)
            if kind is not None:
                raise SourceError.from_status(code, source=self.name, operation="echo")

    def find(self, level: QueryLevel, keys: Mapping[str, Any], *, timeout: float | None = None) -> list[FindAnswer]:
        """C-FIND at ``level`` with exactly ``keys`` (plus QueryRetrieveLevel); every answer.

        A sequence keyword with ``[]`` is sent as an empty sequence (return key); with ``[{...}]`` as an
        item of nested matching/return keys.
        """
        level = QueryLevel(level)
        operation = f"find {level.value}"
        identifier = identifier_from_keys(level, keys, source=self.name, operation=operation)
        model = PatientRootQueryRetrieveInformationModelFind if level is QueryLevel.PATIENT \
            else StudyRootQueryRetrieveInformationModelFind
        timeout = self.timeouts.find if timeout is None else timeout
        answers: list[FindAnswer] = []
        with self._association(operation, model, timeout) as assoc, _Deadline(assoc, model, timeout) as deadline:
            for status, found in assoc.send_c_find(identifier, model, msg_id=deadline.msg_id):
                if not status or "Status" not in status:
                    raise self._lost(assoc, operation, timed_out=deadline.fired)
                code = int(status.Status)
                if is_pending(code):
                    if found is not None:
                        answers.append(answer_from_dataset(found))
                    deadline.check()
                    continue
                if code == CANCEL and deadline.fired:
                    raise self._timeout(operation, timeout, cancelled=True)
                kind, _ = classify_status(code)
                if kind is not None:
                    raise SourceError.from_status(code, source=self.name, operation=operation,
                                                  detail=f"after {len(answers)} answer(s)")
                break  # success or warning: final response
        return answers

    def move(self, level: QueryLevel, *, patient_id: str | None, study_uid: str, series_uid: str | None = None,
             sop_uids: Sequence[str] = (), timeout: float | None = None) -> MoveResult:
        """C-MOVE to :attr:`move_destination`; counts are the source's claims (verify arrival).

        ``patient_id`` is sent at PATIENT level only. At IMAGE level each SOP UID is its own C-MOVE on
        one association; a failure of one does not stop the others, and the first failure is raised at
        the end with the summed counts in ``SourceError.result``.
        """
        level = QueryLevel(level)
        check_move_arguments(level, source=self.name, patient_id=patient_id, study_uid=study_uid,
                             series_uid=series_uid, sop_uids=sop_uids)
        if level is QueryLevel.IMAGE:
            return self.move_instances([InstanceKey(study_uid, str(series_uid), sop) for sop in sop_uids],
                                       timeout=timeout)
        model = PatientRootQueryRetrieveInformationModelMove if level is QueryLevel.PATIENT \
            else StudyRootQueryRetrieveInformationModelMove
        return self._send_moves(level, model, _move_identifiers(level, patient_id, study_uid, series_uid), timeout)

    def move_instances(self, instances: Sequence[InstanceKey], *, timeout: float | None = None) -> MoveResult:
        """IMAGE-level C-MOVEs of instances of any series, each its own request on one association; failures
        as in :meth:`move`."""
        check_instance_keys(instances, source=self.name)
        identifiers = []
        for key in instances:
            ds = Dataset()
            ds.QueryRetrieveLevel = QueryLevel.IMAGE.value
            ds.StudyInstanceUID = key.study_uid
            ds.SeriesInstanceUID = key.series_uid
            ds.SOPInstanceUID = key.sop_uid
            identifiers.append(ds)
        return self._send_moves(QueryLevel.IMAGE, StudyRootQueryRetrieveInformationModelMove, identifiers, timeout)

    def _send_moves(self, level: QueryLevel, model: str, identifiers: Sequence[Dataset],
                    timeout: float | None) -> MoveResult:
        operation = f"move {level.value}"
        timeout = self.timeouts.move if timeout is None else timeout
        completed = failed = warning = 0
        failed_uids: list[str] = []
        worst_warning = 0x0000
        first_failure: int | None = None
        with self._association(operation, model, timeout) as assoc, _Deadline(assoc, model, timeout) as deadline:
            for number, identifier in enumerate(identifiers, start=1):
                deadline.msg_id = number
                final: Dataset | None = None
                final_identifier: Dataset | None = None
                for status, rsp_identifier in assoc.send_c_move(identifier, self.move_destination, model,
                                                                msg_id=number):
                    if not status or "Status" not in status:
                        raise self._lost(assoc, operation, timed_out=deadline.fired, result=MoveResult(
                            0x0000, completed, failed, warning, tuple(failed_uids)))
                    if is_pending(int(status.Status)):
                        deadline.check()
                        continue
                    final, final_identifier = status, rsp_identifier
                    break
                if final is None:  # pragma: no cover - pynetdicom always yields a final or an empty status
                    raise self._lost(assoc, operation, timed_out=deadline.fired)
                code = int(final.Status)
                completed += int(final.get("NumberOfCompletedSuboperations", 0) or 0)
                failed += int(final.get("NumberOfFailedSuboperations", 0) or 0)
                warning += int(final.get("NumberOfWarningSuboperations", 0) or 0)
                if final_identifier is not None and "FailedSOPInstanceUIDList" in final_identifier:
                    value = final_identifier.FailedSOPInstanceUIDList
                    failed_uids.extend(str(v) for v in (value if isinstance(value, MultiValue | list) else [value])
                                       if v)
                if code == CANCEL and deadline.fired:
                    raise self._timeout(operation, timeout, cancelled=True, result=MoveResult(
                        code, completed, failed, warning, tuple(failed_uids)))
                kind, retryable = classify_status(code)
                if kind is None:
                    if is_warning(code):
                        worst_warning = worst_warning or code
                    continue
                if first_failure is None:
                    first_failure = code
                if not retryable or kind is not SourceErrorKind.FAILURE_STATUS:
                    break  # e.g. 0xA801: every further request would fail the same way
        result = MoveResult(status=first_failure if first_failure is not None else worst_warning,
                            completed=completed, failed=failed, warning=warning, failed_sop_uids=tuple(failed_uids))
        if first_failure is not None:
            raise SourceError.from_status(first_failure, source=self.name, operation=operation, result=result,
                                          detail=f"{len(identifiers)} C-MOVE request(s); {completed} completed, "
                                                 f"{failed} failed before the failure")
        return result

    # --- association handling ------------------------------------------------------------------------

    @contextmanager
    def _association(self, operation: str, abstract_syntax: str, timeout: float) -> Iterator[Association]:
        """An association proposing only ``abstract_syntax``; released (or aborted) afterwards."""
        # A fresh AE per operation: its timeouts are copied into the association, and workers on other
        # threads may run other operations with other deadlines at the same time.
        ae = AE(ae_title=self.calling_aet)
        ae.add_requested_context(abstract_syntax, _TRANSFER_SYNTAXES)
        ae.connection_timeout = self.timeouts.connect
        ae.acse_timeout = self.timeouts.acse
        # Per DIMSE message; the whole-operation deadline is enforced by _Deadline (C-CANCEL first).
        ae.dimse_timeout = timeout + CANCEL_GRACE
        # Idle-socket timeout: never shorter than the operation (some SCPs send no pending responses).
        ae.network_timeout = timeout + 2 * CANCEL_GRACE
        connected: list[bool] = []
        received: list[Any] = []
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, lambda event: _on_connected(event, connected)),
            (evt.EVT_ACSE_RECV, lambda event: received.append(getattr(event, "primitive", None))),
        ]
        m = self.modality
        started = time.monotonic()
        assoc = ae.associate(m.host, m.port, ae_title=m.aet, max_pdu=self.max_pdu, evt_handlers=handlers)
        if not assoc.is_established:
            raise self._not_established(assoc, operation, connected=bool(connected), received=received,
                                        elapsed=time.monotonic() - started)
        try:
            yield assoc
        except BaseException as exc:
            if assoc.is_established:
                # After a complete DIMSE exchange (a failure status) a polite release; otherwise abort.
                if isinstance(exc, SourceError) and exc.dimse_status is not None \
                        and exc.kind is not SourceErrorKind.TIMEOUT:
                    assoc.release()
                else:
                    assoc.abort()
            raise
        else:
            if assoc.is_established:
                assoc.release()

    def _not_established(self, assoc: Association, operation: str, *, connected: bool, received: list[Any],
                         elapsed: float) -> SourceError:
        m = self.modality
        where = f"{m.aet}@{m.host}:{m.port}"

        def err(kind: SourceErrorKind, detail: str, **kw: Any) -> SourceError:
            return SourceError(kind, detail, source=self.name, operation=operation, **kw)

        if not connected:
            return err(SourceErrorKind.UNREACHABLE, f"cannot open a TCP connection to {where}")
        if assoc.is_rejected:
            reply = next((p for p in received if getattr(p, "result", None) in (1, 2)), None)
            transient = getattr(reply, "result", None) == 2
            reason = (f"{getattr(reply, 'result_str', '')}, {getattr(reply, 'source_str', '')}: "
                      f"{getattr(reply, 'reason_str', '')}") if reply is not None else "no reason given"
            return err(SourceErrorKind.REFUSED, f"association rejected by {where} as {self.calling_aet} ({reason})",
                       retryable=transient)
        accepted = next((p for p in received if getattr(p, "result", "x") is None
                         or getattr(p, "result", None) == 0), None)
        if accepted is not None:
            # The SCP accepted the association but none of our presentation contexts.
            return err(SourceErrorKind.BAD_REQUEST, f"{where} accepted no presentation context for this "
                       "operation (SOP class not supported)", retryable=False)
        if elapsed >= 0.9 * self.timeouts.acse:
            return err(SourceErrorKind.TIMEOUT, f"no association response from {where} within "
                       f"{self.timeouts.acse:g} s")
        return err(SourceErrorKind.REFUSED, f"association with {where} aborted during negotiation")

    def _lost(self, assoc: Association, operation: str, *, timed_out: bool,
              result: MoveResult | None = None) -> SourceError:
        if timed_out:
            return self._timeout(operation, None, cancelled=True, result=result)
        # The reactor is paused while responses are consumed, so ``is_aborted`` is not updated yet;
        # the ACSE provider tells whether an A-ABORT / A-P-ABORT arrived from the peer.
        if assoc.is_aborted or assoc.acse.is_aborted():
            return SourceError(SourceErrorKind.REFUSED, "the source aborted the association during the operation",
                               source=self.name, operation=operation, result=result)
        return SourceError(SourceErrorKind.PROTOCOL, "no valid DIMSE response (connection lost or malformed "
                           "message)", source=self.name, operation=operation, result=result, retryable=True,
                           retry_limit=3)

    def _timeout(self, operation: str, timeout: float | None, *, cancelled: bool,
                 result: MoveResult | None = None) -> SourceError:
        limit = f" within {timeout:g} s" if timeout is not None else " within the deadline"
        action = "; C-CANCEL sent" if cancelled else ""
        return SourceError(SourceErrorKind.TIMEOUT, f"no complete answer{limit}{action}", source=self.name,
                           operation=operation, result=result)


class _Deadline:
    """Sends C-CANCEL for the running request when the operation's deadline passes.

    A timer thread sends the cancel (the iterating thread may be blocked waiting for a response); the
    iterating thread calls :meth:`check` between responses and aborts the association when the SCP keeps
    streaming answers more than :data:`CANCEL_GRACE` seconds after the cancel.
    """

    def __init__(self, assoc: Association, abstract_syntax: str, timeout: float) -> None:
        self.assoc = assoc
        self.timeout = timeout
        self.msg_id = 1
        self.fired = False
        self._fired_at = 0.0
        self._context_id = next((cx.context_id for cx in assoc.accepted_contexts
                                 if cx.abstract_syntax == abstract_syntax), None)
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        self.fired = True
        self._fired_at = time.monotonic()
        if self.assoc.is_established and self._context_id is not None:
            try:
                self.assoc.send_c_cancel(self.msg_id, self._context_id)
            except (RuntimeError, ValueError, OSError):
                pass  # the association ended meanwhile: nothing left to cancel

    def check(self) -> None:
        """Abort when the SCP ignores our C-CANCEL for longer than the grace period."""
        if self.fired and time.monotonic() - self._fired_at > CANCEL_GRACE and self.assoc.is_established:
            self.assoc.abort()


# --- identifiers and answers -------------------------------------------------------------------------

def identifier_from_keys(level: QueryLevel, keys: Mapping[str, Any], *, source: str = "?",
                         operation: str = "find") -> Dataset:
    """The C-FIND identifier: QueryRetrieveLevel plus exactly ``keys`` (see the module docstring).

    Raises:
        SourceError: BAD_REQUEST for a keyword that is not in the DICOM dictionary.
    """
    identifier = Dataset()
    identifier.QueryRetrieveLevel = QueryLevel(level).value
    _fill(identifier, keys, source, operation)
    return identifier


def _fill(target: Dataset, keys: Mapping[str, Any], source: str, operation: str) -> None:
    for keyword, value in keys.items():
        if keyword == "QueryRetrieveLevel":
            continue
        tag = tag_of(keyword)
        vr = vr_of(tag) if tag is not None else None
        if tag is None or vr is None:
            raise SourceError(SourceErrorKind.BAD_REQUEST, f"unknown query key {keyword!r} (use DICOM keywords)",
                              source=source, operation=operation)
        target.add(_element(tag, vr, value, source, operation))


def _element(tag: int, vr: str, value: Any, source: str, operation: str) -> DataElement:
    if vr == "SQ":
        items: list[Dataset] = []
        for item in value or []:
            if not isinstance(item, Mapping):
                raise SourceError(SourceErrorKind.BAD_REQUEST,
                                  f"sequence key {keyword_of(tag)} takes a list of keyword mappings",
                                  source=source, operation=operation)
            nested = Dataset()
            _fill(nested, item, source, operation)
            items.append(nested)
        return DataElement(tag, vr, DicomSequence(items))
    if " or " in vr:  # ambiguous dictionary VRs such as "US or SS": pick the first
        vr = vr.split(" or ")[0]
    if value is None or value == "" or (isinstance(value, list | tuple) and not value):
        return DataElement(tag, vr, None)
    if vr in _BINARY_INT_VRS or vr in _BINARY_FLOAT_VRS:
        convert = int if vr in _BINARY_INT_VRS else float
        values = [convert(v) for v in value] if isinstance(value, list | tuple) else convert(value)
        return DataElement(tag, vr, values)
    if isinstance(value, list | tuple):
        return DataElement(tag, vr, [str(v) for v in value])
    return DataElement(tag, vr, str(value))


def answer_from_dataset(dataset: Dataset) -> FindAnswer:
    """A C-FIND answer identifier as a :data:`~rtharvest.dimse.base.FindAnswer` (keyword → value)."""
    answer: FindAnswer = {}
    for element in dataset:
        if element.tag.element == 0:  # group lengths
            continue
        keyword = element.keyword or keyword_of(int(element.tag))
        multi = is_multi_valued(int(element.tag))
        value = element.value
        if element.VR == "SQ":
            answer[keyword] = [answer_from_dataset(item) for item in (value or [])]
        elif value is None or value == "" or (isinstance(value, MultiValue | list) and not value):
            answer[keyword] = [] if multi else ""
        elif isinstance(value, bytes | bytearray):
            continue  # binary values carry nothing a query needs
        elif isinstance(value, MultiValue | list):
            answer[keyword] = [str(v) for v in value]
        else:
            answer[keyword] = [str(value)] if multi else str(value)
    return answer


def _move_identifiers(level: QueryLevel, patient_id: str | None, study_uid: str,
                      series_uid: str | None) -> list[Dataset]:
    """The one identifier of a PATIENT, STUDY or SERIES move (IMAGE: :meth:`PynetdicomBackend.move_instances`)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    if level is QueryLevel.PATIENT:
        ds.PatientID = patient_id
        return [ds]
    ds.StudyInstanceUID = study_uid
    if level is QueryLevel.SERIES:
        ds.SeriesInstanceUID = series_uid
    return [ds]


def _on_connected(event: Any, connected: list[bool]) -> None:
    connected.append(True)
    no_delay(event.assoc)

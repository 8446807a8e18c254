"""DIMSE status codes of C-ECHO, C-FIND and C-MOVE, and what the harvester does about each.

:func:`classify_status` is the single table both backends use (the Orthanc backend reads the status out
of Orthanc's error text, the pynetdicom backend gets it from the response). It answers two questions:
is this an error (and of which :class:`~rtharvest.dimse.base.SourceErrorKind`), and is it worth trying
again later. References: DICOM PS3.4 C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), PS3.7 C (general codes).

========================  ==============================  ================  ===========================
status                    meaning                         kind              retry
========================  ==============================  ================  ===========================
0x0000                    success                         —                 —
0xFF00, 0xFF01            pending (more answers follow)   —                 —
0x0001, 0x0107, 0x0116,   warning (B000: sub-operations   —                 — (the caller looks at the
0xB000-0xBFFF             complete, some failed)                            failed counts / arrivals)
0xFE00                    cancelled (only ever sent in    TIMEOUT           yes: we cancel only on our
                          answer to our C-CANCEL)                           own timeout
0xA700-0xA7FF             out of resources                FAILURE_STATUS    yes: busy archive, retry
                                                                            with back-off
0xA801                    move destination unknown        FAILURE_STATUS    no: the source does not know
                                                                            the harvester's AET — a
                                                                            configuration error
0xA900-0xA9FF             identifier does not match SOP   BAD_REQUEST       no: the keys are wrong for
                          class (strict SCP refusing the                    this source (e.g. a strict
                          keys: dcmqrscp -XF -XM)                           hierarchical SCP) — retrying
                                                                            the same query cannot help
0xC000-0xCFFF             unable to process               FAILURE_STATUS    yes, at most
                                                                            :data:`UNABLE_TO_PROCESS_ATTEMPTS`
0x0122, 0x0124,           SOP class not supported /       BAD_REQUEST       no
0x0211, 0x0213            refused / unrecognised op
0x0110                    processing failure              FAILURE_STATUS    yes, bounded (as Cxxx)
anything else             unknown failure                 FAILURE_STATUS    yes, bounded (as Cxxx)
========================  ==============================  ================  ===========================

Why Cxxx is retried only a few times: "unable to process" is a catch-all. Orthanc answers 0xC000 to a
C-MOVE of a UID it does not hold (permanent), while clinical archives use Cxxx for transient trouble —
database locks, near-line storage being recalled, a busy index (pynetdicom's own SCP uses 0xC5xx for
handler exceptions). We cannot tell the two apart from the code, so a few spaced attempts catch the
transient case and the bound stops a permanent one from hammering the source.
"""

from __future__ import annotations

from enum import StrEnum


class SourceErrorKind(StrEnum):
    """Why an operation against a source failed (re-exported by :mod:`rtharvest.dimse.base`)."""

    #: No TCP connection (port closed, host down, DNS): the source is not there right now.
    UNREACHABLE = "unreachable"
    #: The association was rejected or aborted by the source.
    REFUSED = "refused"
    #: No answer within the operation's deadline (we cancelled and/or aborted).
    TIMEOUT = "timeout"
    #: The source answered with a DIMSE failure status.
    FAILURE_STATUS = "failure-status"
    #: The thing asked for does not exist where it was looked up (e.g. an unknown modality name).
    NOT_FOUND = "not-found"
    #: The request cannot succeed as asked (keys refused by the source, unsupported key, bad UIDs).
    BAD_REQUEST = "bad-request"
    #: Something broke in the exchange itself (malformed answer, lost association, local REST failure).
    PROTOCOL = "protocol"

#: Total attempts worth making for an "unable to process" (Cxxx) or unknown failure status.
UNABLE_TO_PROCESS_ATTEMPTS = 3

SUCCESS = 0x0000
PENDING = frozenset({0xFF00, 0xFF01})
CANCEL = 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000

_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
_REFUSED_BY_SCP = frozenset({0x0122, 0x0124, 0x0211, 0x0213})


def is_pending(status: int) -> bool:
    """Whether ``status`` announces more responses (C-FIND match or C-MOVE progress)."""
    return status in PENDING


def is_warning(status: int) -> bool:
    """Whether ``status`` is a warning: the operation completed, perhaps partially."""
    return status in _WARNINGS or 0xB000 <= status <= 0xBFFF


def classify_status(status: int) -> tuple[SourceErrorKind | None, bool]:
    """``(kind, retryable)`` for a DIMSE status; ``kind`` is ``None`` for success, pending and warnings.

    See the module docstring for the table and the reasons behind each row.
    """
    if status == SUCCESS or status in PENDING or is_warning(status):
        return None, False
    if status == CANCEL:
        return SourceErrorKind.TIMEOUT, True
    if 0xA700 <= status <= 0xA7FF:
        return SourceErrorKind.FAILURE_STATUS, True
    if status == MOVE_DESTINATION_UNKNOWN:
        return SourceErrorKind.FAILURE_STATUS, False
    if 0xA900 <= status <= 0xA9FF:
        return SourceErrorKind.BAD_REQUEST, False
    if status in _REFUSED_BY_SCP:
        return SourceErrorKind.BAD_REQUEST, False
    # 0xCxxx, 0x0110 and unknown codes: possibly transient, bounded by retry_limit_for().
    return SourceErrorKind.FAILURE_STATUS, True


def retry_limit_for(status: int) -> int | None:
    """Total attempts worth making for ``status`` (``None``: the queue's own MaxAttempts applies)."""
    kind, retryable = classify_status(status)
    if kind is SourceErrorKind.FAILURE_STATUS and retryable and not 0xA700 <= status <= 0xA7FF:
        return UNABLE_TO_PROCESS_ATTEMPTS
    return None


def describe_status(status: int) -> str:
    """A short human description of ``status`` for log and error messages."""
    if status == SUCCESS:
        return "success"
    if status in PENDING:
        return "pending"
    if status == CANCEL:
        return "cancelled"
    if is_warning(status):
        return "warning (some sub-operations failed)" if 0xB000 <= status <= 0xBFFF else "warning"
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if status == MOVE_DESTINATION_UNKNOWN:
        return "move destination unknown: the source does not know the harvester's AE title"
    if 0xA900 <= status <= 0xA9FF:
        return "identifier does not match SOP class: the source refuses these query keys"
    if 0xC000 <= status <= 0xCFFF:
        return "unable to process"
    if status in _REFUSED_BY_SCP:
        return "refused: SOP class or operation not supported"
    return "failure"

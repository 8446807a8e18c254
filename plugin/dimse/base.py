"""What every DICOM backend offers the workers: echo, C-FIND and C-MOVE to the harvester, typed errors.

Two implementations exist:

* :class:`~rtharvest.dimse.via_orthanc.OrthancRestBackend` drives Orthanc's own DICOM client through its
  REST API on loopback (the default; works for relational sources such as Orthanc, dcmqrscp, ARIA);
* :class:`~rtharvest.dimse.via_pynetdicom.PynetdicomBackend` speaks DICOM itself (strict hierarchical
  sources, sequence return keys).

Both raise :class:`SourceError` for every failure, with a :class:`SourceErrorKind`, the DIMSE status when
there was one, and whether retrying later makes sense; the job queue stores ``kind`` and
``dimse_status`` and schedules retries from ``retryable`` / ``retry_limit``. Messages name the source
and the operation and may contain UIDs, never patient names (they end up in the event log).

Conventions shared by the backends:

* query keys and answers use DICOM keywords (``"SOPInstanceUID"``); in a query ``""`` or ``None`` means
  "return this attribute", a list means UID-list matching (or, for a sequence keyword, ``[]`` means
  "return this sequence" and ``[{...}]`` nested keys);
* answers are :data:`FindAnswer` dicts: text values as ``str`` (numbers too, as DICOM encodes them), an
  empty value as ``""``, an attribute whose dictionary VM allows several values as ``list[str]``
  (possibly empty), a sequence as ``list[FindAnswer]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword

from ..core.strategies import QueryLevel  # one QueryLevel for planner, strategies and backends
from .statuses import SourceErrorKind, classify_status, describe_status, retry_limit_for

if TYPE_CHECKING:
    from ..edge.config import SourceSettings

__all__ = [
    "UNKNOWN_COUNT",
    "FindAnswer",
    "InstanceKey",
    "MoveResult",
    "QueryLevel",
    "SourceBackend",
    "SourceError",
    "SourceErrorKind",
    "Timeouts",
    "check_instance_keys",
    "check_move_arguments",
    "classify_status",
    "is_multi_valued",
    "keyword_of",
    "sop_lookup_keys",
    "tag_of",
    "vr_of",
]


#: One C-FIND answer keyed by DICOM keyword (see the module docstring for the value conventions).
FindAnswer = dict[str, Any]

#: Sub-operation count a backend cannot observe (Orthanc's REST move does not report them).
UNKNOWN_COUNT = -1


@dataclass(frozen=True)
class InstanceKey:
    """One instance as a Study Root IMAGE-level C-MOVE names it: every unique key down to the SOP UID
    (strict hierarchical sources, and Orthanc's REST move, need the study and series keys too)."""

    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class MoveResult:
    """Outcome of a C-MOVE that did not fail outright.

    ``status`` is the final DIMSE status (0x0000, or a warning such as 0xB000 when some sub-operations
    failed). The counts are the source's own claims and may be :data:`UNKNOWN_COUNT`; a success with
    ``completed == 0`` is common for UIDs the source does not hold (dcmqrscp, pynetdicom's SCP), so the
    caller always verifies arrival in the harvester.
    """

    status: int = 0x0000
    completed: int = UNKNOWN_COUNT
    failed: int = UNKNOWN_COUNT
    warning: int = UNKNOWN_COUNT
    failed_sop_uids: tuple[str, ...] = ()

    @property
    def counts_known(self) -> bool:
        """Whether the source reported sub-operation counts."""
        return self.completed != UNKNOWN_COUNT


class SourceError(Exception):
    """An operation against a source failed.

    Attributes:
        kind: why (:class:`SourceErrorKind`).
        source: the source's DicomModalities name.
        operation: ``"echo"``, ``"find"`` or ``"move"`` with its level.
        dimse_status: the DIMSE status when the source answered with one.
        retryable: whether the same operation may succeed later.
        retry_limit: total attempts worth making for this error (``None``: the queue's MaxAttempts).
        result: for a move, what was achieved before the failure (counts), when known.
    """

    def __init__(
        self,
        kind: SourceErrorKind,
        detail: str,
        *,
        source: str,
        operation: str,
        dimse_status: int | None = None,
        retryable: bool | None = None,
        retry_limit: int | None = None,
        result: MoveResult | None = None,
    ) -> None:
        status_text = f" [DIMSE 0x{dimse_status:04X}: {describe_status(dimse_status)}]" if dimse_status is not None \
            else ""
        super().__init__(f"{operation} at source {source} failed ({kind.value}): {detail}{status_text}")
        self.kind = kind
        self.source = source
        self.operation = operation
        self.detail = detail
        self.dimse_status = dimse_status
        if retryable is None:
            retryable = _default_retryable(kind, dimse_status)
        self.retryable = retryable
        if retry_limit is None and dimse_status is not None and retryable:
            retry_limit = retry_limit_for(dimse_status)
        self.retry_limit = retry_limit
        self.result = result

    @classmethod
    def from_status(cls, status: int, *, source: str, operation: str, detail: str = "",
                    result: MoveResult | None = None) -> SourceError:
        """The error for a failure ``status`` (kind and retryability from :func:`classify_status`)."""
        kind, retryable = classify_status(status)
        return cls(kind or SourceErrorKind.FAILURE_STATUS, detail or "the source answered with a failure status",
                   source=source, operation=operation, dimse_status=status, retryable=retryable, result=result)


def _default_retryable(kind: SourceErrorKind, dimse_status: int | None) -> bool:
    if dimse_status is not None:
        return classify_status(dimse_status)[1]
    # Network trouble is usually temporary; a malformed request or an unknown name never fixes itself.
    return kind in (SourceErrorKind.UNREACHABLE, SourceErrorKind.REFUSED, SourceErrorKind.TIMEOUT,
                    SourceErrorKind.FAILURE_STATUS, SourceErrorKind.PROTOCOL)


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds. ``find``/``move`` are whole-operation defaults when a call gives none."""

    #: TCP connect (a closed port fails at once; a black-holed host takes this long).
    connect: float = 10.0
    #: Association negotiation and release.
    acse: float = 30.0
    #: A whole C-ECHO.
    echo: float = 15.0
    find: float = 60.0
    move: float = 600.0

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> Timeouts:
        """Timeouts from a source's ``FindTimeout``/``MoveTimeout`` settings."""
        return cls(find=settings.find_timeout, move=settings.move_timeout)


@runtime_checkable
class SourceBackend(Protocol):
    """DICOM operations against one source, as the workers use them (one call = one operation)."""

    #: The source's DicomModalities name (used in messages and logs).
    name: str
    #: Whether ``find`` sends sequence return keys (``{"ReferencedRTPlanSequence": []}``).
    supports_sequence_keys: bool

    def echo(self) -> None:
        """C-ECHO the source; :class:`SourceError` when it does not answer with success."""
        ...

    def find(self, level: QueryLevel, keys: Mapping[str, Any], *,
             timeout: float | None = None) -> list[FindAnswer]:
        """C-FIND at ``level`` with matching and return ``keys``; every answer, in the source's order."""
        ...

    def move(self, level: QueryLevel, *, patient_id: str | None, study_uid: str, series_uid: str | None = None,
             sop_uids: Sequence[str] = (), timeout: float | None = None) -> MoveResult:
        """C-MOVE to the harvester's AET; :class:`SourceError` on failure (the caller verifies arrival)."""
        ...

    def move_instances(self, instances: Sequence[InstanceKey], *, timeout: float | None = None) -> MoveResult:
        """IMAGE-level C-MOVEs of instances of any series, one request per instance on one association
        (e.g. a patient's treatment records, each in its own series): the association's set-up and
        release are paid once instead of once per instance. Failures as in :meth:`move`."""
        ...


def check_instance_keys(instances: Sequence[InstanceKey], *, source: str) -> None:
    """Raise :class:`SourceError` (BAD_REQUEST) unless every instance names its study, series and SOP UID."""
    if not instances:
        raise SourceError(SourceErrorKind.BAD_REQUEST, "an IMAGE-level move needs at least one instance",
                          source=source, operation="move IMAGE")
    for key in instances:
        if not (key.study_uid and key.series_uid and key.sop_uid):
            raise SourceError(SourceErrorKind.BAD_REQUEST,
                              f"an IMAGE-level move needs study, series and SOP UID (got {key})",
                              source=source, operation="move IMAGE")


def sop_lookup_keys(sop_uid: str, **return_keys: Any) -> dict[str, Any]:
    """IMAGE-level keys finding one instance by SOP UID on a relational source, naming its study/series.

    The empty StudyInstanceUID/SeriesInstanceUID are return keys, and dcmqrscp and pynetdicom's SCP need
    them present (they answer 0xC000 / 0xA900 to a SOP UID alone). Strict hierarchical sources refuse
    this form (0xA900): search within a known study/series there.
    """
    return {"StudyInstanceUID": "", "SeriesInstanceUID": "", "SOPInstanceUID": sop_uid, **return_keys}


# --- DICOM dictionary helpers shared by the backends -------------------------------------------------

def tag_of(keyword: str) -> int | None:
    """The tag of a DICOM keyword, or of a ``"GGGGEEEE"`` / ``"gggg,eeee"`` hex string; ``None`` if neither."""
    tag = tag_for_keyword(keyword)
    if tag is not None:
        return int(tag)
    text = keyword.replace(",", "")
    if len(text) == 8:
        try:
            return int(text, 16)
        except ValueError:
            return None
    return None


def keyword_of(tag: int) -> str:
    """The keyword of ``tag``, or ``"GGGGEEEE"`` for private and unknown tags."""
    try:
        keyword = keyword_for_tag(tag)
    except KeyError:  # pragma: no cover - pydicom returns "" for unknown tags
        keyword = ""
    return keyword or f"{tag:08X}"


def vr_of(tag: int) -> str | None:
    """The dictionary VR of ``tag`` (``None`` for private/unknown tags)."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def is_multi_valued(tag: int) -> bool:
    """Whether the dictionary lets ``tag`` hold several values (VM other than 1): answered as a list."""
    try:
        vm = str(dictionary_VM(tag))
    except KeyError:
        return False
    return vm not in ("1", "")


def check_move_arguments(level: QueryLevel, *, source: str, patient_id: str | None, study_uid: str,
                         series_uid: str | None, sop_uids: Sequence[str]) -> None:
    """Raise :class:`SourceError` (BAD_REQUEST) unless the UIDs needed for a Study-Root move at ``level`` are given.

    PATIENT needs ``patient_id``; SERIES needs ``series_uid``; IMAGE needs ``series_uid`` and ``sop_uids``:
    strict hierarchical sources (and Orthanc's REST move) need every unique key above the level.
    """
    operation = f"move {level.value}"

    def bad(detail: str) -> SourceError:
        return SourceError(SourceErrorKind.BAD_REQUEST, detail, source=source, operation=operation)

    if isinstance(sop_uids, str):
        raise bad("sop_uids must be a sequence of UIDs, not a string")
    if level is QueryLevel.PATIENT:
        if not patient_id:
            raise bad("a PATIENT-level move needs patient_id")
        return
    if not study_uid:
        raise bad("study_uid is required")
    if level in (QueryLevel.SERIES, QueryLevel.IMAGE) and not series_uid:
        raise bad(f"a {level.value}-level move needs series_uid")
    if level is QueryLevel.IMAGE and not sop_uids:
        raise bad("an IMAGE-level move needs at least one SOP instance UID")

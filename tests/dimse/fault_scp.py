"""A small pynetdicom Q/R SCP that misbehaves on purpose, started in-test on a free loopback port.

Configure a :class:`Fault` and the SCP rejects associations, aborts them, answers C-ECHO/C-FIND/C-MOVE
with a chosen status, or sleeps before answering (until the caller sends C-CANCEL, which it records and
answers with 0xFE00). Every C-FIND/C-MOVE identifier it receives is recorded so tests can assert exactly
what a backend sent.

A failure status for C-MOVE can only be sent after at least one sub-operation was announced, and
pynetdicom opens the storage association to the destination *before* that; so the SCP resolves every
move destination to itself (it also accepts CT storage) and never actually stores anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from rtharvest.edge.launcher import free_port

LOCALHOST = "127.0.0.1"


@dataclass
class Fault:
    """How the SCP misbehaves."""

    #: Reject every association (A-ASSOCIATE-RJ, permanent, "calling AE title not recognised").
    reject: bool = False
    #: Accept the association, then A-ABORT as soon as a C-FIND or C-MOVE arrives.
    abort: bool = False
    #: Seconds to sleep before answering any request (interrupted by a C-CANCEL or stop()).
    delay: float = 0.0
    #: Keep sleeping through a C-CANCEL (an SCP that ignores cancels; only an abort ends the wait).
    ignore_cancel: bool = False
    echo_status: int = 0x0000
    #: Final C-FIND status, after ``find_answers`` were sent as pending responses.
    find_status: int = 0x0000
    find_answers: list[Dataset] = field(default_factory=list)
    #: Final C-MOVE status; 0x0000 means "success, nothing to send".
    move_status: int = 0x0000


class FaultScp:
    """The SCP; use as a context manager (``with FaultScp(Fault(...)) as scp:``)."""

    def __init__(self, fault: Fault | None = None, aet: str = "FAULTSCP") -> None:
        self.fault = fault or Fault()
        self.aet = aet
        self.port = free_port()
        self.finds: list[Dataset] = []
        self.moves: list[Dataset] = []
        self.move_destinations: list[str] = []
        self.cancelled = 0
        #: Associations peers hold (opened, release not yet requested): most at once, when each was opened.
        self._open_assocs: set[int] = set()
        self.max_connections_open = 0
        self.connection_times: list[float] = []
        self._conn_lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> FaultScp:
        """Listen on ``self.port`` in background threads."""
        ae = AE(ae_title=self.aet)
        for context in (Verification, PatientRootQueryRetrieveInformationModelFind,
                        PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelFind,
                        StudyRootQueryRetrieveInformationModelMove, CTImageStorage):
            ae.add_supported_context(context)
        # Needed to open the (self-)destination association of a C-MOVE; see the module docstring.
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        if self.fault.reject:
            ae.require_calling_aet = ["NOBODY-KNOWS-ME"]
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_STORE, lambda event: 0x0000),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_PDU_RECV, self._on_pdu),
        ]
        self._server = ae.start_server((LOCALHOST, self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        """Wake sleeping handlers and shut the server down."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> FaultScp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- handlers ------------------------------------------------------------------------------------

    def _on_open(self, event: Any) -> None:
        with self._conn_lock:
            self._open_assocs.add(id(event.assoc))
            self.max_connections_open = max(self.max_connections_open, len(self._open_assocs))
            self.connection_times.append(time.time())

    def _on_pdu(self, event: Any) -> None:
        # The peer is done with an association once it asks to release it: from then on it may open the
        # next one, before this SCP's own thread has seen the connection close.
        if isinstance(event.pdu, A_RELEASE_RQ):
            self._on_close(event)

    def _on_close(self, event: Any) -> None:
        with self._conn_lock:
            self._open_assocs.discard(id(event.assoc))

    @property
    def connections_open(self) -> int:
        """Associations a peer holds now."""
        with self._conn_lock:
            return len(self._open_assocs)

    def _sleep(self, event: Any) -> bool:
        """Sleep ``fault.delay``; True when a C-CANCEL for this request arrived meanwhile."""
        deadline = time.monotonic() + self.fault.delay
        while time.monotonic() < deadline and not self._stop.is_set():
            if event is not None and event.is_cancelled:
                if self.fault.ignore_cancel:
                    self.cancelled += 1
                    event = None  # count it once, keep sleeping
                    continue
                self.cancelled += 1
                return True
            time.sleep(0.05)
        return False

    def _on_echo(self, event: Any) -> int:
        self._sleep(None)
        return self.fault.echo_status

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        self.finds.append(event.identifier)
        if self.fault.abort:
            event.assoc.abort()
            return
        if self._sleep(event):
            yield 0xFE00, None
            return
        for answer in self.fault.find_answers:
            yield 0xFF00, answer
        yield self.fault.find_status, None

    def _on_move(self, event: Any) -> Iterator[Any]:
        self.moves.append(event.identifier)
        self.move_destinations.append(str(event.move_destination).strip())
        if self.fault.abort:
            event.assoc.abort()
            return
        cancelled = self._sleep(event)
        status = 0xFE00 if cancelled else self.fault.move_status
        if status == 0xA801:
            yield None, None  # pynetdicom answers 0xA801 itself for an unknown destination
            return
        yield LOCALHOST, self.port
        if status == 0x0000:
            yield 0  # success with zero sub-operations
            return
        yield 1
        yield status, None

"""Run pynetdicom's Q/R SCP application with TCP_NODELAY on every socket it opens or accepts.

The dcmtk peers in these tests run with ``TCP_NODELAY=1`` (docs/platform.md); pynetdicom has no such switch,
and with Nagle on each of its DIMSE messages waits ~40 ms for a delayed ACK. This wrapper only sets the
socket option, then runs the unmodified application: ``python tests/qrscp_nodelay.py -c qrscp.ini``.
With ``QRSCP_PATIENT_ID_NOCASE=1`` it also matches PatientID case-insensitively, as some PACS do.
With ``QRSCP_MOVE_DELAY=<seconds>`` each sub-operation of a C-MOVE of several instances waits that long
before its C-STORE (a slow source that keeps sending pending responses); with ``QRSCP_MOVE_LOG=<path>``
every C-MOVE request is appended there as one JSON line (level, UIDs, sub-operations, start and end
time), so a test counts the moves the source itself received.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pynetdicom import transport


def _nodelay(sock: socket.socket) -> socket.socket:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock


_create_socket = transport.AssociationSocket._create_socket
_get_request = transport.AssociationServer.get_request


def _create_socket_nodelay(self: Any, address: Any) -> socket.socket:
    return _nodelay(_create_socket(self, address))


def _get_request_nodelay(self: Any) -> tuple[socket.socket, tuple[str, int]]:
    sock, address = _get_request(self)
    return _nodelay(sock), address


transport.AssociationSocket._create_socket = _create_socket_nodelay  # type: ignore[method-assign]
transport.AssociationServer.get_request = _get_request_nodelay  # type: ignore[method-assign]

if os.environ.get("QRSCP_PATIENT_ID_NOCASE") == "1":
    # Like some PACS: PatientID matched without regard to letter case (tests of identity mismatches).
    from pynetdicom.apps.qrscp import db as _db
    from sqlalchemy import func

    _single = _db._search_single_value

    def _single_nocase(elem: Any, session: Any, query: Any = None) -> Any:
        if elem.keyword != "PatientID":
            return _single(elem, session, query)
        query = query or session.query(_db.Instance)
        return query.filter(func.lower(_db.Instance.patient_id) == str(elem.value).lower())

    _db._search_single_value = _single_nocase

_MOVE_DELAY = float(os.environ.get("QRSCP_MOVE_DELAY") or 0)
_MOVE_LOG = os.environ.get("QRSCP_MOVE_LOG")
if _MOVE_DELAY > 0 or _MOVE_LOG:
    from pynetdicom.apps.qrscp import handlers as _handlers

    _handle_move = _handlers.handle_move
    _log_lock = threading.Lock()

    def _slow_logged_move(event: Any, *args: Any) -> Iterator[Any]:
        identifier = event.identifier
        entry: dict[str, Any] = {
            "Level": str(identifier.get("QueryRetrieveLevel", "")),
            **{k: str(identifier.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")},
            "Started": time.time(), "SubOperations": 0,
        }
        try:
            for item in _handle_move(event, *args):
                if isinstance(item, int):
                    entry["Matches"] = item  # the handler announces its sub-operations before sending them
                elif isinstance(item, tuple) and len(item) == 2 and item[0] == 0xFF00:
                    entry["SubOperations"] += 1
                    # Only moves of several instances are slowed: the slow move of a large series is what
                    # a test wants, single-instance moves would only make it longer.
                    deadline = time.monotonic() + (_MOVE_DELAY if entry.get("Matches", 0) > 1 else 0)
                    while time.monotonic() < deadline and not event.is_cancelled:
                        time.sleep(0.05)
                yield item
        finally:
            entry["Ended"] = time.time()
            if _MOVE_LOG:
                with _log_lock, open(_MOVE_LOG, "a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")

    # qrscp.py imports the handler by name when it runs (below), so it picks this one up.
    _handlers.handle_move = _slow_logged_move

if __name__ == "__main__":
    sys.argv = ["qrscp", *sys.argv[1:]]
    runpy.run_module("pynetdicom.apps.qrscp.qrscp", run_name="__main__")

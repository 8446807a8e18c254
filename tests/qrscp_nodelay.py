"""Run pynetdicom's Q/R SCP application with TCP_NODELAY on every socket it opens or accepts.

The dcmtk peers in these tests run with ``TCP_NODELAY=1`` (PLATFORM.md); pynetdicom has no such switch,
and with Nagle on each of its DIMSE messages waits ~40 ms for a delayed ACK. This wrapper only sets the
socket option, then runs the unmodified application: ``python tests/qrscp_nodelay.py -c qrscp.ini``.
With ``QRSCP_PATIENT_ID_NOCASE=1`` it also matches PatientID case-insensitively, as some PACS do.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
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

if __name__ == "__main__":
    sys.argv = ["qrscp", *sys.argv[1:]]
    runpy.run_module("pynetdicom.apps.qrscp.qrscp", run_name="__main__")

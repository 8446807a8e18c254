"""Run pynetdicom's Q/R SCP application with TCP_NODELAY on every socket it opens or accepts.

The dcmtk peers in these tests run with ``TCP_NODELAY=1`` (PLATFORM.md); pynetdicom has no such switch,
and with Nagle on each of its DIMSE messages waits ~40 ms for a delayed ACK. This wrapper only sets the
socket option, then runs the unmodified application: ``python tests/qrscp_nodelay.py -c qrscp.ini``.
"""

from __future__ import annotations

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

if __name__ == "__main__":
    sys.argv = ["qrscp", *sys.argv[1:]]
    runpy.run_module("pynetdicom.apps.qrscp.qrscp", run_name="__main__")

"""The loopback client never sends a non-idempotent request twice: a POST may have started a
C-MOVE at Orthanc before the connection dropped. Safe requests are resent on a fresh connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from rtharvest.edge.loopback import LoopbackClient, LoopbackError


class DroppingServer:
    """Answers the first request of each connection (keep-alive), reads the second and hangs up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            for index in range(2):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head.split(b" ")[0].decode())
                if index == 1:
                    return  # processed, then the connection drops before the answer
                body = b"{}"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: keep-alive\r\n\r\n" + body)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[DroppingServer]:
    srv = DroppingServer()
    yield srv
    srv.close()


def test_a_get_is_resent_after_the_connection_drops(server: DroppingServer) -> None:
    client = LoopbackClient(f"http://127.0.0.1:{server.port}", None, timeout=5)
    assert client.get("/a") == {}
    assert client.get("/b") == {}  # dropped after reading it, resent on a new connection
    assert server.requests == ["GET", "GET", "GET"]


def test_a_post_that_was_sent_is_never_sent_again(server: DroppingServer) -> None:
    client = LoopbackClient(f"http://127.0.0.1:{server.port}", None, timeout=5)
    assert client.post("/modalities/X/move", {"Level": "Series"}) == {}
    with pytest.raises(LoopbackError, match="cannot reach"):
        client.post("/modalities/X/move", {"Level": "Series"})
    assert server.requests == ["POST", "POST"]  # the second move was not repeated

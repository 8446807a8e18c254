"""The benchmarks' TCP delay line (benchmarks/_latency_proxy.py): latency added, bandwidth not taken.

The wire benchmark's latency scenario is only meaningful if the proxy adds ``delay`` each way to every
round trip *and* lets bulk data (C-STORE pixel data) through at the speed of the ends. A proxy that slept
``delay`` per read before reading on would also pass a round-trip test while throttling a bulk transfer
to one chunk per ``delay``: the second test tells the two apart by an order of magnitude, so it is a
bound, not a timing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _latency_proxy import LOCALHOST, LatencyProxy  # noqa: E402

DELAY_S = 0.1
BULK_BYTES = 20 * 1024 * 1024
#: The most asyncio reads from a socket at once: a throttle would pass at most this per delay.
READ_MAX = 256 * 1024


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts: list[bytes] = []
    while n:
        part = sock.recv(min(n, 1 << 20))
        if not part:
            raise ConnectionError("closed early")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


class _Handler(socketserver.BaseRequestHandler):
    """b"E" + byte: echo the byte; b"S" + 8-byte length: read that many bytes, answer their SHA-256."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            kind = sock.recv(1)
            if kind == b"E":
                sock.sendall(_recv_exactly(sock, 1))
            elif kind == b"S":
                (size,) = struct.unpack("!Q", _recv_exactly(sock, 8))
                digest = hashlib.sha256()
                while size:
                    part = sock.recv(min(size, 1 << 20))
                    if not part:
                        return
                    digest.update(part)
                    size -= len(part)
                sock.sendall(digest.digest())
            else:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def target() -> Iterator[int]:
    server = _Server((LOCALHOST, 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture()
def proxy(target: int) -> Iterator[LatencyProxy]:
    with LatencyProxy(target_port=target, delay_s=DELAY_S) as running:
        yield running


def test_round_trip_costs_twice_the_delay_and_a_new_connection_one_more(proxy: LatencyProxy) -> None:
    t0 = time.perf_counter()
    with socket.create_connection((LOCALHOST, proxy.port), timeout=10) as sock:
        sock.sendall(b"E\x01")
        assert sock.recv(1) == b"\x01"
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        sock.sendall(b"E\x02")
        assert sock.recv(1) == b"\x02"
        second = time.perf_counter() - t1
    # Lower bounds only: a loaded machine makes round trips longer, never shorter.
    assert second >= 2 * DELAY_S, f"round trip {second * 1000:.0f} ms < 2 × {DELAY_S * 1000:.0f} ms"
    assert first >= 4 * DELAY_S, f"first round trip {first * 1000:.0f} ms includes no handshake"
    assert proxy.connections == 1


def test_bulk_data_passes_in_order_at_wire_speed_not_one_chunk_per_delay(proxy: LatencyProxy) -> None:
    payload = os.urandom(BULK_BYTES)
    # What a proxy that waits `delay` per read would need at the very least, one way.
    throttled_s = BULK_BYTES / READ_MAX * DELAY_S
    t0 = time.perf_counter()
    with socket.create_connection((LOCALHOST, proxy.port), timeout=30) as sock:
        sock.sendall(b"S" + struct.pack("!Q", len(payload)))
        sock.sendall(payload)
        answer = _recv_exactly(sock, 32)
    elapsed = time.perf_counter() - t0
    assert answer == hashlib.sha256(payload).digest(), "bytes reordered or lost"
    # Latency alone is 2 round trips (handshake + request/answer) = 0.4 s; a throttle needs ≥ 8 s.
    assert elapsed < throttled_s / 3, f"20 MB took {elapsed:.2f} s (a per-chunk throttle: ≥ {throttled_s:.1f} s)"


def test_unreachable_target_closes_the_client_connection(target: int) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind((LOCALHOST, 0))
        dead_port = probe.getsockname()[1]
    with LatencyProxy(target_port=dead_port, delay_s=0.01) as dead, \
            socket.create_connection((LOCALHOST, dead.port), timeout=10) as sock:
        sock.sendall(b"E\x01")
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass  # closed with a reset: also the end a real client sees


def test_stop_closes_open_connections_and_the_port(target: int) -> None:
    running = LatencyProxy(target_port=target, delay_s=0.01).start()
    port = running.port
    sock = socket.create_connection((LOCALHOST, port), timeout=10)
    try:
        sock.sendall(b"E\x03")
        assert sock.recv(1) == b"\x03"
        running.stop()
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCALHOST, port), timeout=10).close()

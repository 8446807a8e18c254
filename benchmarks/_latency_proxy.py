"""A TCP delay line for the benchmarks: a loopback proxy that adds a fixed one-way delay to every byte.

On loopback a DICOM round trip costs well under a millisecond of network; between a harvester and a
hospital's R&V system it costs tens of milliseconds. Putting this proxy in front of a DICOM port makes
each round trip (association negotiation, every C-FIND / C-MOVE / C-STORE request and its response,
release) cost ``2 × delay`` more, the way a real network does, without root or ``tc netem``.

It is a *delay line*, not a throttle: every chunk received on one side is stamped ``arrival + delay`` and
queued; one timer per direction writes, in arrival order, whatever is due. Reading never waits for
earlier chunks, so bulk data (C-STORE pixel data) flows at the speed of the ends with only the latency
added; when a receiving end falls behind (its socket buffer fills), reading from the sending end pauses
(asyncio flow control). A new connection costs one more round trip before its first bytes arrive (the TCP
handshake of a real network). A half-close (EOF) travels in order behind the data, ``delay`` later.

    with LatencyProxy(target_port=4242, delay_s=0.010) as proxy:
        ...  # connect to proxy.port instead of 4242

The proxy runs its own asyncio loop in a daemon thread of the calling process; :meth:`LatencyProxy.stop`
closes the listening socket and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from types import TracebackType

LOCALHOST = "127.0.0.1"
_EOF = None  # in a direction's queue: the sending end half-closed


class _End(asyncio.Protocol):
    """One end of a proxied connection; ``peer`` is the other end. Holds what is on its way *to* this end."""

    def __init__(self, proxy: LatencyProxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.peer: _End | None = None
        self.transport: asyncio.Transport | None = None
        self.in_flight: deque[tuple[float, bytes | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.got_eof = False  # this end sent EOF
        self.closed = False

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy.ends.add(self)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.send_later(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.peer is not None:
            self.peer.send_later(_EOF)
        return True  # keep the transport: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.ends.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        peer = self.peer
        if peer is not None and not peer.closed and not self.got_eof:
            peer.send_later(_EOF)  # a reset or close: the other end learns of it in order, later
        if peer is not None and peer.transport is not None and peer.got_eof:
            peer.transport.close()

    def pause_writing(self) -> None:
        # This end's socket buffer is full: stop reading what would be sent to it.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    # -- the delay line -------------------------------------------------------------------------

    def send_later(self, data: bytes | None) -> None:
        """Queue ``data`` (or the EOF mark) to be written to this end ``delay`` from now, after what is queued."""
        if self.closed:
            return
        due = self.loop.time() + self.proxy.delay_s
        self.in_flight.append((due, data))
        if self.timer is None:
            self.timer = self.loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or self.closed:
            return
        now = self.loop.time()
        while self.in_flight and self.in_flight[0][0] <= now:
            _, data = self.in_flight.popleft()
            if data is _EOF:
                self.in_flight.clear()
                if self.got_eof or (self.peer is not None and self.peer.closed):
                    transport.close()  # both directions ended
                elif transport.can_write_eof():
                    transport.write_eof()
                return
            transport.write(data)
        if self.in_flight:
            self.timer = self.loop.call_at(self.in_flight[0][0], self._flush)


class LatencyProxy:
    """Forwards ``listen_port`` on loopback to ``target_host:target_port``, ``delay_s`` later each way."""

    def __init__(self, target_port: int, delay_s: float, listen_port: int = 0, target_host: str = LOCALHOST,
                 handshake: bool = True) -> None:
        if delay_s < 0:
            raise ValueError(f"delay must not be negative: {delay_s}")
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        #: Whether a new connection first waits one round trip (``2 × delay``), like a TCP handshake.
        self.handshake = handshake
        self.port = listen_port
        #: Connections accepted so far (for the benchmark's report: one per DICOM association).
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.ends: set[_End] = set()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- life cycle (called from the benchmark's thread) ------------------------------------------

    def start(self) -> LatencyProxy:
        """Listen (on ``listen_port``, or a free port when 0) and serve from a daemon thread."""
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"latency-proxy-{self.target_port}",
                                        daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        except BaseException:
            self.stop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection, then end the loop's thread."""
        thread = self._thread
        if thread is None:
            return
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(10)
        if not thread.is_alive():
            self.loop.close()
        self._thread = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the loop's side ---------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await self.loop.create_server(self._accept, LOCALHOST, self.port, reuse_address=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for end in list(self.ends):
            if end.transport is not None:
                end.transport.abort()
        await asyncio.sleep(0)  # let connection_lost run

    def _accept(self) -> _End:
        self.connections += 1
        client = _End(self)
        task = self.loop.create_task(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client

    async def _connect(self, client: _End) -> None:
        await asyncio.sleep(0)  # connection_made has run
        assert client.transport is not None
        client.transport.pause_reading()
        if self.handshake and self.delay_s:
            # SYN and SYN-ACK: the client's first bytes leave one round trip after it connects.
            await asyncio.sleep(2 * self.delay_s)
        upstream = _End(self)
        try:
            await self.loop.create_connection(lambda: upstream, self.target_host, self.target_port)
        except OSError:
            client.transport.close()  # refused: the client sees its connection closed
            return
        client.peer, upstream.peer = upstream, client
        if client.closed:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        client.transport.resume_reading()

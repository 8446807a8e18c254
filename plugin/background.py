"""One background loop: the shape of every service thread of the plugin.

A :class:`BackgroundLoop` runs ``step`` on its own named daemon thread until stopped. ``step`` returns
True when it did work (the next pass starts at once) and False when it found none (the loop waits
``interval`` seconds, or until :meth:`~BackgroundLoop.wake`). A step that raises is logged and followed
by ``error_wait`` seconds; the thread never dies of it. :meth:`~BackgroundLoop.stop` sets the stop flag,
wakes the thread, calls ``on_stop`` (for a step that blocks on its own queue or condition) and joins.

A wake that arrives during a pass is kept: the wake flag is cleared when a pass *starts*, so the wait
after it returns at once. The loop keeps no clock of its own: what a pass decides by time is decided by
its owner's injectable clock (``ProvenanceWriter.clock``, ``ScheduleService.clock``), and the wait comes
from ``interval``, which may be a callable computed from that clock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("rtharvest.background")

__all__ = ["BackgroundLoop"]


class BackgroundLoop:
    """A named thread that runs ``step`` until stopped; start / stop / wake / alive."""

    def __init__(self, name: str, step: Callable[[], bool], interval: float | Callable[[], float] = 1.0, *,
                 error_wait: float | None = None, on_stop: Callable[[], None] | None = None,
                 once: bool = False) -> None:
        self.name = name
        self.step = step
        #: Seconds to wait after a pass that found no work (a callable is read before each wait).
        self.interval = interval
        self.error_wait = error_wait
        self.on_stop = on_stop
        #: Run ``step`` once and end (a start-up task that still stops and joins like the others).
        self.once = once
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (again, after a stop); no-op while it runs."""
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to stop and wake it, without waiting (to stop several loops together)."""
        self._stop.set()
        self._wake.set()
        if self.on_stop is not None:
            self.on_stop()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the loop to stop, wake it and join it (up to ``timeout``); True if it ended."""
        self.request_stop()
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout))
        return not self.alive

    def wake(self) -> None:
        """Start the next pass now instead of after the interval."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (a long step checks it between pieces of work)."""
        return self._stop.is_set()

    @property
    def stop_event(self) -> threading.Event:
        """The stop flag, for a step that hands it to code waiting on an event (read it, never set it)."""
        return self._stop

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` inside a step, ended early by :meth:`stop`; True if stopping."""
        return self._stop.wait(seconds)

    def _interval(self) -> float:
        return self.interval() if callable(self.interval) else self.interval

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a wake during the pass below makes the next pass start at once
            failed = False
            try:
                busy = self.step()
            except Exception:
                log.exception("%s: a pass failed", self.name)
                busy = failed = True
            if self._stop.is_set() or self.once:
                return
            if failed:
                self._wake.wait(self._interval() if self.error_wait is None else self.error_wait)
            elif not busy:
                self._wake.wait(self._interval())

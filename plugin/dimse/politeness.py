"""Politeness per contacted source: every C-FIND and C-MOVE counts against the source it goes to.

The job queue limits how many *jobs* run for a job's own source, but one job may talk to several
sources (a reverse search asks every lookup source; a UID look-up falls through to the next one). The
:class:`SourceGate` is taken around every DIMSE operation, whatever job sends it, so a source configured
with ``MaxConcurrent: 1`` never sees two associations from this harvester at once, and no association is
opened during its ``QuietHours`` (in its ``TimeZone``). The count is per harvester process: one Orthanc
runs one harvester.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dtime

from ..store.jobqueue import SourceLimits


class SourceUnavailable(Exception):
    """The operation must not be sent now; the job goes back to the queue (its attempt not counted).

    ``until``: epoch seconds before which trying again is pointless (end of quiet hours), or None.
    """

    def __init__(self, reason: str, until: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.until = until


@dataclass
class SourceActivity:
    """Associations of the harvester to one source: open now, most at once, opened in total."""

    open: int = 0
    peak: int = 0
    total: int = 0
    waited: int = 0
    finds: int = 0
    moves: int = 0


def _machine_local_time(ts: float) -> dtime:
    return datetime.fromtimestamp(ts).time()


class SourceGate:
    """Counts DIMSE operations per source against its ``MaxConcurrent`` and ``QuietHours``."""

    def __init__(self, limits: Mapping[str, SourceLimits], default: SourceLimits, *,
                 clock: Callable[[], float] = time.time,
                 local_time: Callable[[float], dtime] = _machine_local_time) -> None:
        self.limits = dict(limits)
        self.default = default
        self.clock = clock
        self.local_time = local_time
        self._cond = threading.Condition()
        self._activity: dict[str, SourceActivity] = {}

    def limits_for(self, source: str) -> SourceLimits:
        """The settings that apply to ``source``."""
        return self.limits.get(source, self.default)

    def quiet_until(self, source: str) -> float | None:
        """End of the source's current quiet hours (epoch seconds), or None when it may be contacted."""
        return self.limits_for(source).quiet_until(self.clock(), self.local_time)

    @contextmanager
    def slot(self, source: str, *, waiting: Callable[[], None] | None = None,
             stop: threading.Event | None = None, kind: str = "") -> Iterator[None]:
        """Hold one of the source's ``MaxConcurrent`` slots for one DIMSE operation.

        Waits while the source is saturated (calling ``waiting`` about twice a second, e.g. to extend a
        job's lease). Raises :class:`SourceUnavailable` when the source is in its quiet hours or ``stop``
        is set. ``kind`` (``"find"`` or ``"move"``) is counted for the status route and benchmarks.
        """
        limits = self.limits_for(source)
        waited = False
        while True:
            until = self.quiet_until(source)
            if until is not None:
                raise SourceUnavailable(f"quiet hours of source {source} until "
                                        f"{datetime.fromtimestamp(until, UTC):%Y-%m-%dT%H:%MZ}", until)
            if stop is not None and stop.is_set():
                raise SourceUnavailable("the harvester is stopping")
            with self._cond:
                activity = self._activity.setdefault(source, SourceActivity())
                if activity.open < limits.max_concurrent:
                    activity.open += 1
                    activity.total += 1
                    activity.peak = max(activity.peak, activity.open)
                    activity.waited += int(waited)
                    activity.finds += int(kind == "find")
                    activity.moves += int(kind == "move")
                    break
                waited = True
                self._cond.wait(0.5)
            if waiting is not None:
                waiting()
        try:
            yield
        finally:
            with self._cond:
                self._activity[source].open -= 1
                self._cond.notify_all()

    def activity(self) -> dict[str, SourceActivity]:
        """A copy of the per-source counters (for ``GET /rtharvest/status``)."""
        with self._cond:
            return {name: SourceActivity(a.open, a.peak, a.total, a.waited, a.finds, a.moves)
                    for name, a in self._activity.items()}

"""The C-FIND answers one harvest already received from a source, reused by its later jobs.

Jobs of one harvest ask the same questions again and again: the record search of each plan of a patient
lists the same record series, every frame-of-reference search of a patient lists the patient's series and
asks each series for its FrameOfReferenceUID, the image a contour names and its series request list the
same series. Each repetition is a network round trip (10–50 ms to a hospital system, plus its own time).
:class:`FindCache` answers an identical C-FIND (same source, level and identifier) from the first answer
**of the same harvest**:

* per harvest, never across harvests: a later harvest searches again, so objects that reached the source
  since (a new record, a dose computed later) are found. Within one harvest an answer is as fresh as the
  harvest's own start, which is what a harvest is (a snapshot of what the source held while it ran);
* only answers the source gave: a failed C-FIND is not remembered, the next job asks again;
* in memory: after a restart the cache is empty and jobs simply ask the source again (never a wrong
  answer, only a repeated one). It holds at most ``max_answers`` answers (least recently used first out)
  and a harvest's entries are dropped when its last job ends (a job reopening it asks again);
* a job that failed before (an automatic or a manual retry) asks the source again: something was wrong,
  and an operator who fixed it at the source expects the retry to see it;
* one question in flight at a time: a job asking what another job is asking right now waits for that
  answer instead of sending the same C-FIND at the same moment.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FindCache", "FindKey", "find_key"]


@dataclass(frozen=True)
class FindKey:
    """What makes two C-FINDs the same question: harvest, source, level and identifier."""

    harvest_id: str
    source: str
    level: str
    identifier: str


def find_key(harvest_id: str, source: str, level: str, identifier: Mapping[str, Any]) -> FindKey:
    """The cache key of a C-FIND (the identifier in a canonical form: key order does not matter)."""
    return FindKey(harvest_id, source, str(level), json.dumps(dict(identifier), sort_keys=True, default=str))


Answers = list[Mapping[str, Any]]


class FindCache:
    """Per-harvest C-FIND answers (see the module docstring). Thread-safe."""

    def __init__(self, max_answers: int = 200_000, wait_seconds: float = 600.0) -> None:
        self.max_answers = max_answers
        #: How long a job waits for the same question another job is asking before asking itself.
        self.wait_seconds = wait_seconds
        self._entries: OrderedDict[FindKey, Answers] = OrderedDict()
        self._size = 0
        self._in_flight: dict[FindKey, threading.Event] = {}
        #: (harvest, source) → series UID → FrameOfReferenceUID, from any answer that showed both.
        self._frames: dict[tuple[str, str], dict[str, str]] = {}
        self._lock = threading.Lock()

    def answers(self, key: FindKey, ask: Callable[[], Sequence[Mapping[str, Any]]], fresh: bool = False,
                waiting: Callable[[], object] | None = None) -> tuple[Answers, bool]:
        """The answers to ``key``: remembered ones, or ``ask()``'s (then remembered). Returns (answers,
        reused). ``ask``'s exceptions propagate and nothing is remembered. ``fresh``: ask in any case (a
        retried job must see the source as it is now) and remember that answer instead. ``waiting`` is
        called every few seconds while another job's identical question is in flight (a lease heartbeat)."""
        if fresh:
            result = list(ask())
            with self._lock:
                self._remember(key, result)
            return list(result), False
        while True:
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:
                    self._entries.move_to_end(key)
                    return list(hit), True
                in_flight = self._in_flight.get(key)
                if in_flight is None:
                    done = threading.Event()
                    self._in_flight[key] = done
                    break
            # Another job is asking this right now: its answer serves both (or, if it failed, ask again).
            if not self._wait(in_flight, waiting):
                return list(ask()), False
        try:
            result = list(ask())
            with self._lock:
                self._remember(key, result)
            return list(result), False
        finally:
            with self._lock:
                self._in_flight.pop(key, None)
            done.set()

    def _wait(self, in_flight: threading.Event, waiting: Callable[[], object] | None) -> bool:
        deadline = time.monotonic() + self.wait_seconds
        while not in_flight.wait(min(5.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            if waiting is not None:
                waiting()
        return True

    def _remember(self, key: FindKey, result: Answers) -> None:
        if len(result) > self.max_answers:
            return  # larger than the whole cache: not worth evicting everything else for
        previous = self._entries.pop(key, None)
        if previous is not None:
            self._size -= _weight(previous)
        self._entries[key] = result
        self._size += _weight(result)
        while self._size > self.max_answers and self._entries:
            _, old = self._entries.popitem(last=False)
            self._size -= _weight(old)

    def note_frames_of_reference(self, harvest_id: str, source: str, answers: Sequence[Mapping[str, Any]]) -> None:
        """Remember the FrameOfReferenceUID of every series an answer names together with its FoR (a series
        has one FoR, PS3.3 C.7.4.1.1.1: one answer settles it for the harvest)."""
        found = {str(a["SeriesInstanceUID"]): str(a["FrameOfReferenceUID"]) for a in answers
                 if a.get("SeriesInstanceUID") and a.get("FrameOfReferenceUID")
                 and isinstance(a.get("FrameOfReferenceUID"), str)}
        if found:
            with self._lock:
                self._frames.setdefault((harvest_id, source), {}).update(found)

    def frame_of_reference(self, harvest_id: str, source: str, series_uid: str) -> str | None:
        """The FoR this harvest's answers from ``source`` showed for a series, or None."""
        with self._lock:
            return self._frames.get((harvest_id, source), {}).get(series_uid)

    def forget(self, harvest_id: str) -> None:
        """Drop a harvest's answers (it finished: the next harvest must ask the source again anyway)."""
        with self._lock:
            for key in [k for k in self._entries if k.harvest_id == harvest_id]:
                self._size -= _weight(self._entries.pop(key))
            for frames in [k for k in self._frames if k[0] == harvest_id]:
                del self._frames[frames]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _weight(answers: Answers) -> int:
    # An empty answer costs an entry too (a harvest asks many questions whose answer is "nothing").
    return max(1, len(answers))

"""Helpers shared by the benchmarks: real servers (through the same code as the tests), timing, output.

Benchmarks are scripts that print figures, never timed tests. The machines are shared and noisy, so every
headline figure is a ratio of two things measured side by side in the same run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # The real-server helpers of the integration tests (tests/servers.py, tests/conftest.py) are reused
    # as they are, so a benchmark starts Orthanc, dcmqrscp and the harvester exactly like the tests do.
    sys.path.insert(0, str(REPO))

from rtharvest.edge.launcher import DEFAULT_CONFIG, OrthancProcess, free_port  # noqa: E402
from tests.conftest import start_harvester  # noqa: E402
from tests.servers import HARVEST_AET, LOCALHOST, DicomSource, RestClient  # noqa: E402

__all__ = [
    "DEFAULT_CONFIG", "HARVEST_AET", "LOCALHOST", "REPO", "DicomSource", "OrthancProcess", "RestClient",
    "Results", "free_port", "machine", "start_harvester", "wait_until",
]


def wait_until(predicate: Callable[[], Any], deadline_s: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {deadline_s:.0f} s: {what}")
        time.sleep(interval)


def machine() -> str:
    """One line naming the machine (CPU model, cores, memory, OS)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    osname = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = ", " + line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores{mem}{osname}"


class Results:
    """Figures a benchmark reports: printed as it goes, and written as JSON for ``run_all.py``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.figures: dict[str, Any] = {}
        self.goals: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def add(self, key: str, value: Any) -> None:
        self.figures[key] = value

    def goal(self, label: str, value: float, limit: float, fmt: str = "{:.3f}", lower_is_better: bool = True,
             bound: str = "") -> None:
        """A goal figure: printed with MET / MISSED and, when missed, what bounds it."""
        met = value <= limit if lower_is_better else value >= limit
        shown = fmt.format(value)
        goal_text = f"{'≤' if lower_is_better else '≥'} {fmt.format(limit)}"
        self.goals.append({"label": label, "value": value, "shown": shown, "goal": goal_text, "met": met,
                           "bound": "" if met else bound})
        print(f"  {label:<46} {shown:>12}   goal {goal_text:<10} {'MET' if met else 'MISSED'}"
              + ("" if met or not bound else f"  ({bound})"), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def write(self, path: str | None) -> None:
        if not path:
            return
        Path(path).write_text(json.dumps({"name": self.name, "figures": self.figures, "goals": self.goals,
                                          "notes": self.notes}, indent=2, default=str))

"""What a conversion run did: counts, skipped items with their reason, errors per patient; JSON report.

Reports name source keys (MOSAIQ row ids, archive paths) and UIDs, which an operator needs to find a
problem; they are files the operator asked for, not logs. Console messages stay free of patient data.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class Issue:
    """One thing that could not be converted (or was skipped on purpose), and why.

    ``scope`` is what it concerns (``"patient"``, ``"delivery"``, ``"file"``...), ``key`` the source's
    identifier for it (a row id, a path inside an archive), ``reason`` a short stable category used for
    counting (``"qa-mode"``, ``"no-plan-uid"``...) and ``detail`` the human-readable message.
    """

    scope: str
    key: str
    reason: str
    detail: str = ""

    def as_json(self) -> dict[str, str]:
        """The issue as a JSON object."""
        return {"Scope": self.scope, "Key": self.key, "Reason": self.reason, "Detail": self.detail}


@dataclass
class ConversionReport:
    """Everything one ``rtharvest-convert`` run reports; converters fill it, the CLI prints and saves it."""

    converter: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished_at: str = ""
    counts: Counter[str] = field(default_factory=Counter)
    written: Counter[str] = field(default_factory=Counter)
    skipped: list[Issue] = field(default_factory=list)
    errors: list[Issue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sent: int = 0
    destination_refused: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def skip(self, scope: str, key: str, reason: str, detail: str = "") -> None:
        """Record an item left out on purpose (a QA delivery, a setup field...)."""
        self.skipped.append(Issue(scope, key, reason, detail))

    def error(self, scope: str, key: str, reason: str, detail: str = "") -> None:
        """Record an item that could not be converted (bad input); the run goes on with the others."""
        self.errors.append(Issue(scope, key, reason, detail))

    def warn(self, message: str) -> None:
        """Record a degradation of the whole run (e.g. an optional table is absent)."""
        self.warnings.append(message)

    def wrote(self, modality: str, count: int = 1) -> None:
        """Count objects produced, by DICOM Modality."""
        self.written[modality] += count

    @property
    def objects_written(self) -> int:
        """Objects produced in total."""
        return sum(self.written.values())

    def exit_code(self) -> int:
        """0 unless nothing could be converted or the destination refused (then 1)."""
        if self.destination_refused:
            return 1
        return 0 if self.objects_written > 0 or not self.errors else 1

    def as_json(self) -> dict[str, Any]:
        """The whole report as a JSON object (what ``--report FILE`` writes)."""
        return {
            "Converter": self.converter,
            "StartedAt": self.started_at,
            "FinishedAt": self.finished_at,
            "Counts": dict(sorted(self.counts.items())),
            "Written": dict(sorted(self.written.items())),
            "Sent": self.sent,
            "DestinationRefused": self.destination_refused,
            "SkippedByReason": dict(sorted(Counter(i.reason for i in self.skipped).items())),
            "ErrorsByReason": dict(sorted(Counter(i.reason for i in self.errors).items())),
            "Skipped": [i.as_json() for i in self.skipped],
            "Errors": [i.as_json() for i in self.errors],
            "Warnings": list(self.warnings),
            **self.extra,
        }

    def finish(self) -> None:
        """Stamp the end time."""
        self.finished_at = datetime.now(UTC).isoformat(timespec="seconds")

    def save(self, path: Path) -> None:
        """Write the JSON report to ``path``."""
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n", encoding="utf-8")

    def summary_lines(self) -> list[str]:
        """A few lines for the terminal: counts, objects, skipped and errors by reason (no patient data)."""
        lines = [f"{self.converter}: " + ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))]
        written = ", ".join(f"{v} {k}" for k, v in sorted(self.written.items())) or "nothing"
        lines.append(f"objects written: {written}" + (f"; sent: {self.sent}" if self.sent else ""))
        for title, issues in (("skipped", self.skipped), ("errors", self.errors)):
            if issues:
                by_reason = Counter(i.reason for i in issues)
                lines.append(f"{title}: " + ", ".join(f"{v} {k}" for k, v in sorted(by_reason.items())))
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.destination_refused:
            lines.append("the destination refused objects (see the errors)")
        return lines


class Progress:
    """A one-line progress bar on a terminal (silent when the stream is not a TTY, e.g. in cron or tests)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._active = self.stream.isatty() and self.total > 0

    def step(self, count: int = 1) -> None:
        """Advance by ``count`` items and redraw."""
        self.done += count
        if self._active:
            width = 30
            filled = int(width * min(self.done, self.total) / self.total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            self.stream.flush()

    def grow(self, count: int) -> None:
        """Add ``count`` items to the total (a tar opened to find how many patients it holds)."""
        self.total = max(self.total + count, self.done)

    def close(self) -> None:
        """End the bar's line."""
        if self._active:
            self.stream.write("\n")
            self.stream.flush()

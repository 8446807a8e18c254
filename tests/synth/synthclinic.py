"""The generated-clinic handle shared by the synth tests (a plain module: conftest is not importable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rtharvest.synth.groundtruth import GroundTruth


@dataclass(frozen=True)
class Clinic:
    """A generated clinic: its directory and ground truth."""

    root: Path
    truth: GroundTruth

    def path(self, uid: str) -> Path:
        """Absolute file path of one object."""
        return self.root / self.truth.objects[uid].path

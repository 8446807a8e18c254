"""Shared fixtures: one default clinic per test session (generation takes about a second)."""

from __future__ import annotations

import pytest
from synthclinic import Clinic

from rtharvest.synth.generator import SynthOptions, generate


@pytest.fixture(scope="session")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Clinic:
    """The default clinic (6 patients, seed 7, traps on)."""
    root = tmp_path_factory.mktemp("clinic")
    return Clinic(root, generate(root, SynthOptions()))

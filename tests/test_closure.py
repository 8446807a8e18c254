"""The planner's simulated closure over the synthetic clinic equals its ground truth exactly.

For every window of the ground truth and every source capability (relational or strict hierarchical,
with or without sequence return keys, with or without instance return keys), a harvest simulated
from the treatment records collects exactly ``Expected`` (hence nothing of ``Forbidden``), and its
empty operations name exactly the dangling references of the plan rows.
"""

from __future__ import annotations

import json
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from rtharvest.core.classify import HarvestWindow, registration_type
from rtharvest.core.operations import FindReferencing, RetrieveInstance, RetrieveSeries, Role
from rtharvest.core.strategies import SourceCapability
from rtharvest.synth import generator
from rtharvest.synth.simulation import FakeSource, SimulationResult, simulate_harvest

CAPABILITIES = [SourceCapability(r, s, i) for r in (True, False) for s in (True, False) for i in (True, False)] + [
    # Relational sources that match study/series keys at IMAGE level (Orthanc, ARIA): one C-FIND per search.
    SourceCapability(True, s, i, upper_level_keys=True) for s in (True, False) for i in (True, False)]
#: (patients, seed): the brief's clinic, and one big enough for every feature to land on its own patient.
CLINICS = [(6, 7), (13, 1)]


@dataclass
class Clinic:
    truth: dict[str, Any]
    datasets: list[pydicom.FileDataset]

    def series_modality(self) -> dict[str, str]:
        return {o["SeriesInstanceUID"]: o["Modality"] for o in self.truth["Objects"].values()}


@pytest.fixture(scope="module", params=CLINICS, ids=lambda c: f"{c[0]}p-seed{c[1]}")
def clinic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Clinic:
    patients, seed = request.param
    root: Path = tmp_path_factory.mktemp(f"synth{patients}_{seed}")
    generator.generate(root, generator.SynthOptions(patients=patients, seed=seed))
    truth = json.loads((root / "ground_truth.json").read_text())
    datasets = [pydicom.dcmread(root / o["Path"], stop_before_pixels=True) for o in truth["Objects"].values()]
    return Clinic(truth, datasets)


def run(clinic: Clinic, window: dict[str, Any], cap: SourceCapability) -> SimulationResult:
    return simulate_harvest(FakeSource(clinic.datasets, cap), HarvestWindow.from_dict(window), cap)


def describe(clinic: Clinic, uids: Set[str]) -> list[str]:
    objs = clinic.truth["Objects"]
    return sorted(f"{objs[u]['PatientID']} {objs[u]['Modality']} {objs[u]['Role']} {objs[u]['Traps']}" for u in uids)


@pytest.mark.parametrize("cap", CAPABILITIES, ids=lambda c: c.label())
def test_closure_equals_ground_truth(clinic: Clinic, cap: SourceCapability) -> None:
    assert clinic.truth["Windows"], "the ground truth has no window"
    for window in clinic.truth["Windows"]:
        result = run(clinic, window, cap)
        expected, forbidden = set(window["Expected"]), set(window["Forbidden"])
        assert not result.collected & forbidden, (window["Name"], describe(clinic, result.collected & forbidden))
        assert result.collected == expected, (window["Name"], "missing", describe(clinic, expected - result.collected))
        # What was retrieved only to be inspected and then rejected is never expected.
        assert not result.rejected & expected


@pytest.mark.parametrize("cap", [CAPABILITIES[0], CAPABILITIES[-1]], ids=lambda c: c.label())
def test_plan_rows_agree(clinic: Clinic, cap: SourceCapability) -> None:
    """Plans requested, invalid plans and dangling references match the ground truth's plan rows."""
    for window in clinic.truth["Windows"]:
        result = run(clinic, window, cap)
        rows = window["Plans"]
        requested = {o.sop_uid for o in result.operations if isinstance(o, RetrieveInstance) and o.role is Role.PLAN}
        assert requested == {r["PlanUID"] for r in rows}
        # Missing objects: retrieves that moved nothing.
        not_found = {o.sop_uid for o in result.empty_operations if isinstance(o, RetrieveInstance)}
        not_found |= {o.series_uid for o in result.empty_operations if isinstance(o, RetrieveSeries)}
        assert not_found == {m["UID"] for r in rows for m in r["Missing"]}
        # Invalid plans: kept, nothing planned from them.
        invalid = {d.sop_uid for d in result.decisions
                   if d.operation.role is Role.PLAN and d.decision.keep and not d.decision.operations}
        assert invalid == {r["PlanUID"] for r in rows if r["Status"] == "Invalid"}


def test_registration_types_can_be_derived(clinic: Clinic) -> None:
    """The REG search carries the fixed modality; the REG's planned series give the moving one."""
    modality = clinic.series_modality()
    cap = CAPABILITIES[0]
    window = clinic.truth["Windows"][0]
    result = run(clinic, window, cap)
    truth_types = {uid: t for r in window["Plans"] for uid, t in r["RegistrationTypes"].items()}
    found: dict[str, str] = {}
    for d in result.decisions:
        op = d.operation
        if not (isinstance(op, FindReferencing) and op.role is Role.REGISTRATION and d.decision.keep):
            continue
        moving = next((modality[o.series_uid] for o in d.decision.operations if isinstance(o, RetrieveSeries)),
                      None)
        found.setdefault(d.sop_uid, registration_type(op.fixed_modality, moving))
    assert found == truth_types

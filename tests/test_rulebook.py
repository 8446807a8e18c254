"""The rule book is the single source of the reference links: every hop the planner emits has its entry,
the operation it builds carries what the entry says, and the manifest's completeness check reads the same
entry (a rule changed or removed in the book changes or breaks both)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from rtharvest.core import rulebook
from rtharvest.core.classify import HarvestWindow
from rtharvest.core.manifest import Manifest, PlanRow, build_manifest
from rtharvest.core.operations import (
    FindReferencing,
    FindSeriesInFrameOfReference,
    FindTreatmentRecords,
    Operation,
    RetrieveInstance,
    RetrieveSeries,
    UnpackMimSession,
)
from rtharvest.core.references import ObjectRefs, extract
from rtharvest.core.rulebook import BOOK, Direction, Hop, LinkName, Search, link_of
from rtharvest.core.strategies import SourceCapability
from rtharvest.store.tracking import Decision, ObjectRecord
from rtharvest.synth.simulation import SimulationResult, simulate_harvest

from .planner_fixtures import MiniClinic, image_series, registration, uid

CAP = SourceCapability(True, True, True)
WINDOW_2020 = HarvestWindow("20200101", "20201231")
WINDOW_2023 = HarvestWindow("20230101", "20231231")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "harvest-rules.md"

#: The operation class that carries each way of searching.
SEARCH_OF: dict[type, set[Search]] = {
    FindTreatmentRecords: {Search.WINDOW},
    RetrieveInstance: {Search.BY_UID},
    RetrieveSeries: {Search.SERIES, Search.FRAME_OF_REFERENCE},  # a FoR search's probe fetches its series
    FindReferencing: {Search.IN_STUDY, Search.IN_PATIENT},
    FindSeriesInFrameOfReference: {Search.FRAME_OF_REFERENCE},
    UnpackMimSession: {Search.SESSION},
}


class Clinic(MiniClinic):
    """The mini clinic plus the two rule-9 shapes it lacks: a REG naming its moving images only inside its
    registration item (no series-level listing), and a REG naming a moving FoR without images."""

    def __init__(self) -> None:
        super().__init__()
        p, study = self.patient, self.plan_study
        self.item_mr = image_series("item-mr", p, uid("item-study"), uid("for-item"), "MR", 2)
        self.for_ct = image_series("for-ct", p, uid("for-study"), uid("for-only"), "CT", 2)
        self.reg_item = registration("reg-item", p, study, self.ct_sim, self.item_mr, series_level=False)
        self.reg_for = registration("reg-for", p, study, self.ct_sim, None, for_only=uid("for-only"))

    def datasets(self) -> list[Dataset]:
        return [*super().datasets(), *self.item_mr, *self.for_ct, self.reg_item, self.reg_for]


def harvest(clinic: MiniClinic, window: HarvestWindow) -> SimulationResult:
    return simulate_harvest(clinic.datasets(), window, CAP)


def manifest_of(clinic: MiniClinic, result: SimulationResult) -> Manifest:
    """The manifest of the simulated harvest's kept objects (first keep wins, as in the tracker)."""
    refs: dict[str, ObjectRefs] = {d.SOPInstanceUID: extract(d) for d in clinic.datasets()}
    rows: dict[str, ObjectRecord] = {}
    for d in result.decisions:
        if not d.decision.keep or d.sop_uid in rows:
            continue
        r = refs[d.sop_uid]
        rows[d.sop_uid] = ObjectRecord(
            harvest_id="h", sop_uid=d.sop_uid, orthanc_id=d.sop_uid, decision=Decision.KEPT, reason="",
            role=d.operation.role.value, hop=d.operation.hop.value, source="SRC", job_id=None, moved=True,
            patient_id=r.patient_id, study_uid=r.study_uid, series_uid=r.series_uid, modality=r.modality,
            sop_class_uid=r.sop_class_uid, frame_of_reference_uid=r.frame_of_reference_uid,
            plan_uids=r.record.plan_uids if r.record else (),
            treatment_date=r.record.treatment_date if r.record else None)
    return build_manifest("h", list(rows.values()), lambda o: refs.get(o.sop_uid))


def row_of(manifest: Manifest, plan: Dataset) -> PlanRow:
    return next(r for r in manifest.plans if r.plan_uid == plan.SOPInstanceUID)


def emitted(*results: SimulationResult) -> list[Operation]:
    """Every operation planned, before the queue's deduplication drops those planned twice."""
    return [op for res in results for op in (*res.operations, *(o for d in res.decisions
                                                                for o in d.decision.operations))]


def test_every_hop_has_an_entry_and_every_entry_a_hop() -> None:
    assert {lk.hop for lk in BOOK.values()} == set(Hop)
    assert all(name is lk.name for name, lk in BOOK.items())
    # A reverse link says what its candidates must name; a session search says what it stands in for.
    for lk in BOOK.values():
        if lk.direction is Direction.REVERSE and lk.search is not Search.WINDOW:
            assert lk.criterion is not None, lk.name
        if lk.stands_in_for is not None:
            assert lk.what == "RAW" and lk.stands_in_for.as_session_search() is lk.hop, lk.name


def test_every_operation_the_planner_emits_is_a_book_entry() -> None:
    clinic = Clinic()
    ops = emitted(harvest(clinic, WINDOW_2020), harvest(clinic, WINDOW_2023))
    used: set[LinkName] = set()
    for op in ops:
        lk = link_of(op.hop, op.role)
        used.add(lk.name)
        assert lk.target is op.role, op
        assert lk.search in SEARCH_OF[type(op)], (lk.name, type(op).__name__)
        if isinstance(op, RetrieveInstance):
            assert op.modality == lk.modality, lk.name
        if isinstance(op, FindReferencing):
            assert (op.modality, op.criterion.kind) == (lk.modality, lk.criterion), lk.name
            assert (op.study_uid is not None) is (lk.search is Search.IN_STUDY), lk.name
    # The clinic walks every link of rules 1-10 (MIM sessions: tests/test_planner_mim.py).
    assert used == {name for name, lk in BOOK.items() if lk.rule <= 10}


@pytest.mark.parametrize("name", [LinkName.RECORD_PLAN, LinkName.PLAN_DOSE, LinkName.PLAN_STRUCTURE_SET,
                                  LinkName.STRUCTURE_SET_SERIES, LinkName.STRUCTURE_SET_IMAGE, LinkName.FOR_REG])
def test_a_rule_removed_from_the_book_breaks_planner_and_manifest(name: LinkName,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clinic = MiniClinic()
    result = harvest(clinic, WINDOW_2020)
    manifest_of(clinic, result)  # builds with the whole book
    monkeypatch.delitem(BOOK, name)
    with pytest.raises(KeyError):
        harvest(clinic, WINDOW_2020)
    with pytest.raises(KeyError):
        manifest_of(clinic, result)


def test_a_rule_changed_in_the_book_changes_what_both_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Doses found by what they name (rule 5): a book in which a dose names no plan makes the planner reject
    every dose and the manifest list none, from the same entry."""
    clinic = MiniClinic()
    before = harvest(clinic, WINDOW_2020)
    doses = {clinic.dose.SOPInstanceUID, clinic.beam_dose.SOPInstanceUID}
    assert doses <= before.collected
    assert set(row_of(manifest_of(clinic, before), clinic.plan).dose_uids) == doses

    monkeypatch.setitem(BOOK, LinkName.PLAN_DOSE, replace(BOOK[LinkName.PLAN_DOSE], names=lambda refs: ()))
    after = harvest(clinic, WINDOW_2020)
    assert not doses & after.collected
    assert row_of(manifest_of(clinic, before), clinic.plan).dose_uids == []


def test_a_forward_rule_changed_in_the_book_changes_what_both_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The structure set named by the plan (rule 4): a book in which a plan names none makes the planner fetch
    none and the manifest expect none (no dose names one either)."""
    clinic = MiniClinic()
    before = harvest(clinic, WINDOW_2020)
    assert clinic.ss.SOPInstanceUID in before.collected
    assert row_of(manifest_of(clinic, before), clinic.plan).structure_set_uid == clinic.ss.SOPInstanceUID

    monkeypatch.setitem(BOOK, LinkName.PLAN_STRUCTURE_SET,
                        replace(BOOK[LinkName.PLAN_STRUCTURE_SET], names=lambda refs: ()))
    assert clinic.ss.SOPInstanceUID not in harvest(clinic, WINDOW_2020).collected
    row = row_of(manifest_of(clinic, before), clinic.plan)
    assert row.structure_set_uid is None and row.planning_series_uids == []


def test_each_numbered_rule_of_the_docs_names_its_book_entries() -> None:
    """docs/harvest-rules.md points at the book: each numbered rule names the entries of its number."""
    text = DOCS.read_text(encoding="utf-8")
    for number, entries in rulebook.rules().items():
        match = re.search(rf"^{number}\. .*?(?=^\d+\. |^\n|\Z)", text, re.MULTILINE | re.DOTALL)
        assert match is not None, number
        for name in entries:
            assert f"`{name.value}`" in match.group(0), (number, name)

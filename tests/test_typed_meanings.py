"""Words are for people: rewording every reason changes no status, count or decision (docs/harvest-rules.md,
"Identity"). The planner's rejection reasons, the manifest's missing-link reasons, the identity-mismatch texts
and the failed jobs' error texts are all replaced by other words; the harvest is judged exactly as before."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest

from rtharvest.core import manifest as manifest_module
from rtharvest.core import planner as planner_module
from rtharvest.core.classify import HarvestWindow
from rtharvest.core.manifest import FailureInfo, build_manifest
from rtharvest.core.operations import RetrieveInstance, RetrieveSeries
from rtharvest.core.references import ObjectRefs, extract_from_bytes
from rtharvest.core.strategies import SourceCapability
from rtharvest.export.deid import Profile, SiteKey
from rtharvest.export.verify import expected_rows
from rtharvest.store.tracking import Decision, FailureCode, ObjectRecord
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.simulation import FakeSource, simulate_harvest

HIERARCHICAL = SourceCapability(relational=False, sequence_return_keys=False, instance_return_keys=False)


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth, dict[str, ObjectRefs]]:
    root = tmp_path_factory.mktemp("typed")
    truth = generate(root, SynthOptions(patients=6, seed=7))
    refs = {uid: extract_from_bytes((root / info.path).read_bytes()) for uid, info in truth.objects.items()}
    return root, truth, refs


def _harvest(root: Path, truth: GroundTruth, refs: dict[str, ObjectRefs], error: str) -> dict[str, Any]:
    """Simulate a harvest of the whole window, record its decisions as the tracker does (code and words), fail
    every retrieve that found nothing with ``error`` as its text, and a dose search of one plan; build the
    manifest and what an export would expect of a copy."""
    source = FakeSource([], HIERARCHICAL)
    for info in truth.objects.values():
        source.add(pydicom.dcmread(root / info.path, stop_before_pixels=True))
    w = truth.window("all")
    result = simulate_harvest(source, HarvestWindow(w.date_from, w.date_to, tuple(w.patient_ids or ())),
                              HIERARCHICAL)
    rows: dict[str, ObjectRecord] = {}
    for d in result.decisions:
        keep = Decision.KEPT if d.decision.keep else Decision.REJECTED
        existing = rows.get(d.sop_uid)
        if existing is not None and not (existing.decision is Decision.REJECTED and keep is Decision.KEPT):
            continue
        r = refs[d.sop_uid]
        rows[d.sop_uid] = ObjectRecord(
            "h", d.sop_uid, f"oid-{d.sop_uid}", keep, d.decision.reason, d.operation.role.value, d.operation.hop,
            "SRC", None, True, r.patient_id, r.study_uid, r.series_uid, r.modality, r.sop_class_uid,
            r.frame_of_reference_uid, r.record.plan_uids if r.record else (),
            r.record.treatment_date if r.record else None, reason_code=d.decision.code.value)
    failures = []
    for i, op in enumerate(result.empty_operations):
        if isinstance(op, RetrieveInstance | RetrieveSeries):
            uid = op.sop_uid if isinstance(op, RetrieveInstance) else op.series_uid
            failures.append(FailureInfo(op.kind.value, uid, op.role.value, 1, f"{op.hop}: {uid} {error}",
                                        job_id=i, harvest_id="h", code=FailureCode.NOT_FOUND))
    objects = list(rows.values())
    first = build_manifest("h", objects, lambda o: refs.get(o.sop_uid), failures)
    complete = sorted(p.plan_uid for p in first.plans if p.status == "Complete")
    failures.append(FailureInfo("FindReferencing", complete[0], "DOSE", 3, f"association aborted {error}",
                                job_id=10_000, harvest_id="h"))
    manifest = build_manifest("h", objects, lambda o: refs.get(o.sop_uid), failures)
    site = [p.to_json(causes=True) for p in manifest.plans]
    key = SiteKey("SITEA", b"k" * 32)
    return {
        "decisions": {o.sop_uid: (o.decision, o.reason_code) for o in objects},
        "reasons": Counter(o.reason for o in objects),
        "statuses": {p.plan_uid: p.status for p in manifest.plans},
        "missing": {p.plan_uid: [(m.what, m.uid, m.cause) for m in p.missing] for p in manifest.plans},
        "missing_words": sorted(m.reason for p in manifest.plans for m in p.missing),
        "mismatches": manifest.summary.to_json()["PatientIDMismatches"]["Count"],
        "expected_copy": {r["PlanUID"]: r["Status"] for r in expected_rows(site, key, Profile(), key.pseudonym)},
        "search_failed_plan": complete[0],
        "search_failed_copy": key.uid(complete[0]),
    }


def test_rewording_every_reason_changes_no_status(clinic: tuple[Path, GroundTruth, dict[str, ObjectRefs]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, truth, refs = clinic
    before = _harvest(root, truth, refs, "not found at SRC")
    for module, name in ((planner_module, "REASON_TEXT"), (planner_module, "MISMATCH_TEXT"),
                         (manifest_module, "MISSING_TEXT"), (manifest_module, "MISMATCH_KEPT_TEXT")):
        table = getattr(module, name)
        monkeypatch.setattr(module, name, {k: f"reworded {name} {i}" for i, k in enumerate(table)})
    monkeypatch.setattr(manifest_module, "IMAGES_TEXT", "reworded images")
    after = _harvest(root, truth, refs, "is nowhere")
    # The words did change ...
    assert before["reasons"] != after["reasons"] and before["missing_words"] != after["missing_words"]
    assert any(w.startswith("reworded") for w in after["missing_words"])
    # ... and nothing a decision, a status or a count depends on.
    for what in ("decisions", "statuses", "missing", "mismatches", "expected_copy"):
        assert before[what] == after[what], what
    assert set(before["statuses"].values()) >= {"Complete", "Incomplete", "Missing", "Invalid"}
    # A plan incomplete only for a failed search is expected Complete in a copy, whatever the words.
    plan = before["search_failed_plan"]
    assert before["statuses"][plan] == "Incomplete"
    assert after["expected_copy"][after["search_failed_copy"]] == "Complete"

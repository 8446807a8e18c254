"""RayStation export script: selection and ScriptableDicomExport arguments, contract-tested with fake
RayStation objects (the names and shapes of RayStation's scripting API the script relies on)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rtharvest.converters.raystation import bundle, selection
from rtharvest.converters.raystation.selection import (
    BeamSetChoice,
    Destination,
    ExportFailed,
    PatientLookupFailed,
    Skipped,
    TreatedPlan,
    export_arguments,
    export_case,
    export_patients,
    find_patient_info,
    parse_treated_plans,
    select_beam_sets,
    summary_json,
)
from rtharvest.core.manifest import Manifest, PlanRow, Summary

PACKAGE = Path(selection.__file__).parent


class InvalidOperationException(Exception):
    """What RayStation raises (System.InvalidOperationException) when preconditions warn."""


def exam(name: str, frame_of_reference: str) -> SimpleNamespace:
    return SimpleNamespace(Name=name, EquipmentInfo=SimpleNamespace(FrameOfReference=frame_of_reference))


def beam_set(label: str, status: str | None, uid: str | None, planned_on: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(
        DicomPlanLabel=label,
        Review=None if status is None else SimpleNamespace(ApprovalStatus=status),
        ModificationInfo=None if uid is None else SimpleNamespace(DicomUID=uid),
        GetPlanningExamination=lambda: planned_on,
    )


class FakeCase:
    """A case with a planning CT, a registered MR and an unrelated CT; records every export call."""

    def __init__(self, events: list[str], warnings: list[str] | None = None, blocking: str | None = None) -> None:
        self.CaseName = "Case 1"
        ct, mr, old, cbct = exam("CT 1", "FOR.A"), exam("MR 1", "FOR.B"), exam("CT old", "FOR.C"), exam("CBCT", "FOR.D")
        self.Examinations = [ct, mr, old, cbct]
        self.TreatmentPlans = [
            SimpleNamespace(Name="Prostate", Review=None, BeamSets=[
                beam_set("PR1", "Approved", "1.2.3.1", ct),
                beam_set("PR1 trial", "UnApproved", "1.2.3.2", ct),
                beam_set("PR2", "Approved", None, ct),
            ]),
            # Versions that review whole plans: the approval sits on the plan.
            SimpleNamespace(Name="Boost", Review=SimpleNamespace(ApprovalStatus="Approved"), BeamSets=[
                beam_set("BO1", None, "1.2.3.3", ct),
            ]),
        ]
        self.Registrations = [
            SimpleNamespace(FromFrameOfReference="FOR.B", ToFrameOfReference="FOR.A", StructureRegistrations=[1]),
            SimpleNamespace(FromFrameOfReference="FOR.D", ToFrameOfReference="FOR.C", StructureRegistrations=[1]),
            SimpleNamespace(FromFrameOfReference="FOR.C", ToFrameOfReference="FOR.A", StructureRegistrations=[]),
        ]
        self.PatientModel = SimpleNamespace(StructureRegistrationGroups=[
            SimpleNamespace(Name="DIR", DeformableStructureRegistrations=[
                SimpleNamespace(FromExamination=mr, ToExamination=ct),
                SimpleNamespace(FromExamination=cbct, ToExamination=old),
            ]),
        ])
        self.events = events
        self.calls: list[dict[str, Any]] = []
        self.warnings = warnings
        self.blocking = blocking

    def ScriptableDicomExport(self, **kwargs: Any) -> str:  # noqa: N802 - RayStation's name
        self.calls.append(kwargs)
        self.events.append(f"export ignore={kwargs['IgnorePreConditionWarnings']}")
        if self.blocking:
            raise InvalidOperationException(self.blocking)
        if self.warnings and not kwargs["IgnorePreConditionWarnings"]:
            raise InvalidOperationException(json.dumps({"Comment": "Export aborted", "Warnings": self.warnings}))
        return json.dumps({"Comment": "Export successful", "Warnings": ["ignored: " + w for w in self.warnings or []],
                           "Notifications": ["1 plan exported"]})


class FakePatient:
    def __init__(self, cases: list[FakeCase], events: list[str]) -> None:
        self.Cases = cases
        self.events = events

    def Save(self) -> None:  # noqa: N802 - RayStation's name
        self.events.append("save")


def test_selection_takes_approved_beam_sets_and_filters_on_treated_plan_uids() -> None:
    case = FakeCase([])
    chosen, skipped = select_beam_sets(case)
    assert chosen == [BeamSetChoice("Prostate:PR1", "1.2.3.1", "CT 1"), BeamSetChoice("Prostate:PR2", "", "CT 1"),
                      BeamSetChoice("Boost:BO1", "1.2.3.3", "CT 1")]
    assert skipped == [Skipped("Prostate:PR1 trial", "not-approved")]
    chosen, skipped = select_beam_sets(case, ["1.2.3.3", "1.2.3.2"])
    assert chosen == [BeamSetChoice("Boost:BO1", "1.2.3.3", "CT 1")]
    assert skipped == [Skipped("Prostate:PR1", "not-treated"), Skipped("Prostate:PR1 trial", "not-approved"),
                       Skipped("Prostate:PR2", "never-exported")]


@pytest.mark.parametrize(("destination", "connection"), [
    (Destination(title="AUXPACS"), {"Connection": {"Title": "AUXPACS"}}),
    (Destination(host="pacs.example.org", port=104, called_ae="AUXPACS", calling_ae="RS"),
     {"Connection": {"Node": "pacs.example.org", "Port": 104, "CallingAE": "RS", "CalledAE": "AUXPACS"}}),
    (Destination(folder="D:/export"), {"ExportFolderPath": "D:/export"}),
])
def test_export_arguments(destination: Destination, connection: dict[str, Any]) -> None:
    case = FakeCase([])
    chosen, _ = select_beam_sets(case, ["1.2.3.1", "1.2.3.3"])
    assert export_arguments(case, chosen, destination) == {
        **connection,
        "Examinations": ["CT 1"],
        "RtStructureSetsReferencedFromBeamSets": ["Prostate:PR1", "Boost:BO1"],
        "BeamSets": ["Prostate:PR1", "Boost:BO1"],
        "PhysicalBeamSetDoseForBeamSets": ["Prostate:PR1", "Boost:BO1"],
        "PhysicalBeamDosesForBeamSets": ["Prostate:PR1", "Boost:BO1"],
        # Only registrations of the planning examination's FoR; the empty one is no registration.
        "SpatialRegistrationForExaminations": ["MR 1:CT 1"],
        "DeformableSpatialRegistrationsForExaminations": ["DIR:MR 1:CT 1"],
        "IgnorePreConditionWarnings": False,
    }
    with pytest.raises(ValueError, match="destination"):
        export_arguments(case, chosen, Destination())


def test_precondition_warnings_are_logged_then_overridden(caplog: pytest.LogCaptureFixture) -> None:
    case = FakeCase([], warnings=["The structure set is not approved"])
    chosen, _ = select_beam_sets(case, ["1.2.3.1"])
    with caplog.at_level(logging.INFO, logger="rtharvest.raystation"):
        result = export_case(case, chosen, Destination(title="AUXPACS"))
    assert [c["IgnorePreConditionWarnings"] for c in case.calls] == [False, True]
    assert case.calls[0] == {**case.calls[1], "IgnorePreConditionWarnings": False}
    assert result["PreconditionWarnings"] == ["The structure set is not approved"]
    assert "precondition warning overridden: The structure set is not approved" in caplog.text
    assert "export notification: 1 plan exported" in caplog.text


def test_a_blocking_error_is_not_overridden() -> None:
    case = FakeCase([], blocking="Dose is not computed")
    chosen, _ = select_beam_sets(case, ["1.2.3.1"])
    with pytest.raises(ExportFailed, match="Dose is not computed"):
        export_case(case, chosen, Destination(title="AUXPACS"))
    assert len(case.calls) == 1


def test_patients_are_saved_before_export_and_failures_do_not_stop_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    events: list[str] = []
    patients = {"PID-A": FakePatient([FakeCase(events)], events),
                "PID-C": FakePatient([FakeCase(events, blocking="Locked by another user")], events)}

    class FakeDb:
        def QueryPatientInfo(self, Filter: dict[str, str]) -> list[dict[str, str]]:  # noqa: N802,N803
            return [{"PatientID": pid} for pid in [*patients, "PID-B"] if re.search(Filter["PatientID"], pid)]

        def LoadPatient(self, PatientInfo: dict[str, str], AllowPatientUpgrade: bool) -> FakePatient:  # noqa: N802,N803
            assert AllowPatientUpgrade is False, "the script must never upgrade a patient's data"
            if PatientInfo["PatientID"] == "PID-B":
                raise RuntimeError("patient is corrupt")
            return patients[PatientInfo["PatientID"]]

    with caplog.at_level(logging.INFO, logger="rtharvest.raystation"):
        outcomes = export_patients(FakeDb(), ["PID-A", "PID-B", "PID-C", "PID-X"], ["1.2.3.1", "1.2.3.3"],
                                   Destination(title="AUXPACS"))
    assert [(o.patient_id, o.exported, bool(o.error)) for o in outcomes] == [
        ("PID-A", ["1.2.3.1", "1.2.3.3"], False), ("PID-B", [], True), ("PID-C", [], True), ("PID-X", [], True)]
    assert events[:2] == ["save", "export ignore=False"], "saved before exporting"
    assert events.count("save") == 2
    assert "PID-" not in caplog.text, "the log names patients by position, not by ID"
    assert "patient 1/4: 2 beam set(s) exported (1.2.3.1, 1.2.3.3)" in caplog.text
    summary = summary_json(outcomes)
    assert summary["Patients"] == 4 and summary["Exported"] == 2 and summary["Failed"] == 3
    assert summary["PerPatient"][0]["PatientID"] == "PID-A"


def test_treated_plans_from_the_manifest_the_mosaiq_report_or_a_list() -> None:
    manifest = Manifest("H1", Summary(), [PlanRow("P1", "1.2.3.1", status="Complete"),
                                          PlanRow("P2", "1.2.3.9", status="Missing"),
                                          PlanRow("P1", "1.2.3.1", status="Complete")])
    expected = [TreatedPlan("P1", "1.2.3.1"), TreatedPlan("P2", "1.2.3.9")]
    assert parse_treated_plans(json.dumps(manifest.to_json())) == expected
    assert parse_treated_plans(manifest.to_csv()) == expected
    mosaiq = {"Converter": "mosaiq", "Records": [{"SOPInstanceUID": "9.9", "PatientID": "P1", "PlanUID": "1.2.3.1"},
                                                  {"SOPInstanceUID": "9.8", "PatientID": "P2", "PlanUID": "1.2.3.9"}]}
    assert parse_treated_plans(json.dumps(mosaiq)) == expected
    assert parse_treated_plans("# treated\n1.2.3.1\n\n1.2.3.9\n") == [TreatedPlan("", "1.2.3.1"),
                                                                       TreatedPlan("", "1.2.3.9")]


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Modules imported when the file is imported (not inside functions), relative imports excepted."""
    found: list[str] = []
    nodes: list[ast.stmt] = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append(node.module or "")
        elif isinstance(node, ast.Try):
            nodes.extend([*node.body, *(s for h in node.handlers for s in h.body), *node.orelse, *node.finalbody])
        elif isinstance(node, ast.If):
            nodes.extend([*node.body, *node.orelse])
    return found


def test_the_script_runs_in_raystations_interpreter_without_connect_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    # RayStation's CPython has the standard library (3.6 at the oldest: no dataclasses) and nothing else.
    allowed = set(sys.stdlib_module_names) - {"dataclasses"} | {"selection"}
    for name in ("selection.py", "export_script.py"):
        tree = ast.parse((PACKAGE / name).read_text(), feature_version=(3, 6))
        imported = _module_level_imports(tree)
        assert "connect" not in imported
        assert not [m for m in imported if m.split(".")[0] not in allowed], f"{name} imports {imported}"
    monkeypatch.delitem(sys.modules, "connect", raising=False)
    script = importlib.import_module("rtharvest.converters.raystation.export_script")
    assert callable(script.main) and isinstance(script.DESTINATION, Destination)
    with pytest.raises(ImportError, match="connect"):
        script.main()


class RegexPatientDb:
    """RayStation's PatientDB as far as the lookup goes: QueryPatientInfo matches its filter values as regular
    expressions anywhere in the value (unanchored), so an exact lookup must anchor and escape."""

    def __init__(self, ids: list[str], events: list[str]) -> None:
        self.ids = ids
        self.events = events
        self.filters: list[str] = []
        self.loaded: list[str] = []

    def QueryPatientInfo(self, Filter: dict[str, str]) -> list[dict[str, str]]:  # noqa: N802,N803
        self.filters.append(Filter["PatientID"])
        return [{"PatientID": pid, "LastName": "X"} for pid in self.ids if re.search(Filter["PatientID"], pid)]

    def LoadPatient(self, PatientInfo: dict[str, str], AllowPatientUpgrade: bool) -> FakePatient:  # noqa: N802,N803
        self.loaded.append(PatientInfo["PatientID"])
        return FakePatient([FakeCase(self.events)], self.events)


def test_patient_lookup_is_exact_despite_prefixes_and_regex_characters() -> None:
    db = RegexPatientDb(["1234", "123", "$00002785", "A+B", "AAB", "x$00002785"], [])
    assert find_patient_info(db, "123")["PatientID"] == "123"  # not "1234", which an unanchored "123" finds first
    assert find_patient_info(db, "$00002785")["PatientID"] == "$00002785"  # "$" is no end-of-text here
    assert find_patient_info(db, "A+B")["PatientID"] == "A+B"  # "+" is no repetition ("AAB" stays out)
    assert db.filters[:2] == ["^123$", "^\\$00002785$"]
    with pytest.raises(PatientLookupFailed, match="not in the RayStation database"):
        find_patient_info(db, "12")


def test_patient_lookup_checks_the_answers_whatever_the_filter_matched() -> None:
    class IgnoresFilter(RegexPatientDb):
        def QueryPatientInfo(self, Filter: dict[str, str]) -> list[dict[str, str]]:  # noqa: N802,N803
            return [{"PatientID": pid} for pid in self.ids]

    db = IgnoresFilter(["1234", "123", "DUP", "DUP"], [])
    assert find_patient_info(db, "123") == {"PatientID": "123"}
    with pytest.raises(PatientLookupFailed, match="not in the RayStation database \\(4 other patient"):
        find_patient_info(db, "12")
    with pytest.raises(PatientLookupFailed, match="2 patients .* have this PatientID: none is loaded"):
        find_patient_info(db, "DUP")


def _load_bundle() -> Any:
    """The shipped single-file script, loaded from its path as RayStation's script database would run it."""
    spec = importlib.util.spec_from_file_location("rtharvest_raystation_export", bundle.BUNDLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_single_file_script_is_in_sync_with_its_sources() -> None:
    """Regenerate with ``python -m rtharvest.converters.raystation.bundle`` when this fails."""
    assert bundle.BUNDLE.read_text(encoding="utf-8") == bundle.build()


def test_the_single_file_script_needs_nothing_beside_it() -> None:
    text = bundle.BUNDLE.read_text(encoding="utf-8")
    tree = ast.parse(text, feature_version=(3, 6))
    allowed = set(sys.stdlib_module_names) - {"dataclasses"}
    imported = _module_level_imports(tree)
    assert "connect" not in imported and not [m for m in imported if m.split(".")[0] not in allowed], imported
    assert "__file__" not in text and "import selection" not in text and "from .selection" not in text


def test_the_single_file_script_exports_exactly_the_listed_patients_with_a_fake_connect(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    events: list[str] = []
    db = RegexPatientDb(["1234", "123", "$00002785", "DUP", "DUP"], events)
    connect = type(sys)("connect")
    connect.get_current = lambda what: {"PatientDB": db}[what]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "connect", connect)
    script = _load_bundle()
    assert "selection" not in script.__dict__ and callable(script.find_patient_info)
    script.PATIENT_IDS = ["123", "$00002785", "12", "DUP"]
    script.LOG_FILE = str(tmp_path / "export.log")
    script.SUMMARY_FILE = str(tmp_path / "summary.json")
    try:
        failed = script.main()
    finally:
        logging.getLogger("rtharvest.raystation").handlers.clear()
    assert db.loaded == ["123", "$00002785"]  # never "1234", never one of two "DUP"
    assert failed == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    errors = {p["PatientID"]: p["Error"] for p in summary["PerPatient"]}
    assert errors["123"] == "" and errors["$00002785"] == ""
    assert errors["12"].startswith("not in the RayStation database")
    assert errors["DUP"].startswith("2 patients")
    log = (tmp_path / "export.log").read_text()
    assert "patient 4/4: 2 patients in the RayStation database" in log and "DUP" not in log

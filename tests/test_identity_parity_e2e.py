"""One rule for identity on every source kind (docs/harvest-rules.md, "Identity"): the identity-trap clinic
(tests/identity_clinic.py) harvested from Orthanc, dcmqrscp (default and strict) and pynetdicom's Q/R SCP
collects the same objects and gives the same manifest: objects linked by UID are collected whatever their
PatientID, and each mismatch is reported with its plan.

The trap clinic gets sources of its own (one of each kind, started once for this module): loaded into the
session's sources it would sit in every later whole-history harvest of the synthetic clinic. The harvester
is the session's, restarted on a fresh store per source so that no harvest plans from another's copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from rtharvest.synth.loader import index_for_dcmqrscp, store_to_scp

from .conftest import SOURCE_SETTINGS, Clinic
from .harvesting import stored_sop_uids, wait_completed
from .identity_clinic import WINDOW_FROM, WINDOW_TO, IdentityClinic, build
from .servers import LOCALHOST, DicomSource, start_dcmqrscp, start_orthanc_source, start_pynetdicom_qrscp

#: Each trap source with the settings of the session source of its kind.
KINDS = {"IDT_ORTHANC": "ORTHANC_SRC", "IDT_DCMQR": "DCMQRSCP", "IDT_STRICT": "DCMQRSCP_STRICT",
         "IDT_PYQR": "PYNETDICOM"}


@pytest.fixture(scope="module")
def trap_sources(clinic: Clinic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IdentityClinic,
                                                                                             dict[str, DicomSource]]]:
    base = tmp_path_factory.mktemp("identity")
    traps = build(base / "files")
    port = clinic.harvester.dicom_port
    sources: dict[str, DicomSource] = {}
    try:
        for source in (start_orthanc_source(base / "orthanc", port, name="IDT_ORTHANC", aet="IDTORTHANC"),
                       start_dcmqrscp(base / "dcmqr", port, name="IDT_DCMQR", aet="IDTDCMQR"),
                       start_dcmqrscp(base / "strict", port, strict=True, name="IDT_STRICT", aet="IDTSTRICT"),
                       start_pynetdicom_qrscp(base / "pyqr", port, name="IDT_PYQR", aet="IDTPYQR")):
            sources[source.name] = source
            if source.kind.startswith("dcmqrscp"):
                assert source.storage is not None
                stored = index_for_dcmqrscp(traps.files, source.storage)
            else:
                stored = store_to_scp(traps.files, LOCALHOST, source.port, source.aet)
            assert stored == len(traps.files)
        yield traps, sources
    finally:
        for source in sources.values():
            source.stop()
        clinic.restart_harvester(fresh=True)


def _comparable(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan rows as every source must show them (no harvest-specific values)."""
    return [{k: v for k, v in row.items()} for row in manifest["Plans"]]


def test_identity_traps_give_the_same_harvest_on_every_source_kind(
        clinic: Clinic, trap_sources: tuple[IdentityClinic, dict[str, DicomSource]]) -> None:
    traps, sources = trap_sources
    overrides = {f"RtHarvest.Sources.{name}": SOURCE_SETTINGS[kind] for name, kind in KINDS.items()}
    results: dict[str, tuple[set[str], list[dict[str, Any]], dict[str, Any]]] = {}
    for name in KINDS:
        clinic.restart_harvester(fresh=True, extra_sources=sources, overrides=overrides)
        answer = clinic.api.post("/rtharvest/harvests", {"Source": name, "From": WINDOW_FROM, "To": WINDOW_TO})
        harvest_id = str(answer["ID"])
        doc = wait_completed(clinic.api, harvest_id)
        manifest = clinic.api.get(f"/rtharvest/harvests/{harvest_id}/manifest")
        collected = set(stored_sop_uids(clinic.api))
        results[name] = (collected, _comparable(manifest), manifest["Summary"]["PatientIDMismatches"])
        # Every object of the clinic is collected (each is linked by UID to a treated plan), nothing else.
        assert collected == traps.expected, (name, sorted(traps.expected - collected),
                                             sorted(collected - traps.expected))
        # Each plan complete, and each object whose PatientID is not its plan's reported with that plan.
        rows = {row["PlanUID"]: row for row in manifest["Plans"]}
        assert set(rows) == set(traps.mismatched), name
        for plan_uid, row in rows.items():
            assert row["Status"] == "Complete" and row["Missing"] == [], (name, row)
            assert {m["UID"] for m in row["PatientIDMismatches"]} == traps.mismatched[plan_uid], (name, row)
        mismatches = manifest["Summary"]["PatientIDMismatches"]
        assert mismatches["Count"] == sum(len(m) for m in traps.mismatched.values()), (name, mismatches)
        # The harvest document reports the same mismatches once the harvest is done.
        assert doc["PatientIDMismatches"] == mismatches, (name, doc["PatientIDMismatches"])
        # What rules discarded is counted, never silent: the frame-of-reference searches list every series of
        # the patients' studies and drop the plans, doses, records and structure sets among them.
        discarded = doc["Discarded"]
        assert discarded["ByReason"].get("ANSWER_OTHER_MODALITY", 0) > 0, (name, discarded)
        assert discarded["Count"] == sum(discarded["ByReason"].values())
    reference = results["IDT_ORTHANC"]
    for name, result in results.items():
        assert result == reference, name

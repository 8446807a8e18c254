"""End to end: the auxiliary PACS workflow with MIM sessions.

Treatment records sit in one source (the record-and-verify system, or the MOSAIQ converter's output);
plans, structure sets, doses, images and MIM sessions sit in an auxiliary Orthanc, and the clinic's
registrations exist **only inside MIM sessions** (Raw Data objects in the three encodings). A harvester with
``RtHarvest.UnpackMimSessions: true`` must yield the complete chain: the store equals the synthetic
clinic's expected set, and each REG found only inside a session is followed to its registered series.
One plan's structure set, too, exists only inside a session: the plan names it by UID, no source holds it
as an object, and the harvester finds it by unpacking the patient's sessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rtharvest.edge.launcher import OrthancProcess, free_port
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, store_to_scp
from rtharvest.synth.mimsession import SessionEncoding, SessionFixture, clinic_sessions

from .conftest import start_harvester
from .harvesting import assert_provenance, assert_store_equals_truth, provenance_of, start_harvest, wait_completed
from .servers import LOCALHOST, DicomSource, RestClient, start_orthanc_source

pytestmark = pytest.mark.servers


@dataclass
class AuxClinic:
    harvester: OrthancProcess
    api: RestClient
    sessions: list[SessionFixture]
    truth: GroundTruth
    #: A structure set the auxiliary PACS holds only inside MIM sessions.
    hidden_structure_set: str


@pytest.fixture(scope="module")
def aux_clinic(tmp_path_factory: pytest.TempPathFactory, synthetic: tuple[Path, GroundTruth]) -> Iterator[AuxClinic]:
    out, truth = synthetic
    base = tmp_path_factory.mktemp("auxpacs")
    sessions = clinic_sessions(out, truth, base / "sessions")
    harvest_port = free_port()
    records = start_orthanc_source(base / "records", harvest_port, name="RECORDS", aet="RECORDS")
    aux = start_orthanc_source(base / "aux", harvest_port, name="AUXPACS", aet="AUXPACS")
    harvester: OrthancProcess | None = None
    try:
        files = {path.stem: path for path in dicom_files(out)}
        modality = {uid: info.modality for uid, info in truth.objects.items()}
        expected = set(truth.window("all").expected)
        hidden = next(uid for s in sessions for uid in s.embedded_uids
                      if modality[uid] == "RTSTRUCT" and uid in expected)
        store_to_scp([p for uid, p in files.items() if modality[uid] == "RTRECORD"], LOCALHOST, records.port,
                     records.aet)
        # The auxiliary PACS: everything but the records and the REGs, which exist only inside the sessions.
        store_to_scp([p for uid, p in files.items() if modality[uid] not in ("RTRECORD", "REG") and uid != hidden]
                     + [s.path for s in sessions], LOCALHOST, aux.port, aux.aet)
        sources: dict[str, DicomSource] = {"RECORDS": records, "AUXPACS": aux}
        harvester = start_harvester(base / "harvester", harvest_port, sources,
                                    overrides={"RtHarvest.UnpackMimSessions": True})
        yield AuxClinic(harvester, RestClient(harvester.url, harvester.credentials), sessions, truth, hidden)
    finally:
        if harvester is not None:
            harvester.stop()
        records.stop()
        aux.stop()


def test_registrations_only_inside_mim_sessions_complete_the_chain(aux_clinic: AuxClinic) -> None:
    api, truth = aux_clinic.api, aux_clinic.truth
    assert {s.encoding for s in aux_clinic.sessions} == set(SessionEncoding), "every encoding carries a chain"
    window = truth.window("all")
    harvest_id = start_harvest(api, window, "RECORDS", lookup=["AUXPACS"])
    wait_completed(api, harvest_id)

    # The complete chain, and nothing else: no session container is left in the store.
    stored = assert_store_equals_truth(api, window)
    assert_provenance(api, stored, harvest_id, {"RECORDS", "AUXPACS"})

    sessions_of: dict[str, set[str]] = {}
    for session in aux_clinic.sessions:
        for uid in session.embedded_uids:
            sessions_of.setdefault(uid, set()).add(session.raw_uid)
    expected_regs = {uid for uid in window.expected if truth.objects[uid].modality == "REG"}
    assert expected_regs, "the window collects registrations"
    for uid in expected_regs | {aux_clinic.hidden_structure_set}:
        meta = api.get(f"/instances/{stored[uid]}/metadata?expand") | provenance_of(api, stored[uid])
        assert meta["HarvestHop"] == f"RAW->{truth.objects[uid].modality}", meta
        assert meta["HarvestMimSession"] in sessions_of[uid], meta
        assert meta["HarvestSource"] == "AUXPACS"

    # Each REG was followed to its registered series, and the manifest counts it as a REG of its plan.
    manifest = api.get(f"/rtharvest/harvests/{harvest_id}/manifest")
    rows = {row["PlanUID"]: row for row in manifest["Plans"]}
    followed = 0
    for plan in window.plans:
        row = rows[plan.plan_uid]
        assert row["Status"] == plan.status, (plan.plan_uid, row["Missing"])
        assert sorted(row["RegistrationUIDs"]) == sorted(plan.registration_uids)
        assert sorted(row["RegisteredSeriesUIDs"]) == sorted(plan.registered_series_uids)
        followed += len(plan.registered_series_uids)
        for series_uid in plan.registered_series_uids:
            assert any(truth.objects[u].series_uid == series_uid for u in stored), series_uid
    assert followed, "registered series were reached through the sessions' REGs"
    # The structure set found only inside a session is the one the manifest names for its plan(s).
    hidden_plans = [p.plan_uid for p in window.plans if p.structure_set_uid == aux_clinic.hidden_structure_set]
    assert hidden_plans, "a plan of the window names the structure set hidden in a session"
    for plan_uid in hidden_plans:
        assert rows[plan_uid]["StructureSetUID"] == aux_clinic.hidden_structure_set, rows[plan_uid]
        assert all(m["UID"] != aux_clinic.hidden_structure_set for m in rows[plan_uid]["Missing"]), rows[plan_uid]
    assert manifest["Summary"]["Registrations"] == window.summary.to_dict()["Registrations"]

    # A second harvest of the window finds the unpacked objects in the store: the sessions are inspected
    # again (the first harvest kept their content, so their rejection was not remembered), nothing else
    # moves, and its manifest lists the same registrations.
    second = start_harvest(api, window, "RECORDS", lookup=["AUXPACS"])
    wait_completed(api, second)
    assert set(assert_store_equals_truth(api, window)) == set(stored)
    again = {row["PlanUID"]: row for row in api.get(f"/rtharvest/harvests/{second}/manifest")["Plans"]}
    for plan in window.plans:
        assert sorted(again[plan.plan_uid]["RegistrationUIDs"]) == sorted(plan.registration_uids)
        assert again[plan.plan_uid]["Status"] == plan.status
        assert again[plan.plan_uid]["StructureSetUID"] == plan.structure_set_uid

"""End to end: synthetic MOSAIQ clinic -> converter -> auxiliary Orthanc -> harvest; the store equals the truth.

The auxiliary Orthanc holds what a MOSAIQ site's PACS holds (plans, images, structure sets, doses,
registrations); the converter C-STOREs the records it builds from the MOSAIQ database there; the
harvester then harvests with that Orthanc as its Source, exactly as for a site with DICOM records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtharvest.converters import cli
from rtharvest.edge.launcher import free_port
from rtharvest.synth.generator import SynthOptions
from rtharvest.synth.loader import dicom_files, store_to_scp
from rtharvest.synth.mosaiq import DATABASE, generate_mosaiq

from ..conftest import start_harvester
from ..harvesting import start_harvest, stored_sop_uids, wait_completed
from ..servers import LOCALHOST, RestClient, start_orthanc_source

pytestmark = pytest.mark.servers


def test_converted_mosaiq_clinic_harvests_to_ground_truth(tmp_path: Path) -> None:
    truth = generate_mosaiq(tmp_path / "clinic", SynthOptions(patients=6, seed=7))
    harvest_port = free_port()
    aux = start_orthanc_source(tmp_path / "aux", harvest_port, name="AUXPACS", aet="AUXPACS")
    harvester = None
    try:
        files = dicom_files(tmp_path / "clinic")
        assert store_to_scp(files, LOCALHOST, aux.port, aux.aet) == len(files)
        report_path = tmp_path / "report.json"
        code = cli.main(["mosaiq", "--db", f"sqlite:///{tmp_path / 'clinic' / DATABASE}",
                         "--from", truth.first_day, "--to", truth.last_day,
                         "--send", f"{aux.aet}@{LOCALHOST}:{aux.port}", "--report", str(report_path),
                         "--salt", "e2e-site"])
        report = json.loads(report_path.read_text())
        assert code == 0 and report["Sent"] == len(truth.records), report["Errors"]

        # Converted records sit in their plan's study, whose StudyDate is the planning date (often months before
        # the fractions): the auxiliary Orthanc is asked by TreatmentDate, which it matches, not by StudyDate.
        harvester = start_harvester(tmp_path / "harvester", harvest_port, {"AUXPACS": aux}, overrides={
            "RtHarvest.Sources.AUXPACS": {"Backend": "orthanc", "QueryModel": "relational",
                                          "InstanceReturnKeys": True, "RecordDiscovery": "TreatmentDate"}})
        api = RestClient(harvester.url, harvester.credentials)
        window = truth.window("all")
        harvest_id = start_harvest(api, window, "AUXPACS")
        wait_completed(api, harvest_id)

        # Converted records are known to the truth by content (patient, plan, day, machine), not by UID.
        by_content: dict[tuple[str, str, str], list[str]] = {}
        for rec in report["Records"]:
            by_content.setdefault((rec["PatientID"], rec["PlanUID"], rec["TreatmentDate"]), []).append(
                rec["SOPInstanceUID"])
        expected_records: set[str] = set()
        for index in window.expected_records:
            record = truth.records[index]
            candidates = by_content[(record.patient_id, record.plan_uid, record.treatment_date)]
            expected_records.add(candidates.pop(0))
        stored = set(stored_sop_uids(api))
        expected = set(window.expected) | expected_records
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        assert not missing, f"{len(missing)} expected instance(s) missing, e.g. {missing[:5]}"
        assert not extra, f"{len(extra)} instance(s) collected beyond the truth, e.g. {extra[:5]}"
        assert not stored & set(window.forbidden)
    finally:
        if harvester is not None:
            harvester.stop()
        aux.stop()

"""End to end: a Pinnacle archive converted and C-STOREd into an auxiliary Orthanc, then harvested.

A treatment record (made with the synthetic clinic's IOD builders) references the RT Plan converted from
one trial; the harvester, seeded by that record at the auxiliary PACS, must collect exactly the chain:
record, that plan, its structure set, the CT it names and the trial's doses; not the other trial's plan
in the same study, its doses, nor the other Pinnacle plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from rtharvest.converters import cli
from rtharvest.core.sopclass import SopClass
from rtharvest.edge.launcher import free_port
from rtharvest.synth import iods
from rtharvest.synth.loader import store_to_scp
from rtharvest.synth.pinnacle import PinnacleCase, write_institution

from ..conftest import start_harvester
from ..harvesting import assert_provenance, stored_sop_uids, wait_completed
from ..servers import LOCALHOST, RestClient, start_orthanc_source

pytestmark = pytest.mark.servers


def test_converted_pinnacle_plan_is_harvested_as_a_complete_chain(tmp_path: Path) -> None:
    case = PinnacleCase("HFP", "16.2", with_dicom=True, with_img=False, number=7)
    (truth,) = write_institution(tmp_path / "src", [case])
    patient_dir = tmp_path / "src" / "Institution_1" / "Mount_0" / truth.folder
    harvest_port = free_port()
    aux = start_orthanc_source(tmp_path / "aux", harvest_port, name="ORTHANC_SRC", aet="PINAUX")
    harvester = None
    try:
        # 1. Convert straight into the auxiliary PACS, and once more into a folder to know what was sent.
        code = cli.main(
            [
                "pinnacle",
                str(patient_dir),
                "--send",
                f"PINAUX@{LOCALHOST}:{aux.port}",
                "--report",
                str(tmp_path / "sent.json"),
            ]
        )
        sent = json.loads((tmp_path / "sent.json").read_text())
        assert code == 0 and sent["Sent"] == sum(sent["Written"].values()) > 0, sent
        assert cli.main(["pinnacle", str(patient_dir), "--out", str(tmp_path / "copy")]) == 0
        converted = {}
        for path in (tmp_path / "copy").rglob("*.dcm"):
            ds = dcmread(path, stop_before_pixels=True)
            converted[str(ds.SOPInstanceUID)] = ds
        plans = {str(ds.RTPlanLabel): ds for ds in converted.values() if ds.Modality == "RTPLAN"}
        treated = plans["Trial_1"]
        structure_uid = str(treated.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID)
        doses = {
            uid
            for uid, ds in converted.items()
            if ds.Modality == "RTDOSE"
            and str(ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID) == str(treated.SOPInstanceUID)
        }
        assert len(doses) == 3

        # 2. A treatment record of one fraction of that plan, stored next to it.
        beams = tuple(
            iods.Beam(int(b.BeamNumber), str(b.BeamName), float(b.ControlPointSequence[0].GantryAngle), 100.0)
            for b in treated.BeamSequence
        )
        spec = iods.PlanSpec(label="Trial_1", intent="CURATIVE", fractions=25, beams=beams, machine="SynthLinac")
        patient = iods.Patient(
            case.mrn, str(treated.PatientName), str(treated.PatientBirthDate), str(treated.PatientSex)
        )
        study = iods.Study(iods.make_uid("pin-e2e", "study"), "20200110", "080000", "Treatment", "9", "")
        series = iods.Series(iods.make_uid("pin-e2e", "series"), 90, "RTRECORD", "Records", "20200110", "080000")
        record_uid = iods.make_uid("pin-e2e", "record")
        record = iods.treatment_record(
            record_uid,
            patient,
            study,
            series,
            plan_uid=str(treated.SOPInstanceUID),
            plan_class=SopClass.RT_PLAN.value,
            spec=spec,
            fraction=1,
            date="20200110",
            time="080000",
        )
        record_path = tmp_path / "record.dcm"
        record_path.write_bytes(iods.encode(record))
        assert store_to_scp([record_path], LOCALHOST, aux.port, aux.aet) == 1

        # 3. Harvest the patient from the auxiliary PACS.
        harvester = start_harvester(tmp_path / "harvester", harvest_port, {"ORTHANC_SRC": aux})
        api = RestClient(harvester.url, harvester.credentials)
        answer = api.post(
            "/rtharvest/harvests", {"Source": "ORTHANC_SRC", "PatientIDs": [case.mrn], "Label": "pinnacle e2e"}
        )
        doc = wait_completed(api, str(answer["ID"]))
        stored = set(stored_sop_uids(api))
        expected = {record_uid, str(treated.SOPInstanceUID), structure_uid, *truth.slice_uids, *doses}
        assert stored == expected, (sorted(expected - stored), sorted(stored - expected))
        assert doc["PlansCollected"] == 1
        assert_provenance(api, stored_sop_uids(api), str(answer["ID"]), {"ORTHANC_SRC"})
        # The manifest calls the converted plan complete and names exactly the converted chain.
        (row,) = api.get(f"/rtharvest/harvests/{answer['ID']}/manifest")["Plans"]
        assert row["Status"] == "Complete", row
        assert row["PlanUID"] == str(treated.SOPInstanceUID) and row["StructureSetUID"] == structure_uid
        assert set(row["DoseUIDs"]) == doses and row["Missing"] == []
        assert row["PlanningSeriesUIDs"] == [truth.series_uid]
    finally:
        if harvester is not None:
            harvester.stop()
        aux.stop()

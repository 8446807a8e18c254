"""Discovery bounded by the window, end to end on real sources.

A clinic whose courses keep their treatment records in one study dated at simulation, before the first
fraction (``course_record_study``), harvested with the window ``course_cut``: it starts mid-course (the
records' study is dated before the window) and ends on the record-study date of a later course whose
fractions all come after it. The store must equal the ground truth (computed by the generator, not the
planner) at a source that matches TreatmentDate (Orthanc), at dcmqrscp through the StudyDate pre-filter,
and at a strict hierarchical dcmqrscp; a PatientID list is harvested from dcmqrscp, which ignores PatientID
on SERIES-level queries.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, index_for_dcmqrscp, store_to_scp

from .conftest import Clinic
from .harvesting import assert_store_equals_truth, start_harvest, wait_completed
from .servers import LOCALHOST, DicomSource, start_dcmqrscp, start_orthanc_source

SETTINGS = {
    "HIST_ORTHANC": {"Backend": "orthanc", "InstanceReturnKeys": True, "RecordDiscovery": "TreatmentDate"},
    "HIST_DCMQR": {"Backend": "orthanc", "RecordDiscovery": "StudyDate", "StudyDateLookBackDays": 90},
    "HIST_STRICT": {"Backend": "pynetdicom", "QueryModel": "hierarchical", "RecordDiscovery": "StudyDate"},
}


@pytest.fixture(scope="module")
def history(clinic: Clinic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GroundTruth, dict]]:
    """The history clinic in three new sources, and the harvester knowing them."""
    base = tmp_path_factory.mktemp("history")
    truth = generate(base / "clinic", SynthOptions(patients=6, seed=11, ct_slices=3, matrix=16,
                                                   course_record_study=True))
    files = dicom_files(base / "clinic")
    port = clinic.harvester.dicom_port
    sources: dict[str, DicomSource] = {}
    try:
        sources["HIST_ORTHANC"] = start_orthanc_source(base / "orthanc", port, name="HIST_ORTHANC", aet="HISTORTHANC")
        sources["HIST_DCMQR"] = start_dcmqrscp(base / "dcmqr", port, name="HIST_DCMQR", aet="HISTDCMQR")
        sources["HIST_STRICT"] = start_dcmqrscp(base / "strict", port, strict=True, name="HIST_STRICT",
                                                aet="HISTSTRICT")
        assert store_to_scp(files, LOCALHOST, sources["HIST_ORTHANC"].port, "HISTORTHANC") == len(files)
        for name in ("HIST_DCMQR", "HIST_STRICT"):
            storage = sources[name].storage
            assert storage is not None
            assert index_for_dcmqrscp(files, storage) == len(files)
        overrides = {f"RtHarvest.Sources.{name}": settings for name, settings in SETTINGS.items()}
        clinic.restart_harvester(fresh=True, extra_sources=sources, overrides=overrides)
        yield truth, sources
    finally:
        for source in sources.values():
            source.stop()
        clinic.restart_harvester(fresh=True)


@pytest.mark.parametrize("source", ["HIST_ORTHANC", "HIST_DCMQR", "HIST_STRICT"])
def test_window_inside_a_multi_year_clinic(clinic: Clinic, history: tuple[GroundTruth, dict], source: str) -> None:
    truth, _ = history
    window = truth.window("course_cut")
    # The window's traps are really there: a seed course's record study is dated before From, and a
    # later course's record study is dated in the window (on To) with no fraction in it.
    assert window.date_from and window.date_to and window.summary.treatment_records
    clinic.restart_harvester(fresh=True, extra_sources=history[1],
                             overrides={f"RtHarvest.Sources.{n}": s for n, s in SETTINGS.items()})
    harvest_id = start_harvest(clinic.api, window, source)
    doc = wait_completed(clinic.api, harvest_id, deadline_s=300)
    assert_store_equals_truth(clinic.api, window)
    assert doc["Patients"] == window.summary.patients
    assert doc["RecordDiscovery"]["Unbounded"] is None, doc["RecordDiscovery"]


def test_patient_list_at_a_source_that_ignores_patient_id_on_series_queries(
        clinic: Clinic, history: tuple[GroundTruth, dict]) -> None:
    truth, sources = history
    window = truth.window("patient")
    clinic.restart_harvester(fresh=True, extra_sources=sources,
                             overrides={f"RtHarvest.Sources.{n}": s for n, s in SETTINGS.items()})
    harvest_id = start_harvest(clinic.api, window, "HIST_DCMQR")
    doc = wait_completed(clinic.api, harvest_id, deadline_s=300)
    assert_store_equals_truth(clinic.api, window)
    assert doc["RecordDiscovery"] == {"Method": "one search per listed patient", "Unbounded": None}


def test_status_says_how_each_source_finds_records(clinic: Clinic, history: tuple[GroundTruth, dict]) -> None:
    status = clinic.api.get("/rtharvest/status")["RecordDiscovery"]
    assert status["HIST_ORTHANC"]["Method"].startswith("TreatmentDate matched by the source")
    assert "look-back of 90 day(s)" in status["HIST_DCMQR"]["Method"]
    assert all(status[name]["Unbounded"] is None for name in SETTINGS)

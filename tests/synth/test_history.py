"""History options of the synthetic clinic: metadata-light patients over the years, course record
studies dated before the first fraction, and extra windows whose truth the generator computes itself."""

from __future__ import annotations

from pathlib import Path

import pydicom

from rtharvest.synth.generator import SynthOptions, generate


def test_history_patients_course_studies_and_extra_windows(tmp_path: Path) -> None:
    truth = generate(tmp_path, SynthOptions(patients=2, seed=5, ct_slices=2, matrix=8, course_record_study=True,
                                            history_patients=40, windows=(("half", "20170101", "20170630"),)))
    history = {uid: o for uid, o in truth.objects.items() if o.patient_id.startswith("HIS")}
    assert {o.patient_id for o in history.values()} == {f"HIS{i:04d}" for i in range(1, 41)}
    assert {o.modality for o in history.values()} == {"RTPLAN", "RTRECORD"}  # metadata-light
    records = [pydicom.dcmread(tmp_path / o.path) for o in truth.objects.values() if o.modality == "RTRECORD"]
    # A course's records share one study, dated before its first fraction (machine QA keeps one each).
    by_study: dict[str, list[pydicom.Dataset]] = {}
    for ds in records:
        by_study.setdefault(ds.StudyInstanceUID, []).append(ds)
    shared = [group for group in by_study.values() if len(group) > 1]
    assert shared
    for group in shared:
        assert all(ds.StudyDate < min(d.TreatmentDate for d in group) for ds in group)
    years = {ds.TreatmentDate[:4] for ds in records if ds.PatientID.startswith("HIS")}
    assert len(years) >= 10, years
    half = truth.window("half")
    seeds = {ds.SOPInstanceUID for ds in records if "20170101" <= ds.TreatmentDate <= "20170630"}
    assert seeds and seeds <= set(half.expected)
    assert truth.window("course_cut").expected

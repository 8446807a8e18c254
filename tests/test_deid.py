"""De-identification over whole synthetic clinics: links intact, deterministic per site, no PHI left.

The clinic generator gives coherent RT chains (records → plans → structure sets → images, doses, rigid
and deformable registrations, shared frames of reference) with traps; the manifest of the de-identified
copy, built by the project's own reference walk, must equal the clinic's manifest under the site key.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from rtharvest.core.references import extract, extract_from_bytes
from rtharvest.export.deid import (
    DatePolicy,
    DescriptorPolicy,
    Profile,
    ProfileError,
    SiteKey,
    deidentify,
    shift_date,
    table_action,
)
from rtharvest.export.verify import (
    compare,
    expected_rows,
    manifest_of_copy,
    phi_values,
    scan_for_phi,
)
from rtharvest.synth.groundtruth import GroundTruth
from tests.tooling import required_tool

SITE_A = SiteKey("SITEA", b"a" * 32)
SITE_B = SiteKey("SITEB", b"b" * 32)


class Clinic:
    def __init__(self, root: Path, truth: GroundTruth) -> None:
        self.root, self.truth = root, truth
        self.datasets = {uid: pydicom.dcmread(root / info.path) for uid, info in truth.objects.items()}


@pytest.fixture(scope="module")
def clinic(synthetic: tuple[Path, GroundTruth]) -> Clinic:
    """The session's synthetic clinic (every trap), read once."""
    return Clinic(*synthetic)


_DEIDENTIFIED: dict[tuple[str, Profile], dict[str, Dataset]] = {}


def _roundtrip(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deid_all(clinic: Clinic, key: SiteKey, profile: Profile) -> dict[str, Dataset]:
    """Every object de-identified (computed once per site and profile; callers must not modify them)."""
    cache_key = (key.site, profile)
    if cache_key not in _DEIDENTIFIED:
        _DEIDENTIFIED[cache_key] = {uid: deidentify(ds, key, profile) for uid, ds in clinic.datasets.items()}
    return _DEIDENTIFIED[cache_key]


@pytest.mark.parametrize("profile", [Profile(), Profile(dates=DatePolicy.KEEP, descriptors=DescriptorPolicy.CLEAN),
                                     Profile(dates=DatePolicy.REMOVE)], ids=["shift-keep", "keep-clean", "remove"])
def test_copy_manifest_equals_site_manifest_under_pseudonyms(clinic: Clinic, profile: Profile) -> None:
    site = manifest_of_copy(extract(ds) for ds in clinic.datasets.values())
    out = _deid_all(clinic, SITE_A, profile)
    copy = manifest_of_copy(extract_from_bytes(_roundtrip(ds)) for ds in out.values())
    site_rows = site.to_json()["Plans"]
    assert len(site_rows) >= 6 and {r["Status"] for r in site_rows} >= {"Complete", "Incomplete"}
    expected = expected_rows(site_rows, SITE_A, profile, SITE_A.pseudonym)
    assert compare(expected, copy.to_json()["Plans"]) == []
    # Table-1 counts survive too (registration types, image series, records).
    s, c = site.to_json()["Summary"], copy.to_json()["Summary"]
    for name in ("Patients", "PlansReferenced", "PlansByStatus", "Registrations", "ImageSeries", "TreatmentRecords",
                 "PlansByIntent", "PlanningSeries", "Fractions", "SummaryRecords"):
        assert c[name] == s[name], name


def test_every_reference_is_rewritten_and_resolves(clinic: Clinic) -> None:
    out = _deid_all(clinic, SITE_A, Profile())
    new_uids = {ds.SOPInstanceUID for ds in out.values()}
    original = set(clinic.datasets)
    for old_uid, ds in out.items():
        refs = extract(ds)
        orig = extract(clinic.datasets[old_uid])
        assert refs.sop_uid == SITE_A.uid(old_uid)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for new, old in ((refs.study_uid, orig.study_uid), (refs.series_uid, orig.series_uid),
                         (refs.frame_of_reference_uid, orig.frame_of_reference_uid)):
            assert new == (SITE_A.uid(old) if old else old)
        # No original UID survives anywhere in the object (sequences included).
        uids = {str(v) for e in ds.iterall() if e.VR == "UI"
                for v in (e.value if isinstance(e.value, (list, pydicom.multival.MultiValue)) else [e.value])}
        assert not uids & original, old_uid
    # References that resolved in the clinic resolve in the copy (records → plans, plans → structure sets).
    for old_uid, ds in out.items():
        refs = extract(ds)
        if refs.record is not None:
            old_record = extract(clinic.datasets[old_uid]).record
            assert old_record is not None  # the original of a record is a record
            for old_plan in old_record.plan_uids:
                if old_plan in original:
                    assert SITE_A.uid(old_plan) in refs.record.plan_uids
                    assert SITE_A.uid(old_plan) in new_uids


def test_uids_are_deterministic_per_site_and_never_collide(clinic: Clinic) -> None:
    some = list(clinic.datasets.items())[:40]
    first = [_roundtrip(deidentify(ds, SITE_A, Profile())) for _, ds in some]
    again = [_roundtrip(deidentify(ds, SiteKey("SITEA", b"a" * 32), Profile())) for _, ds in some]
    assert first == again
    a = {SITE_A.uid(uid) for uid in clinic.datasets}
    b = {SITE_B.uid(uid) for uid in clinic.datasets}
    assert len(a) == len(b) == len(clinic.datasets)
    assert not a & b
    assert all(u.startswith("2.25.") and len(u) <= 64 and u[5:].isdigit() for u in a)
    # Same name, other secret: other UIDs (a site's name alone must not decide them).
    assert SiteKey("SITEA", b"c" * 32).uid(some[0][0]) != SITE_A.uid(some[0][0])


def test_no_phi_survives_and_private_tags_are_gone(clinic: Clinic) -> None:
    profile = Profile()
    values = phi_values(clinic.datasets.values(), profile)
    kinds = set(values.values())
    assert {"PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName"} <= kinds
    for old_uid, src in list(clinic.datasets.items())[:200]:
        # A private block the original may not have: added here so the test can see it removed.
        src = pydicom.dcmread(clinic.root / clinic.truth.objects[old_uid].path)
        src.private_block(0x0011, "ACME", create=True).add_new(0x01, "LO", str(src.PatientID))
        assert {h.kind for h in scan_for_phi(src, values)} >= {"PatientID", "PatientName"}  # the scan sees PHI
        ds = deidentify(src, SITE_A, profile)
        assert scan_for_phi(ds, values) == []
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.ClinicalTrialSiteID == "SITEA"
        assert ds.PatientID == ds.ClinicalTrialSubjectID == SITE_A.pseudonym(str(src.PatientID))
        assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
        assert "113100" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]


def test_dates_shift_consistently_per_patient(clinic: Clinic) -> None:
    profile = Profile()
    by_patient: dict[str, list[tuple[str, str]]] = {}
    for ds in clinic.datasets.values():
        if "StudyDate" in ds and ds.StudyDate:
            out = deidentify(ds, SITE_A, profile)
            by_patient.setdefault(str(ds.PatientID), []).append((ds.StudyDate, out.StudyDate))
    shifts: Counter[int] = Counter()
    for pid, pairs in by_patient.items():
        days = SITE_A.day_shift(pid, profile.max_shift_days)
        assert -3650 <= days <= -1
        for old, new in pairs:
            assert new == shift_date(old, days) != old
        shifts[days] += 1
    assert len(shifts) > 1  # patients do not all move by the same amount


def test_descriptor_options(clinic: Clinic) -> None:
    ss = next(ds for ds in clinic.datasets.values() if ds.Modality == "RTSTRUCT" and "StructureSetROISequence" in ds)
    plan = next(ds for ds in clinic.datasets.values() if ds.Modality == "RTPLAN" and ds.get("RTPlanLabel"))
    kept_ss, kept_plan = deidentify(ss, SITE_A, Profile()), deidentify(plan, SITE_A, Profile())
    assert [r.ROIName for r in kept_ss.StructureSetROISequence] == [r.ROIName for r in ss.StructureSetROISequence]
    assert kept_plan.RTPlanLabel == plan.RTPlanLabel
    clean = Profile(descriptors=DescriptorPolicy.CLEAN)
    cleaned_ss, cleaned_plan = deidentify(ss, SITE_A, clean), deidentify(plan, SITE_A, clean)
    assert all(not r.ROIName for r in cleaned_ss.StructureSetROISequence)  # Z in Table E.1-1
    assert cleaned_plan.RTPlanLabel == "ANONYMIZED"  # D
    assert "StudyDescription" not in cleaned_plan  # X
    # Clinically needed values outside the table stay: intent, geometry, ROI numbers.
    assert cleaned_plan.PlanIntent == plan.PlanIntent


def test_the_table_is_the_standards() -> None:
    assert table_action(pydicom.tag.Tag("PatientName")) == "Z"
    assert table_action(pydicom.tag.Tag("SOPInstanceUID")) == "U"
    assert table_action(pydicom.tag.Tag("ReferencedSOPInstanceUID")) == "U"
    assert table_action(pydicom.tag.Tag(0x6002, 0x3000)) == "X"  # overlay data, a repeating group
    assert table_action(pydicom.tag.Tag("PlanIntent")) is None


@pytest.mark.parametrize("body, field", [
    ({"Dates": "blur"}, "Profile.Dates"), ({"Descriptors": 3}, "Profile.Descriptors"),
    ({"MaxShiftDays": 0}, "Profile.MaxShiftDays"), ({"Colour": 1}, "Profile.Colour"),
    ({"RetainInstitutionIdentity": "yes"}, "Profile.RetainInstitutionIdentity"), ([], "Profile"),
    ({"Sponsor": "x" * 80}, "Profile.Sponsor"),
])
def test_bad_profiles_name_the_field(body: object, field: str) -> None:
    with pytest.raises(ProfileError) as err:
        Profile.from_json(body)
    assert err.value.field == field


def test_profile_round_trips() -> None:
    p = Profile.from_json({"Dates": "KEEP", "Descriptors": "clean", "RetainInstitutionIdentity": True})
    assert Profile.from_json(p.to_json()) == p
    with pytest.raises(ProfileError):
        SiteKey("bad site!", b"x" * 32)
    with pytest.raises(ProfileError):
        SiteKey("OK", b"short")


def test_dciodvfy_finds_no_new_errors(clinic: Clinic, tmp_path: Path) -> None:
    """De-identification must not break IOD conformance: no error dciodvfy did not report on the original."""
    required_tool("dciodvfy")
    seen: set[str] = set()
    for uid, ds in clinic.datasets.items():
        if ds.Modality in seen:
            continue
        seen.add(ds.Modality)
        src, dst = tmp_path / "src.dcm", tmp_path / "dst.dcm"
        shutil.copy(clinic.root / clinic.truth.objects[uid].path, src)
        dst.write_bytes(_roundtrip(deidentify(ds, SITE_A, Profile(descriptors=DescriptorPolicy.CLEAN))))

        def errors(path: Path) -> set[str]:
            run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            return {line.split(" - ", 1)[-1] for line in run.stderr.splitlines() if line.startswith("Error")}

        new = errors(dst) - errors(src)
        assert not new, f"{ds.Modality}: {sorted(new)[:5]}"
    assert {"RTPLAN", "RTSTRUCT", "CT"} <= seen


def test_retain_options_keep_what_they_name(clinic: Clinic) -> None:
    ds = next(d for d in clinic.datasets.values() if d.get("InstitutionName") and d.get("PatientSex"))
    basic = deidentify(ds, SITE_A, Profile())
    assert basic.InstitutionName == "ANONYMIZED" and not basic.PatientSex  # X/Z/D -> D, Z
    kept = deidentify(ds, SITE_A, Profile(institution=True, patient_characteristics=True))
    assert kept.InstitutionName == ds.InstitutionName and kept.PatientSex == ds.PatientSex
    codes = [c.CodeValue for c in kept.DeidentificationMethodCodeSequence]
    assert {"113100", "113107", "113108", "113112"} <= set(codes)
    # A retained institution is not PHI to the scan; everything else still is.
    # (Values of the whole clinic: for one patient every name component counts, and the synthetic
    # clinic's model name "RTHARVEST-SYNTH" holds the SYNTH all its patients share.)
    values = phi_values(clinic.datasets.values(), Profile(institution=True))
    assert "InstitutionName" not in values.values() and scan_for_phi(kept, values) == []


def test_phi_scan_matches_whole_values_not_digits_inside_uids() -> None:
    """A numeric accession number or birth date inside the random digits of a ``2.25.`` UID is not PHI
    (substring matching failed a clean export every few runs); the same value as a token of free text is."""
    values = {"0010001": "AccessionNumber", "19660509": "PatientBirthDate", "SYN001": "PatientID"}
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.31900100017766195566050912345678901234"
    ds.StudyInstanceUID = "2.25.1"
    ds.SeriesDescription = "SYN001X"  # a longer token is another value
    assert scan_for_phi(ds, values) == []
    ds.StudyDescription = "plan of syn001, acc 0010001 (dob 19660509)"
    assert {h.kind for h in scan_for_phi(ds, values)} == {"PatientID", "AccessionNumber", "PatientBirthDate"}

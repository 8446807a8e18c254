"""Central mode without servers: settings, the delivery's validation, the identifying-value scan, and the
service's record (check, idempotent re-delivery, a lost object, withdrawal) over a de-identified clinic.

The archive's store here is a dictionary of real de-identified DICOM files (tests/test_central_e2e.py runs
the same service inside a real Orthanc)."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from rtharvest.central.check import parse_delivery, scan_identifying
from rtharvest.central.routes import plans_by_year_svg, summary_csv
from rtharvest.central.service import CentralService
from rtharvest.central.settings import SiteEntry, load_central, parse_endpoints
from rtharvest.core.references import extract
from rtharvest.edge.config import ConfigError
from rtharvest.export.deid import DatePolicy, Profile, SiteKey, deidentify
from rtharvest.export.verify import expected_rows, manifest_of_copy, summary_of_rows
from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.loader import dicom_files
from rtharvest.web.httpapi import ApiError

KEY = SiteKey("SITEA", b"site-a-secret-0123456789")
TOKEN = "a-long-site-token-0123456789"
PSEUDONYM = KEY.pseudonym("SYN001")


# -- settings -------------------------------------------------------------------------------------------


def _central(section: Any, **orthanc: Any) -> Any:
    return load_central({"RtHarvest": {"Central": section}, **orthanc})


def test_central_settings() -> None:
    settings = _central({"Enabled": True, "Sites": {"SITEA": {"AET": "SITEA_H", "Users": ["sitea"]},
                                                     "SITEB": {"Token": TOKEN}}})
    assert settings.enabled and settings.sites["SITEA"] == SiteEntry("SITEA", "SITEA_H", ("sitea",), None)
    assert not load_central({}).enabled
    for section, orthanc, message in (
        ({"Enabled": True}, {}, "central mode needs at least one site"),
        ({"Sites": {"SITEA": {}}}, {}, "name the Users or the Token"),
        ({"Sites": {"SITEA": {"Token": "short"}}}, {}, "at least 16 characters"),
        ({"Sites": {"SITEA": {"Users": ["a"], "Aet": "X"}}}, {}, "Sites.SITEA.Aet: unknown setting"),
        ({"Sites": {"SITE A": {"Token": TOKEN}}}, {}, "a site name is 1-16"),
        ({"Sites": {"SITEA": {"Users": ["a"]}}}, {"AuthenticationEnabled": False}, "needs AuthenticationEnabled"),
    ):
        with pytest.raises(ConfigError, match=message):
            _central(section, **orthanc)
    assert parse_endpoints({"CENTRAL": {"Url": "http://archive:8042/", "Token": TOKEN}}, "X")["CENTRAL"].url == \
        "http://archive:8042"
    with pytest.raises(ConfigError, match=r"X\.CENTRAL\.Url"):
        parse_endpoints({"CENTRAL": {"Url": "archive:8042"}}, "X")
    with pytest.raises(ConfigError, match=r"X\.CENTRL: not an export destination \(known: CENTRAL\)"):
        parse_endpoints({"CENTRL": {"Url": "http://archive:8042"}}, "X", {"CENTRAL"})


# -- the delivery's shape ---------------------------------------------------------------------------------


def _body(**changes: Any) -> dict[str, Any]:
    row = {"PatientID": PSEUDONYM, "PlanUID": "2.25.1", "Status": "Complete", "DoseUIDs": ["2.25.3", "2.25.2"]}
    return {"Site": "SITEA", "Export": "e1", "Plans": [row], "Instances": ["2.25.1"], **changes}


def test_parse_delivery_refuses_with_the_field_and_never_echoes_an_identifier() -> None:
    parsed = parse_delivery(_body())
    assert parsed.rows[0]["DoseUIDs"] == ["2.25.2", "2.25.3"] and parsed.rows[0]["Treatments"] is None
    row = _body()["Plans"][0]
    for body, message in (
        (_body(Plans=[]), "Plans: a non-empty list"),
        (_body(Plans=[{**row, "PatientID": "SYN001"}]), r"Plans\[0\]\.PatientID: not a pseudonym of site SITEA"),
        (_body(Plans=[{**row, "PatientID": KEY.pseudonym("x").replace("SITEA", "SITEB")}]), "not a pseudonym"),
        (_body(Plans=[row, row]), "delivered twice"),
        (_body(Instances=["SYN001"]), "Instances: a list"),
        (_body(Export="../x"), "Export: required"),
        (_body(Extra=1), "Extra: unknown field"),
        (_body(Profile={"Dates": "blur"}), "Profile.Dates"),
    ):
        with pytest.raises(ApiError, match=message) as err:
            parse_delivery(body)
        assert err.value.status == 400 and "SYN001" not in err.value.message


# -- the identifying-value scan -----------------------------------------------------------------------------


def _object(**elements: Any) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.9"
    ds.PatientID = PSEUDONYM
    ds.PatientName = PSEUDONYM
    ds.StudyDate = "20200101"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _kinds(ds: Dataset, dates: DatePolicy = DatePolicy.SHIFT) -> list[tuple[str, str]]:
    profile = Profile(dates=dates)
    return [(h.attribute, h.kind) for h in scan_identifying(ds, "SITEA", profile, "20261207")]


def test_scan_identifying() -> None:
    assert _kinds(_object(OperatorsName="ANONYMIZED", StudyDescription="Plan of Doe^John, 2 phases")) == [
        ("StudyDescription", "name-shaped text")]  # the DICOM name form in free text is flagged ...
    assert _kinds(_object(StudyDescription="Pelvis boost", ReferringPhysicianName="")) == []  # ... plain text not
    assert _kinds(_object(PatientID="SYN001", PatientName="DOE^JOHN")) == [
        ("PatientID", "not a pseudonym of the site"), ("PatientName", "person name")]
    nested = Dataset()
    nested.OperatorsName = "SMITH^ANNA"
    assert _kinds(_object(ReferencedStudySequence=DicomSequence([nested]), PatientBirthDate="19500101")) == [
        ("ReferencedStudySequence[0].OperatorsName", "person name"), ("PatientBirthDate", "birth date")]
    # Dates: a shifted date lies before the day of delivery; "remove" leaves only the dummy; "keep" is agreed.
    assert _kinds(_object(ContentDate="20261207")) == [("ContentDate", "date not shifted (on or after the day of "
                                                                          "delivery)")]
    assert _kinds(_object(), DatePolicy.REMOVE) == [("StudyDate", "date kept although the profile removes dates")]
    assert _kinds(_object(StudyDate="19000101"), DatePolicy.REMOVE) == []
    assert _kinds(_object(ContentDate="20261207"), DatePolicy.KEEP) == []


# -- the service over a de-identified clinic -------------------------------------------------------------------


class HeldFiles:
    """The archive's store as the service uses it: SOP UID → DICOM bytes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        #: How every instance arrived (Orthanc's Origin and RemoteAET metadata).
        self.arrival = {"Origin": "RestApi"}

    def lookup_many(self, sop_uids: Sequence[str]) -> dict[str, str]:
        return {u: u for u in sop_uids if u in self.files}

    def read(self, orthanc_id: str) -> bytes:
        return self.files[orthanc_id]

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        return dict(self.arrival)

    def delete(self, orthanc_id: str) -> None:
        self.files.pop(orthanc_id, None)


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A small clinic de-identified by site A's key, and the delivery its export would announce."""
    root = tmp_path_factory.mktemp("central-clinic")
    generate(root, SynthOptions(patients=2, seed=7, ct_slices=3, matrix=8, include_traps=False))
    originals = [pydicom.dcmread(p) for p in dicom_files(root)]
    site_rows = manifest_of_copy(extract(ds) for ds in originals).to_json()["Plans"]
    profile = Profile()
    files: dict[str, bytes] = {}
    modalities: dict[str, str] = {}
    for ds in originals:
        out = deidentify(ds, KEY, profile)
        buffer = io.BytesIO()
        out.save_as(buffer)
        files[str(out.SOPInstanceUID)] = buffer.getvalue()
        modalities[str(out.SeriesInstanceUID)] = str(out.Modality)
    rows = expected_rows(site_rows, KEY, profile, KEY.pseudonym)
    body = {"Site": "SITEA", "Export": "export-1", "Profile": profile.to_json(), "Plans": rows,
            "Instances": sorted(files), "Summary": summary_of_rows(rows, modalities), "SeriesModalities": modalities}
    return files, body


@pytest.fixture
def service(tmp_path: Path, delivered: tuple[dict[str, bytes], dict[str, Any]]) -> Iterator[CentralService]:
    files, _ = delivered
    settings = _central({"Enabled": True, "Sites": {"SITEA": {"AET": "SITEA_H", "Token": TOKEN},
                                                     "SITEB": {"Token": TOKEN + "b"}}})
    db = Database(str(tmp_path / "central.sqlite"))
    store = HeldFiles(dict(files))
    yield CentralService(settings, db, EventLog(db), lambda: store, clock=lambda: 1_800_000_000.0)
    db.close()


SITE_A = {"rtharvest-site-token": TOKEN}


def test_delivery_checked_idempotent_and_pooled(service: CentralService,
                                                delivered: tuple[dict[str, bytes], dict[str, Any]]) -> None:
    _, body = delivered
    with pytest.raises(ApiError, match="not authenticated as site SITEA"):
        service.deliver(body, {"rtharvest-site-token": TOKEN + "b"})
    first = service.deliver(body, SITE_A)
    assert first["State"] == "Verified" and first["InstancesHeld"] == len(body["Instances"]), first
    assert {p["Check"] for p in first["PlanChecks"]} == {"Verified"}
    pooled = service.summary()
    assert pooled["Pooled"] == pooled["Sites"]["SITEA"] == body["Summary"]
    assert pooled["Sites"]["SITEB"]["PlansReferenced"] == 0
    again = service.deliver(body, SITE_A)
    assert (again["ID"], again["TimesReceived"]) == (first["ID"], 2)
    assert service.summary() == pooled and len(service.deliveries()) == 1
    csv_text = summary_csv(pooled)
    assert csv_text.splitlines()[0].startswith("Site,Patients,PlansReferenced")
    assert [line.split(",")[0] for line in csv_text.splitlines()[1:]] == ["SITEA", "SITEB", "ALL"]
    svg = plans_by_year_svg(service.plans_by_year())
    years: dict[str, int] = {}
    for p in service.plans():
        years[(p.first_treatment or "?")[:4]] = years.get((p.first_treatment or "?")[:4], 0) + 1
    for year, count in years.items():  # one bar per site and year, titled with its count
        assert f"<title>SITEA {year}: {count} plan(s)</title>" in svg
        assert f"<title>SITEB {year}: 0 plan(s)</title>" in svg


def test_lost_object_and_withdrawal(service: CentralService,
                                    delivered: tuple[dict[str, bytes], dict[str, Any]]) -> None:
    _, body = delivered
    service.deliver(body, SITE_A)
    store = service.store()
    assert isinstance(store, HeldFiles)
    # Lose one planning CT image: the plans planned on that series are reported, the others not.
    row = next(r for r in body["Plans"] if r["PlanningSeriesUIDs"])
    series = row["PlanningSeriesUIDs"][0]
    image = next(u for u, data in store.files.items()
                 if pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SeriesInstanceUID == series)
    store.delete(image)
    checked = service.recheck(1)
    assert checked["State"] == "Differences" and checked["InstancesAbsent"] == [image]
    # The delivery's Table-1 counts, compared with the same counts of what is held: a plan is no longer complete.
    assert any(p.startswith("Summary.PlansByStatus is ") for p in checked["Problems"]), checked["Problems"]
    affected = {r["PlanUID"] for r in body["Plans"] if series in r["PlanningSeriesUIDs"]}
    assert {p["PlanUID"] for p in checked["PlanChecks"] if p["Check"] == "Differences"} == affected
    # Withdraw a plan: its own objects go, a series another active plan uses stays.
    plan = body["Plans"][-1]
    others = [r for r in body["Plans"] if r["PlanUID"] != plan["PlanUID"]]
    shared = set(plan["PlanningSeriesUIDs"]) & {s for r in others for s in r["PlanningSeriesUIDs"]}
    answer = service.withdraw("SITEA", plan["PlanUID"], "consent revoked", "admin")
    assert answer["InstancesDeleted"] >= 1 and plan["PlanUID"] not in store.files
    assert all(d in store.files for d in plan["DoseUIDs"] if any(d in r["DoseUIDs"] for r in others))
    held_series = {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SeriesInstanceUID
                   for d in store.files.values()}
    assert shared <= held_series
    assert service.summary()["Pooled"]["PlansReferenced"] == len(body["Plans"]) - 1
    with pytest.raises(ApiError, match="already withdrawn"):
        service.withdraw("SITEA", plan["PlanUID"], "again", None)
    with pytest.raises(ApiError, match="Reason: required"):
        service.withdraw("SITEA", body["Plans"][0]["PlanUID"], " ", None)


def test_arrivals_from_another_aet_and_objects_of_another_site(
        service: CentralService, delivered: tuple[dict[str, bytes], dict[str, Any]]) -> None:
    _, body = delivered
    store = service.store()
    assert isinstance(store, HeldFiles)
    store.arrival = {"Origin": "DicomProtocol", "RemoteAET": "SOMEONE"}
    checked = service.deliver(body, SITE_A)
    assert checked["State"] == "Differences"
    assert len(checked["Problems"]) == min(len(body["Instances"]), 100)
    assert checked["Problems"][0].endswith("arrived by C-STORE from another AET than the site's SITEA_H")
    store.arrival = {"Origin": "DicomProtocol", "RemoteAET": "SITEA_H"}
    assert service.recheck(checked["ID"])["State"] == "Verified"
    # Site B names site A's objects: reported, neither judged nor deleted on B's account.
    row = {**body["Plans"][0], "PatientID": SiteKey("SITEB", b"site-b-secret-9876543210").pseudonym("SYN001")}
    answer = service.deliver({**body, "Site": "SITEB", "Plans": [row]}, {"rtharvest-site-token": TOKEN + "b"})
    assert answer["InstancesQuarantined"] == 0 and answer["State"] == "Differences"
    owned = [p for p in answer["Problems"] if not p.startswith("Summary.")]
    assert owned and all(p.endswith("belongs to site SITEA, not to SITEB") for p in owned)
    assert set(body["Instances"]) <= set(store.files)

"""End to end: two sites (different synthetic clinics sharing original UIDs) export to one central archive
running the same plugin in central mode; the archive knows what each site delivered and checks it.

Site A sends by C-STORE and authenticates its delivery as an Orthanc user; site B sends by STOW-RS and
authenticates with its site token. The archive's pooled Table 1 must equal the sum of the sites' own
Table-1 counts (each computed by the site from its manifest and originals), a re-delivery must change
nothing, an instance lost at the archive and a manifest naming an object never sent must be reported per
plan, an object with a real-looking name must be quarantined (deleted, reason kept), and a withdrawn plan
must leave every count.
"""

from __future__ import annotations

import io
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pydicom
import pytest

from rtharvest.edge.launcher import DEFAULT_CONFIG, OrthancProcess, free_port
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.loader import dicom_files, store_to_scp

from .conftest import start_harvester
from .harvesting import start_harvest, wait_completed
from .servers import HARVEST_AET, LOCALHOST, DicomSource, RestClient, start_orthanc_source

pytestmark = pytest.mark.servers

SECRETS = {"SITEA": "site-a-secret-0123456789", "SITEB": "site-b-secret-9876543210"}
USERS = {"rtharvest": "central-admin-pw", "sitea": "site-a-password", "siteb": "site-b-password"}
TOKEN_B = "site-b-delivery-token-0123456789"


@dataclass
class Site:
    name: str
    api: RestClient
    harvester: OrthancProcess
    source: DicomSource
    window: Any = None
    harvest_id: str = ""
    export: dict[str, Any] | None = None


@dataclass
class Consortium:
    central: OrthancProcess
    admin: RestClient
    sites: dict[str, Site]

    def as_site(self, name: str) -> RestClient:
        """A client authenticated as the site (A: its Orthanc user; B: an Orthanc user plus its token)."""
        if name == "SITEA":
            return RestClient(self.central.url, ("sitea", USERS["sitea"]))
        client = RestClient(self.central.url, ("siteb", USERS["siteb"]))
        client.headers["RtHarvest-Site-Token"] = TOKEN_B
        return client


def _wait_export(api: RestClient, export_id: str, deadline_s: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = api.get(f"/rtharvest/exports/{export_id}")
        if doc["State"] != "Running":
            return doc
        time.sleep(0.3)
    raise AssertionError(f"export not finished in {deadline_s} s: {doc}")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    base = tmp_path_factory.mktemp("central-e2e")
    # The site harvester that sends by C-STORE is a modality of the archive (its export verifies by C-GET,
    # on its own association: the port is never called).
    modalities = {"SITEA": {"AET": HARVEST_AET, "Host": LOCALHOST, "Port": 1, "AllowEcho": True,
                            "AllowGet": True, "AllowStore": True, "AllowFind": True, "AllowMove": False}}
    central = OrthancProcess(base / "central", DEFAULT_CONFIG, aet="CENTRAL", modalities=modalities, overrides={
        "RegisteredUsers": USERS, "OverwriteInstances": True, "DicomWeb.Enable": True,
        "RtHarvest.Central": {"Enabled": True, "Sites": {"SITEA": {"AET": HARVEST_AET, "Users": ["sitea"]},
                                                          "SITEB": {"Token": TOKEN_B}}}}).start()
    sites: dict[str, Site] = {}
    try:
        central_entry = DicomSource("CENTRAL", "CENTRAL", central.dicom_port, "orthanc")
        # Two clinics from one seed: different patients counts, 63 original UIDs in common.
        for name, patients in (("SITEA", 2), ("SITEB", 3)):
            root = base / name / "clinic"
            truth = generate(root, SynthOptions(patients=patients, seed=7, ct_slices=4, matrix=16))
            port = free_port()
            source = start_orthanc_source(base / name / "source", port)
            store_to_scp(dicom_files(root), LOCALHOST, source.port, source.aet)
            user = name.lower()
            # The archive is a research archive on loopback: marked as such, and credentials may use http there.
            export_cfg: dict[str, Any] = {"Site": name, "Secret": SECRETS[name], "BatchSize": 20,
                                          "ResearchArchives": ["CENTRAL", "CENTRALWEB"],
                                          "AllowCredentialsOverHttp": "loopback"}
            if name == "SITEA":
                export_cfg["Central"] = {"CENTRAL": {"Url": central.url, "Username": user, "Password": USERS[user]}}
            else:
                export_cfg["DicomWeb"] = {"CENTRALWEB": {"Url": central.url + "/dicom-web", "Username": user,
                                                         "Password": USERS[user]}}
                export_cfg["Central"] = {"CENTRALWEB": {"Url": central.url, "Username": user,
                                                        "Password": USERS[user], "Token": TOKEN_B}}
            harvester = start_harvester(base / name / "harvester", port,
                                        {"ORTHANC_SRC": source, "CENTRAL": central_entry},
                                        overrides={"RtHarvest.Export": export_cfg})
            sites[name] = Site(name, RestClient(harvester.url, harvester.credentials), harvester, source,
                               truth.window("all"))
        for site in sites.values():
            site.harvest_id = start_harvest(site.api, site.window, "ORTHANC_SRC")
        for site in sites.values():
            wait_completed(site.api, site.harvest_id)
        started = {name: site.api.post("/rtharvest/exports", {
            "Harvest": site.harvest_id, "Destination": "CENTRAL" if name == "SITEA" else "CENTRALWEB",
            "Plans": "All"})["ID"] for name, site in sites.items()}
        for name, site in sites.items():
            site.export = _wait_export(site.api, started[name])
        yield Consortium(central, RestClient(central.url, ("rtharvest", USERS["rtharvest"])), sites)
    finally:
        for site in sites.values():
            site.harvester.stop()
            site.source.stop()
        central.stop()


def _sum_tables(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """The sites' Table-1 counts added up (patients and UIDs are per site: pseudonyms and UIDs never collide)."""
    out: dict[str, Any] = {}
    for name in ("Patients", "PlansReferenced", "PlansCollected", "InvalidPlans", "PlanningSeries",
                 "TreatmentRecords"):
        out[name] = sum(t[name] for t in tables)
    for name in ("PlansByIntent", "PlansByStatus", "ImageSeries", "Registrations"):
        total: Counter[str] = Counter()
        for t in tables:
            total.update(t[name])
        out[name] = dict(total)
    complete = out["PlansByStatus"].get("Complete", 0)
    out["SuccessRate"] = round(complete / (out["PlansReferenced"] - out["InvalidPlans"]), 4)
    return out


def test_both_sites_delivered_and_the_pooled_table_is_their_sum(consortium: Consortium) -> None:
    sites = consortium.sites
    for site in sites.values():
        assert site.export is not None and site.export["State"] == "Completed", site.export
        central = site.export["Verification"]["Central"]
        assert central["State"] == "Verified" and central["Differences"] == 0, central
    summaries = {name: s.export["Verification"]["Summary"]["Site"] for name, s in sites.items() if s.export}
    # The sites' own manifests, read independently: the selection was "All", so every plan of each harvest.
    manifests = {name: s.api.get(f"/rtharvest/harvests/{s.harvest_id}/manifest") for name, s in sites.items()}
    for name, manifest in manifests.items():
        assert summaries[name]["PlansReferenced"] == len(manifest["Plans"]) > 0
        assert summaries[name]["Patients"] == manifest["Summary"]["Patients"]
        assert summaries[name]["PlansByStatus"] == manifest["Summary"]["PlansByStatus"]
    pooled = consortium.admin.get("/rtharvest/central/summary")
    expected = _sum_tables(list(summaries.values()))
    assert {k: pooled["Pooled"][k] for k in expected} == expected
    assert pooled["Sites"] == {name: {k: t[k] for k in pooled["Pooled"]} for name, t in summaries.items()}
    assert pooled["Pooled"]["Patients"] == sum(m["Summary"]["Patients"] for m in manifests.values())
    assert pooled["Pooled"]["ImageSeries"].get("CT", 0) > 0 and pooled["Pooled"]["Registrations"]
    per_site = {s["Site"]: s for s in consortium.admin.get("/rtharvest/central/sites")}
    for name, manifest in manifests.items():
        assert per_site[name]["PlansDelivered"] == len(manifest["Plans"])
        assert per_site[name]["Verification"] == "Verified" and per_site[name]["Deliveries"] == 1
        assert per_site[name]["PlansByHeldStatus"] == manifest["Summary"]["PlansByStatus"]
    # pandas reads the CSV forms; the chart and the page are served; every central route is described.
    table = pd.read_csv(io.StringIO(consortium.admin.get("/rtharvest/central/summary?format=csv")))
    assert list(table["Site"]) == ["SITEA", "SITEB", "ALL"]
    assert list(table["PlansReferenced"]) == [summaries["SITEA"]["PlansReferenced"],
                                              summaries["SITEB"]["PlansReferenced"], expected["PlansReferenced"]]
    plans = pd.read_csv(io.StringIO(consortium.admin.get("/rtharvest/central/plans?format=csv")))
    assert len(plans) == expected["PlansReferenced"] and set(plans["Check"]) == {"Verified"}
    svg = consortium.admin.get("/rtharvest/central/charts/plans-by-year.svg")
    assert svg.startswith("<svg") and "SITEA" in svg and "SITEB" in svg
    page = consortium.admin.get("/rtharvest/central/ui")
    assert "Consortium archive" in page and "charts/plans-by-year.svg" in page
    doc = consortium.admin.get("/rtharvest/openapi.json")
    assert doc["x-undescribed"] == [] and "/rtharvest/central/deliveries/{id}/check" in doc["paths"]
    # Every central route answers (a POST with an empty body is refused with a described status).
    dummy = {"id": "999999", "site": "NOSITE", "plan": "1.2.3"}
    central_paths = {p: m for p, m in doc["paths"].items() if p.startswith("/rtharvest/central/")}
    assert len(central_paths) == 10
    for path, methods in central_paths.items():
        concrete = re.sub(r"{(\w+)}", lambda m: dummy[m.group(1)], path)
        for method, op in methods.items():
            status, body = consortium.admin.request(method.upper(), concrete, {} if method == "post" else None)
            assert status == 200 or (str(status) in op["responses"] and "Error" in body), (method, path, status, body)
    status_doc = consortium.admin.get("/rtharvest/status")
    assert status_doc["Central"] == {"Sites": ["SITEA", "SITEB"]} and "ConfigurationWarnings" not in status_doc


def _delivery_of(consortium: Consortium, site: str) -> dict[str, Any]:
    """The delivery the site's export announced."""
    export = consortium.sites[site].export
    assert export is not None
    [delivery] = [d for d in consortium.admin.get(f"/rtharvest/central/deliveries?site={site}")
                  if d["Export"] == export["ID"]]
    return dict(delivery)


def test_redelivery_is_idempotent_and_only_the_site_may_deliver(consortium: Consortium) -> None:
    before = consortium.admin.get("/rtharvest/central/summary")
    delivery = _delivery_of(consortium, "SITEA")
    document = consortium.admin.get(f"/rtharvest/central/deliveries/{delivery['ID']}/manifest")
    again = consortium.as_site("SITEA").post("/rtharvest/central/deliveries", document)
    assert again["ID"] == delivery["ID"] and again["TimesReceived"] == 2 and again["State"] == "Verified"
    assert consortium.admin.get("/rtharvest/central/summary") == before
    assert len(consortium.admin.get("/rtharvest/central/deliveries")) == 2
    # Site B's token does not make it site A, nor does the archive's administrator.
    for client in (consortium.as_site("SITEB"), consortium.admin):
        status, body = client.request("POST", "/rtharvest/central/deliveries", document)
        assert status == 403 and "not authenticated as site SITEA" in body["Error"]
    # A PatientID that is not a pseudonym refuses the delivery without echoing it.
    leaked = {**document, "Plans": [{**document["Plans"][0], "PatientID": "SYN001"}]}
    status, body = consortium.as_site("SITEA").request("POST", "/rtharvest/central/deliveries", leaked)
    assert status == 400 and "not a pseudonym" in body["Error"] and "SYN001" not in body["Error"]


def test_an_instance_lost_at_the_archive_is_reported_per_plan(consortium: Consortium) -> None:
    delivery = consortium.admin.get(f"/rtharvest/central/deliveries/{_delivery_of(consortium, 'SITEA')['ID']}")
    plan = next(p for p in delivery["PlanChecks"] if p["HeldStatus"] == "Complete")
    document = consortium.admin.get(f"/rtharvest/central/deliveries/{delivery['ID']}/manifest")
    row = next(r for r in document["Plans"] if r["PlanUID"] == plan["PlanUID"])
    dose = row["DoseUIDs"][0]
    [found] = consortium.admin.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": dose}})
    status, _ = consortium.admin.request("DELETE", f"/instances/{found}")
    assert status == 200
    checked = consortium.admin.post(f"/rtharvest/central/deliveries/{delivery['ID']}/check")
    assert checked["State"] == "Differences" and checked["InstancesAbsent"] == [dose]
    differing = {p["PlanUID"]: p for p in checked["PlanChecks"] if p["Check"] == "Differences"}
    assert plan["PlanUID"] in differing
    # The dose is no longer held: the archive's walk finds one dose fewer than the site's manifest names.
    assert any(d.startswith("DoseUIDs is ") for d in differing[plan["PlanUID"]]["Differences"])
    sites = {s["Site"]: s for s in consortium.admin.get("/rtharvest/central/sites")}
    assert sites["SITEA"]["Verification"] == "Differences" and sites["SITEB"]["Verification"] == "Verified"


def test_a_manifest_naming_an_object_never_sent_is_reported(consortium: Consortium) -> None:
    delivery = _delivery_of(consortium, "SITEB")
    document = consortium.admin.get(f"/rtharvest/central/deliveries/{delivery['ID']}/manifest")
    row = dict(document["Plans"][0])
    invented = "2.25.123456789012345678901234567890"
    row["RegistrationUIDs"] = sorted([*row["RegistrationUIDs"], invented])
    tampered = {**document, "Export": "tampered-1", "Plans": [row], "Instances": [*document["Instances"], invented]}
    checked = consortium.as_site("SITEB").post("/rtharvest/central/deliveries", tampered)
    assert checked["State"] == "Differences" and checked["InstancesAbsent"] == [invented]
    [plan] = checked["PlanChecks"]
    assert plan["Check"] == "Differences" and any(d.startswith("RegistrationUIDs") for d in plan["Differences"])


def test_an_object_with_a_name_is_quarantined(consortium: Consortium) -> None:
    delivery = _delivery_of(consortium, "SITEB")
    document = consortium.admin.get(f"/rtharvest/central/deliveries/{delivery['ID']}/manifest")
    [found] = consortium.admin.post("/tools/find", {"Level": "Instance",
                                                    "Query": {"SOPInstanceUID": document["Plans"][0]["PlanUID"]}})
    req = urllib.request.Request(f"{consortium.admin.url}/instances/{found}/file", headers=consortium.admin.headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        ds = pydicom.dcmread(io.BytesIO(resp.read()))
    ds.OperatorsName = "DOE^JOHN"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID("2.25.99887766554433221100")
    out = io.BytesIO()
    ds.save_as(out)
    status, stored = consortium.admin.request("POST", "/instances", raw=out.getvalue(),
                                              headers={"Content-Type": "application/dicom"})
    assert status == 200
    row = {**document["Plans"][0]}
    answer = consortium.as_site("SITEB").post("/rtharvest/central/deliveries", {
        **document, "Export": "with-a-name", "Plans": [row], "Instances": ["2.25.99887766554433221100"]})
    assert answer["State"] == "Quarantined" and answer["InstancesQuarantined"] == 1
    assert answer["Quarantine"] == [{"SOPInstanceUID": "2.25.99887766554433221100", "Attribute": "OperatorsName",
                                     "Kind": "person name"}]
    assert "DOE" not in str(answer)
    status, _ = consortium.admin.request("GET", f"/instances/{stored['ID']}")
    assert status == 404  # nothing identifying stays at the centre


def test_a_withdrawn_plan_leaves_every_count(consortium: Consortium) -> None:
    before = consortium.admin.get("/rtharvest/central/summary")
    plans = consortium.admin.get("/rtharvest/central/plans?site=SITEB")
    plan = next(p for p in plans if p["Withdrawn"] is None and p["Check"] == "Verified")
    path = f"/rtharvest/central/sites/SITEB/plans/{plan['PlanUID']}/withdraw"
    status, body = consortium.admin.request("POST", path, {})
    assert status == 400 and "Reason" in body["Error"]
    status, body = consortium.as_site("SITEA").request("POST", path, {"Reason": "not mine to withdraw"})
    assert status == 403 and "a user of site SITEA cannot withdraw a plan of site SITEB" in body["Error"]
    answer = consortium.admin.post(path, {"Reason": "consent revoked"})
    assert answer["InstancesDeleted"] >= 1
    status, body = consortium.admin.request("POST", path, {"Reason": "again"})
    assert status == 409
    after = consortium.admin.get("/rtharvest/central/summary")
    assert after["Sites"]["SITEB"]["PlansReferenced"] == before["Sites"]["SITEB"]["PlansReferenced"] - 1
    assert after["Sites"]["SITEA"] == before["Sites"]["SITEA"]
    [withdrawn] = [p for p in consortium.admin.get("/rtharvest/central/plans?site=SITEB")
                   if p["PlanUID"] == plan["PlanUID"]]
    assert withdrawn["Withdrawn"]["Reason"] == "consent revoked"
    assert consortium.admin.post("/tools/find", {"Level": "Instance",
                                                 "Query": {"SOPInstanceUID": plan["PlanUID"]}}) == []
    sites = {s["Site"]: s for s in consortium.admin.get("/rtharvest/central/sites")}
    assert sites["SITEB"]["PlansWithdrawn"] == 1
    # The site exports the plan again (its objects arrive again): the plan stays withdrawn, its objects go.
    document = consortium.admin.get(f"/rtharvest/central/deliveries/{plan['Delivery']}/manifest")
    assert plan["PlanUID"] in {r["PlanUID"] for r in document["Plans"]}
    site_b = consortium.sites["SITEB"]
    assert site_b.export is not None
    again = site_b.api.post("/rtharvest/exports", {"Harvest": site_b.harvest_id, "Destination": "CENTRALWEB",
                                                   "Plans": {"PlanUIDs": [_original_plan(site_b, plan)]}})
    assert _wait_export(site_b.api, again["ID"])["State"] == "Completed"
    [still] = [p for p in consortium.admin.get("/rtharvest/central/plans?site=SITEB")
               if p["PlanUID"] == plan["PlanUID"]]
    assert still["Withdrawn"]["Reason"] == "consent revoked"
    assert consortium.admin.post("/tools/find", {"Level": "Instance",
                                                 "Query": {"SOPInstanceUID": plan["PlanUID"]}}) == []
    assert consortium.admin.get("/rtharvest/central/summary")["Sites"]["SITEB"] == after["Sites"]["SITEB"]


def _original_plan(site: Site, plan: dict[str, Any]) -> str:
    """The site's own UID of a de-identified plan (the site key maps originals to what the archive sees)."""
    from rtharvest.export.deid import SiteKey
    key = SiteKey(site.name, SECRETS[site.name].encode())
    manifest = site.api.get(f"/rtharvest/harvests/{site.harvest_id}/manifest")
    [original] = [p["PlanUID"] for p in manifest["Plans"] if key.uid(p["PlanUID"]) == plan["PlanUID"]]
    return str(original)

"""End to end: two sites harvest their clinics and export de-identified plans into one central Orthanc.

Site A exports by C-STORE and is SIGKILLed in the middle of sending; after the restart the export resumes
and finishes without a duplicate. Site B exports by STOW-RS to the same Orthanc's DICOMweb plugin (Debian's
``orthanc-dicomweb``). Both sites hold the same clinic (one generated clinic, loaded into both sources):
the same PatientIDs (SYN001...) and the same original UIDs, the worst case for collisions. The archive
must still hold two separable, complete datasets with no UID in common. Each test checks what the central archive holds
with its own reading (REST downloads, the project's reference walk, a PHI scan against the originals),
not only the plugin's own verification report.
"""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest

from rtharvest.cli.commands import main as cli_main
from rtharvest.core.references import extract
from rtharvest.edge.launcher import OrthancProcess, free_port
from rtharvest.export.deid import Profile, SiteKey
from rtharvest.export.verify import compare, expected_rows, manifest_of_copy, phi_values, scan_for_phi
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, store_to_scp

from .conftest import start_harvester
from .harvesting import start_harvest, wait_completed
from .servers import HARVEST_AET, LOCALHOST, DicomSource, RestClient, start_orthanc_source

pytestmark = pytest.mark.servers

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SECRETS = {"SITEA": "site-a-secret-0123456789", "SITEB": "site-b-secret-9876543210"}


@dataclass
class SiteRun:
    """One site: its clinic, source, harvester, harvest and export."""

    name: str
    root: Path
    truth: GroundTruth
    source: DicomSource
    harvester: OrthancProcess
    api: RestClient
    harvest_id: str = ""
    export: dict[str, Any] | None = None
    kill_seen: dict[str, Any] | None = None
    #: ``rtharvest export ...`` runs against the site's harvester: name -> (exit code, output lines).
    cli: dict[str, tuple[int, list[str]]] = field(default_factory=dict)

    @property
    def key(self) -> SiteKey:
        return SiteKey(self.name, SECRETS[self.name].encode())

    def originals(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(self.root)]


def _central(run_dir: Path) -> OrthancProcess:
    config = {"Name": "CENTRAL", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "DicomCheckModalityHost": False,
              "OverwriteInstances": True}
    harvest = {"AET": HARVEST_AET, "Host": LOCALHOST, "Port": 1, "AllowEcho": True, "AllowGet": True,
               "AllowStore": True, "AllowFind": True, "AllowMove": False}
    central = OrthancProcess(run_dir, config, aet="CENTRAL", plugin=False, modalities={"HARVEST": harvest},
                             overrides={"Plugins": [DICOMWEB_PLUGIN],
                                        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    return central.start()


def _wait_export(api: RestClient, export_id: str, deadline_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = api.get(f"/rtharvest/exports/{export_id}")
        if doc["State"] not in ("Running",):
            return doc
        time.sleep(0.3)
    raise AssertionError(f"export not finished in {deadline_s} s: {doc}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancProcess, dict[str, SiteRun]]]:
    """Central Orthanc + two sites, harvested and exported (A by C-STORE with a SIGKILL, B by STOW-RS)."""
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.fail("Debian's orthanc-dicomweb is required (run.sh APT_PACKAGES)")
    base = tmp_path_factory.mktemp("export-e2e")
    central = _central(base / "central")
    sites: dict[str, SiteRun] = {}
    try:
        central_entry = DicomSource("CENTRAL", "CENTRAL", central.dicom_port, "orthanc")
        # One clinic for both sites: the same original UIDs reach the archive from two sites.
        root = base / "clinic"
        truth = generate(root, SynthOptions(patients=3, seed=7))
        for name in ("SITEA", "SITEB"):
            port = free_port()
            source = start_orthanc_source(base / name / "source", port)
            store_to_scp(dicom_files(root), LOCALHOST, source.port, source.aet)
            # The tests' harvester lists every DICOM node as a source (RtHarvest.Sources), the archive too:
            # without ResearchArchives the export to it would be refused as one to a clinical system.
            export_cfg = {"Site": name, "Secret": SECRETS[name], "BatchSize": 4, "ResearchArchives": ["CENTRAL"],
                          "DicomWeb": {"CENTRALWEB": {"Url": central.url + "/dicom-web"}}}
            harvester = start_harvester(base / name / "harvester", port,
                                        {"ORTHANC_SRC": source, "CENTRAL": central_entry},
                                        overrides={"RtHarvest.Export": export_cfg})
            sites[name] = SiteRun(name, root, truth, source, harvester,
                                  RestClient(harvester.url, harvester.credentials))
        for site in sites.values():
            site.harvest_id = start_harvest(site.api, site.truth.window("all"), "ORTHANC_SRC")
        for site in sites.values():
            wait_completed(site.api, site.harvest_id)

        # Site A: C-STORE, killed while sending, restarted on the same database.
        a = sites["SITEA"]
        started = a.api.post("/rtharvest/exports", {"Harvest": a.harvest_id, "Destination": "CENTRAL",
                                                    "Plans": "All"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            doc = a.api.get(f"/rtharvest/exports/{started['ID']}")
            if 0 < doc["Progress"]["InstancesSent"] < doc["Progress"]["InstancesTotal"] * 0.8:
                a.harvester.kill()
                a.kill_seen = doc
                break
            assert doc["State"] == "Running", doc
            time.sleep(0.02)
        assert a.kill_seen is not None, "the export finished before it could be killed"
        a.harvester.start()
        a.export = _wait_export(a.api, started["ID"])

        # Site B: STOW-RS, complete plans only, started and followed with the CLI.
        b = sites["SITEB"]
        assert b.harvester.credentials is not None
        user, password = b.harvester.credentials
        printed = io.StringIO()
        code = cli_main(["--url", b.harvester.url, "--user", user, "export", "start", "--harvest", b.harvest_id,
                         "--destination", "CENTRALWEB", "--plans", "Complete", "--wait", "--interval", "0.3",
                         "--wait-timeout", "180"], out=printed, env={"RTHARVEST_PASSWORD": password})
        assert code == 0, printed.getvalue()
        export_id = printed.getvalue().splitlines()[0]
        assert "verification passed" in printed.getvalue().splitlines()[-1]
        b.export = b.api.get(f"/rtharvest/exports/{export_id}")
        # The other export commands against the real plugin (cancel runs in test_export_service: a real
        # worker would race it here).
        for command in (["list"], ["status", export_id], ["wait", export_id, "--timeout", "30"]):
            printed = io.StringIO()
            code = cli_main(["--url", b.harvester.url, "--user", user, "export", *command], out=printed,
                            env={"RTHARVEST_PASSWORD": password})
            b.cli[command[0]] = (code, printed.getvalue().splitlines())
        yield central, sites
    finally:
        for site in sites.values():
            site.harvester.stop()
            site.source.stop()
        central.stop()


def _central_objects(central: OrthancProcess) -> dict[str, list[pydicom.Dataset]]:
    """Every instance of the central archive, read back over REST, by ClinicalTrialSiteID."""
    api = RestClient(central.url, None)
    by_site: dict[str, list[pydicom.Dataset]] = {}
    for orthanc_id in api.get("/instances"):
        with urllib.request.urlopen(f"{api.url}/instances/{orthanc_id}/file", timeout=30) as resp:
            ds = pydicom.dcmread(io.BytesIO(resp.read()), stop_before_pixels=True)
        by_site.setdefault(str(ds.get("ClinicalTrialSiteID", "")), []).append(ds)
    return by_site


def _check_site(site: SiteRun, received: list[pydicom.Dataset]) -> None:
    assert site.export is not None
    doc = site.export
    assert doc["State"] == "Completed", doc
    assert doc["Verification"]["Passed"], doc["Verification"]
    assert doc["Verification"]["PhiHitCount"] == 0 and doc["Verification"]["PhiValuesChecked"] > 0
    assert doc["Verification"]["Unexpected"] == 0 and doc["Verification"]["ManifestDifferences"] == []
    progress = doc["Progress"]
    assert progress["InstancesSent"] == progress["InstancesTotal"] == progress["InstancesVerified"] > 0
    # The archive holds exactly what was sent: no duplicate, nothing missing.
    uids = [str(ds.SOPInstanceUID) for ds in received]
    assert len(uids) == len(set(uids)) == progress["InstancesTotal"]
    # Independent PHI scan against the site's originals.
    values = phi_values(site.originals(), Profile())
    assert {"PatientID", "PatientName", "AccessionNumber", "InstitutionName"} <= set(values.values())
    hits = [h for ds in received for h in scan_for_phi(ds, values)]
    assert hits == []
    assert all(not e.tag.is_private for ds in received for e in ds.iterall())
    # Independent reference walk: the archive's manifest equals the site's under its key.
    site_manifest = site.api.get(f"/rtharvest/harvests/{site.harvest_id}/manifest")
    selected = [p for p in site_manifest["Plans"] if doc["Plans"] == "All" or p["Status"] == doc["Plans"]]
    assert len(selected) == progress["PlansSelected"] > 0
    copy = manifest_of_copy(extract(ds) for ds in received)
    expected = expected_rows(selected, site.key, Profile(), site.key.pseudonym)
    assert compare(expected, copy.to_json()["Plans"]) == []


def test_cstore_export_survives_sigkill_without_duplicates(archive: tuple[OrthancProcess, dict[str, SiteRun]]
                                                           ) -> None:
    central, sites = archive
    a = sites["SITEA"]
    assert a.kill_seen is not None and a.export is not None
    assert a.kill_seen["Progress"]["InstancesSent"] < a.export["Progress"]["InstancesTotal"]
    # At most the batch in flight at the kill was sent twice (same UIDs: replaced, not duplicated).
    assert a.export["Progress"]["InstancesResent"] <= 4
    _check_site(a, _central_objects(central)["SITEA"])


def test_stow_rs_export_complete_plans(archive: tuple[OrthancProcess, dict[str, SiteRun]]) -> None:
    central, sites = archive
    b = sites["SITEB"]
    assert b.export is not None and b.export["DestinationKind"] == "dicomweb"
    _check_site(b, _central_objects(central)["SITEB"])
    # rtharvest export list|status|wait against the harvester.
    export_id, total = b.export["ID"], b.export["Progress"]["InstancesTotal"]
    code, lines = b.cli["list"]
    assert code == 0 and lines[0].split()[:4] == ["ID", "STATE", "HARVEST", "DESTINATION"] and len(lines) == 2
    assert lines[1].split()[:4] == [export_id, "Completed", b.harvest_id, "CENTRALWEB"]
    assert f"{total} of {total}" in lines[1]
    code, lines = b.cli["status"]
    assert code == 0
    assert lines[0] == f"Export {export_id} of harvest {b.harvest_id} to CENTRALWEB (dicomweb), site SITEB"
    assert lines[1].strip().startswith(f"Completed: {total} of {total} instances sent, 0 failed, {total} verified")
    assert lines[1].endswith("verification passed (0 absent, 0 manifest difference(s), 0 PHI hit(s))")
    code, lines = b.cli["wait"]
    assert code == 0 and len(lines) == 1 and lines[0] == b.cli["status"][1][1].strip()


def test_two_sites_one_archive_separable_without_collisions(archive: tuple[OrthancProcess, dict[str, SiteRun]]
                                                            ) -> None:
    central, sites = archive
    by_site = _central_objects(central)
    assert set(by_site) == {"SITEA", "SITEB"}  # every object names its site
    uids = {name: {str(ds.SOPInstanceUID) for ds in objs} for name, objs in by_site.items()}
    # Both sites exported objects of the same originals (same clinic, same UIDs) ...
    exported = {name: {u for u in site.truth.objects if site.key.uid(u) in uids[name]}
                for name, site in sites.items()}
    assert all(len(exported[name]) == len(uids[name]) for name in sites)  # each archived object traced back
    shared = exported["SITEA"] & exported["SITEB"]
    assert len(shared) == len(uids["SITEB"]) > 0  # B's complete plans are a part of A's "All"
    # ... and the archive holds them under different UIDs, at every level.
    assert not uids["SITEA"] & uids["SITEB"]
    originals = {name: site.originals() for name, site in sites.items()}
    for level in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        a = {str(ds.get(level)) for ds in by_site["SITEA"] if level in ds}
        b = {str(ds.get(level)) for ds in by_site["SITEB"] if level in ds}
        assert not a & b, level
        orig_a = {str(ds.get(level)) for ds in originals["SITEA"] if level in ds}
        assert orig_a and orig_a == {str(ds.get(level)) for ds in originals["SITEB"] if level in ds}, level
    # The clinics share PatientIDs (SYN001...); the archive's patients do not.
    pa = {str(ds.PatientID) for ds in by_site["SITEA"]}
    pb = {str(ds.PatientID) for ds in by_site["SITEB"]}
    assert pa and pb and not pa & pb
    assert all(p.startswith("SITEA-") for p in pa) and all(p.startswith("SITEB-") for p in pb)
    original_ids = {str(ds.PatientID) for objs in originals.values() for ds in objs}
    assert not original_ids & (pa | pb)
    api = RestClient(central.url, None)
    assert len(api.get("/patients")) == len(pa) + len(pb)
    for site in sites.values():
        status = site.api.get("/rtharvest/status")
        assert status["ExportWorkerAlive"] is True
        assert site.api.get("/rtharvest/destinations")["Site"] == site.name

"""The export service over a synthetic clinic "harvest", without Orthanc: selection, folder destination,
resume after a failure mid-export without duplicates, verification and REST validation.

The harvest side (manifest, tracker rows, stored files) is the clinic itself, read the way the plugin
reads its store; the destination is a real folder.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from rtharvest.core.references import extract_from_bytes
from rtharvest.export.destinations import DestinationError, Folder
from rtharvest.export.service import ExportService
from rtharvest.export.settings import ExportSettings
from rtharvest.export.verify import manifest_of_copy
from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog
from rtharvest.store.jobqueue import RetryPolicy
from rtharvest.store.tracking import Decision, ObjectRecord
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.web.httpapi import ApiError


class Site:
    """A "harvest" that kept the whole clinic."""

    def __init__(self, root: Path, truth: GroundTruth) -> None:
        self.truth = truth
        self.files = {uid: root / info.path for uid, info in self.truth.objects.items()}
        self.refs = {uid: extract_from_bytes(p.read_bytes()) for uid, p in self.files.items()}
        self.manifest = manifest_of_copy(self.refs.values(), "H1")
        self.records = [ObjectRecord("H1", uid, uid, Decision.KEPT, "", "", "", "SRC", None, True,
                                     series_uid=r.series_uid) for uid, r in self.refs.items()]
        self.reads = 0

    def read(self, orthanc_id: str) -> bytes:
        self.reads += 1
        return self.files[orthanc_id].read_bytes()

    def check(self, harvest_id: str) -> str:
        if harvest_id not in ("H1", "RUNNING"):
            raise ApiError(404, f"unknown harvest {harvest_id!r}")
        return "Completed" if harvest_id == "H1" else "Running"


@pytest.fixture(scope="module")
def site(synthetic: tuple[Path, GroundTruth]) -> Site:
    return Site(*synthetic)


def _service(tmp: Path, site: Site, batch: int = 40) -> ExportService:
    settings = ExportSettings(site="SITEA", database_path=tmp / "exports.sqlite", calling_aet="HARVEST",
                              modalities={"PACS": ("PACS", "127.0.0.1", 1)}, batch_size=batch,
                              folders={"ARCHIVE": tmp / "archive"})
    events = EventLog(Database(str(tmp / "events.sqlite")))
    service = ExportService(settings, events, lambda h: site.manifest, lambda h: site.records, site.check,
                            policy=RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0))
    service.read_file = site.read
    return service


def _busiest(site: Site) -> str:
    """The patient with the most plans (a small export that still has several batches)."""
    counts: dict[str, int] = {}
    for row in site.manifest.plans:
        counts[row.patient_id or ""] = counts.get(row.patient_id or "", 0) + 1
    return max(sorted(counts), key=lambda p: counts[p])


def _plan_with_dose(site: Site) -> dict[str, list[str]]:
    """``Plans`` selecting one Complete plan that has a dose (a small export)."""
    row = next(p for p in site.manifest.plans if p.status == "Complete" and p.dose_uids)
    return {"PlanUIDs": [row.plan_uid]}


def _drain(service: ExportService, limit: int = 50) -> None:
    for _ in range(limit):
        if not service.run_one():
            return
    raise AssertionError("export jobs did not finish")


def test_folder_export_is_complete_verified_and_deidentified(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    answer = service.create({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": "All"})
    assert answer["State"] == "Running"
    _drain(service)
    doc = service.document(answer["ID"])
    assert doc["State"] == "Completed", doc
    progress = doc["Progress"]
    stored = {r.sop_uid for r in site.records}
    assert progress["InstancesTotal"] == progress["InstancesSent"] == progress["InstancesVerified"]
    assert progress["InstancesTotal"] <= len(stored)
    assert doc["Verification"]["Passed"] and doc["Verification"]["PhiHitCount"] == 0
    assert doc["Verification"]["PhiValuesChecked"] >= 3 * len({r.patient_id for r in site.refs.values()})
    assert doc["Verification"]["PlansCompared"] == len(site.manifest.plans)
    folder = tmp_path / "archive" / answer["ID"]
    files = list(folder.rglob("*.dcm"))
    assert len(files) == progress["InstancesSent"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["Site"] == "SITEA" and manifest["Verification"]["Passed"]
    site_ids = {r.patient_id for r in site.refs.values()}
    text = (folder / "manifest.json").read_text()
    assert not any(pid and pid in text for pid in site_ids)  # the manifest beside the files is de-identified
    assert {p["PatientID"].split("-")[0] for p in manifest["Plans"]} == {"SITEA"}
    # The pseudonym mapping stays in the site's database only.
    mapping = dict(service.db.query("SELECT patient_id, pseudonym FROM rth_pseudonyms"))
    assert set(mapping) == {r.patient_id for r in site.refs.values() if r.patient_id} & set(mapping)
    assert {p["PatientID"] for p in manifest["Plans"]} <= set(mapping.values())


def test_complete_only_exports_the_complete_plans(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    answer = service.create({"Harvest": "H1", "Destination": "ARCHIVE"})
    _drain(service)
    doc = service.document(answer["ID"])
    complete = [p for p in site.manifest.plans if p.status == "Complete"]
    assert 0 < len(complete) < len(site.manifest.plans)
    assert doc["State"] == "Completed" and doc["Progress"]["PlansSelected"] == len(complete)
    manifest = json.loads((tmp_path / "archive" / answer["ID"] / "manifest.json").read_text())
    assert {p["Status"] for p in manifest["Plans"] if p["PlanUID"] in {service.key().uid(c.plan_uid)
                                                                       for c in complete}} == {"Complete"}


class Flaky(Folder):
    """A folder that goes away after ``good`` batches (a destination outage in the middle of an export)."""

    def __init__(self, name: str, root: Path, good: int) -> None:
        super().__init__(name, root)
        self.good = good
        self.batches = 0
        self.sent: list[str] = []

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        self.batches += 1
        if self.batches > self.good:
            raise DestinationError("ARCHIVE: connection refused")
        self.sent += [str(ds.SOPInstanceUID) for ds in datasets]
        return super().send(datasets)


def test_failure_mid_export_resumes_without_resending(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site, batch=10)
    flaky = Flaky("ARCHIVE", tmp_path / "archive", good=2)
    real = service.destination_of

    def destination(name: str, export_id: str) -> Any:
        flaky.root = tmp_path / "archive" / export_id
        return flaky if name == "ARCHIVE" else real(name, export_id)

    service.destination_of = destination
    answer = service.create({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": {"PatientIDs": [_busiest(site)]}})
    assert service.run_one()
    doc = service.document(answer["ID"])
    assert doc["State"] == "Running" and doc["Progress"]["InstancesSent"] == 20 < doc["Progress"]["InstancesTotal"]
    flaky.good = 10**6  # the destination is back
    _drain(service)
    doc = service.document(answer["ID"])
    assert doc["State"] == "Completed", doc
    assert len(flaky.sent) == len(set(flaky.sent)) == doc["Progress"]["InstancesTotal"]  # nothing sent twice
    assert doc["Progress"]["InstancesResent"] == 0


def test_same_input_same_output_across_exports(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    body = {"Harvest": "H1", "Destination": "ARCHIVE", "Plans": {"PatientIDs": [_busiest(site)]}}
    first = service.create(body)["ID"]
    second = service.create(body)["ID"]
    _drain(service)

    def names(export_id: str) -> set[str]:
        return {p.relative_to(tmp_path / "archive" / export_id).as_posix()
                for p in (tmp_path / "archive" / export_id).rglob("*.dcm")}

    assert names(first) == names(second) and names(first)
    one = sorted((tmp_path / "archive" / first).rglob("*.dcm"))[0]
    other = tmp_path / "archive" / second / one.relative_to(tmp_path / "archive" / first)
    assert pydicom.dcmread(one) == pydicom.dcmread(other)


@pytest.mark.parametrize("body, field, status", [
    ({"Destination": "ARCHIVE"}, "Harvest", 400),
    ({"Harvest": "nope", "Destination": "ARCHIVE"}, "Harvest", 404),
    ({"Harvest": "RUNNING", "Destination": "ARCHIVE"}, "Harvest", 409),
    ({"Harvest": "H1"}, "Destination", 400),
    ({"Harvest": "H1", "Destination": "MOON"}, "Destination", 400),
    ({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": "Some"}, "Plans", 400),
    ({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": {"Status": ["Great"]}}, "Plans.Status", 400),
    ({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": {"Colour": ["x"]}}, "Plans.Colour", 400),
    ({"Harvest": "H1", "Destination": "ARCHIVE", "Profile": {"Dates": "fuzz"}}, "Profile.Dates", 400),
    ({"Harvest": "H1", "Destination": "ARCHIVE", "Extra": 1}, "Extra", 400),
])
def test_bad_bodies_name_the_field(site: Site, tmp_path: Path, body: dict[str, Any], field: str, status: int) -> None:
    service = _service(tmp_path, site)
    with pytest.raises(ApiError) as err:
        service.create(body)
    assert err.value.status == status
    assert err.value.message.startswith(field + ":"), err.value.message
    assert service.list_exports() == []


def test_plan_filter_by_patient(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    pid = site.manifest.plans[0].patient_id
    assert pid
    answer = service.create({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": {"PatientIDs": [pid]}})
    _drain(service)
    doc = service.document(answer["ID"])
    assert doc["State"] == "Completed"
    assert doc["Progress"]["PlansSelected"] == sum(1 for p in site.manifest.plans if p.patient_id == pid)
    patients = {pydicom.dcmread(p, stop_before_pixels=True).PatientID
                for p in (tmp_path / "archive" / answer["ID"]).rglob("*.dcm")}
    assert patients == {service.pseudonym(pid)}


def test_cli_builds_the_request_body() -> None:
    from rtharvest.cli.commands import CliError, build_parser
    from rtharvest.export.cli import body_of

    args = build_parser().parse_args(["export", "start", "--harvest", "H1", "--destination", "ARCHIVE", "--status",
                                      "Complete", "--status", "Incomplete", "--dates", "keep", "--retain-institution"])
    assert body_of(args) == {"Harvest": "H1", "Destination": "ARCHIVE",
                             "Plans": {"Status": ["Complete", "Incomplete"]},
                             "Profile": {"Dates": "keep", "RetainInstitutionIdentity": True}}
    args = build_parser().parse_args(["export", "start", "--harvest", "H1", "--destination", "ARCHIVE",
                                      "--on-phi", "hold"])
    assert body_of(args)["Profile"] == {"OnPhiFound": "hold"}
    args = build_parser().parse_args(["export", "start", "--harvest", "H1", "--destination", "X", "--plans", "All",
                                      "--patient", "P1"])
    with pytest.raises(CliError):
        body_of(args)


def test_routes_and_page_section(site: Site, tmp_path: Path) -> None:
    from rtharvest.export.routes import register
    from rtharvest.web import pages as explorer_routes
    from rtharvest.web.httpapi import HttpRequest, Router

    service = _service(tmp_path, site)
    router = Router()
    register(router, service)
    explorer_routes.register(router)
    answer = router.handle(HttpRequest("GET", "/rtharvest/destinations"))
    assert json.loads(answer.body) == {"Site": "SITEA", "Destinations": [
        {"Name": "ARCHIVE", "Kind": "folder", "ResearchArchive": False, "Allowed": True},
        {"Name": "PACS", "Kind": "dicom", "ResearchArchive": False, "Allowed": True}]}
    bad = router.handle(HttpRequest("POST", "/rtharvest/exports", body=b'{"Harvest": "H1", "Destination": 3}'))
    assert bad.status == 400 and json.loads(bad.body)["Error"].startswith("Destination:")
    missing = router.handle(HttpRequest("GET", "/rtharvest/exports/0123456789abcdef"))
    assert missing.status == 404 and "Error" in json.loads(missing.body)
    created = json.loads(router.handle(HttpRequest("POST", "/rtharvest/exports",
                                                   body=b'{"Harvest": "H1", "Destination": "ARCHIVE"}')).body)
    listed = json.loads(router.handle(HttpRequest("GET", "/rtharvest/exports")).body)
    assert [d["ID"] for d in listed] == [created["ID"]] and listed[0]["State"] == "Running"
    cancelled = json.loads(router.handle(HttpRequest("POST", f"/rtharvest/exports/{created['ID']}/cancel")).body)
    assert cancelled["State"] == "Cancelled" and not service.run_one()
    page = router.handle(HttpRequest("GET", "/rtharvest/ui")).body.decode()
    assert 'src="ui/exports.js"' in page and 'id="exports"' in page
    script = router.handle(HttpRequest("GET", "/rtharvest/ui/exports.js"))
    assert script.status == 200 and b"'exports?limit=50'" in script.body and b"innerHTML" not in script.body


class Picky(Folder):
    """A folder that refuses one object the first time it sees it (a destination rejecting an instance)."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, root)
        self.refused: str | None = None
        self.sent: list[str] = []

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        if self.refused is None:
            self.refused = uids[-1]
            self.sent += uids[:-1]
            return {**super().send(datasets[:-1]), self.refused: "C-STORE status 0xA700"}
        self.sent += uids
        return super().send(datasets)


def test_a_refused_instance_is_retried_alone(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site, batch=10)
    picky = Picky("ARCHIVE", tmp_path / "archive")
    service.destination_of = lambda name, export_id: picky
    answer = service.create({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": {"PatientIDs": [_busiest(site)]}})
    assert service.run_one()  # the whole selection goes once; one instance is refused
    doc = service.document(answer["ID"])
    assert doc["State"] == "Running" and doc["Progress"]["InstancesFailed"] == 1
    assert service.failed_items(answer["ID"]) == [{"SOPInstanceUID": picky.refused, "Error": "C-STORE status 0xA700"}]
    _drain(service)
    doc = service.document(answer["ID"])
    assert doc["State"] == "Completed" and doc["Progress"]["InstancesFailed"] == 0
    assert len(picky.sent) == len(set(picky.sent)) == doc["Progress"]["InstancesTotal"]  # the refused one alone again
    assert doc["Progress"]["InstancesResent"] == 1


# ---------------------------------------------------------------------------------------------------
# Verification that fails: the check must see what a destination lost or leaked


def _export_to(service: ExportService, tmp: Path, folder: Folder, plans: Any) -> dict[str, Any]:
    """Run one export into ``folder`` (re-rooted under the export's ID) to its end; its document."""

    def destination(name: str, export_id: str) -> Folder:
        folder.root = tmp / "archive" / export_id
        return folder

    service.destination_of = destination
    answer = service.create({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": plans})
    _drain(service)
    return service.document(answer["ID"])


class Dropping(Folder):
    """A folder that silently loses the first RT Dose it is sent: it answers "stored" but never writes it."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, root)
        self.dropped: str | None = None

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        kept = []
        for ds in datasets:
            if self.dropped is None and ds.Modality == "RTDOSE":
                self.dropped = str(ds.SOPInstanceUID)
                continue
            kept.append(ds)
        assert super().send(kept) == {}
        return {}


def test_verification_fails_when_the_destination_drops_an_object(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    dropping = Dropping("ARCHIVE", tmp_path / "archive")
    doc = _export_to(service, tmp_path, dropping, _plan_with_dose(site))
    assert dropping.dropped is not None
    assert doc["State"] == "VerificationFailed", doc
    assert doc["Progress"]["InstancesSent"] == doc["Progress"]["InstancesTotal"]  # the destination said "stored"
    verification = doc["Verification"]
    assert verification["Passed"] is False and verification["PhiHitCount"] == 0
    assert verification["AbsentCount"] == 1 and verification["Absent"] == [dropping.dropped]
    assert verification["InstancesFound"] == verification["InstancesExpected"] - 1
    # The difference names the plan whose dose is gone, and the dose.
    original = service.db.scalar("SELECT sop_uid FROM rth_export_items WHERE new_uid = ?", (dropping.dropped,))
    plans = [service.key().uid(p.plan_uid) for p in site.manifest.plans if original in p.dose_uids]
    assert plans
    named = [d for d in verification["ManifestDifferences"] if d.startswith(f"plan {plans[0]}: DoseUIDs")]
    assert len(named) == 1 and dropping.dropped in named[0], verification["ManifestDifferences"]
    assert not (tmp_path / "archive" / doc["ID"] / "manifest.json").read_text().count('"Passed": true')


class Leaking(Folder):
    """A folder that writes each object's original PatientID into its SeriesDescription (what a broken
    de-identification step would leave)."""

    def __init__(self, name: str, root: Path, original_of: dict[str, str]) -> None:
        super().__init__(name, root)
        self.original_of = original_of

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        for ds in datasets:
            ds.SeriesDescription = f"series of {self.original_of[str(ds.PatientID)]}"
        return super().send(datasets)


def test_verification_fails_when_the_copy_holds_a_patient_id(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    patient = _busiest(site)
    leaking = Leaking("ARCHIVE", tmp_path / "archive", {service.pseudonym(patient): patient})
    doc = _export_to(service, tmp_path, leaking, {"PatientIDs": [patient]})
    assert doc["State"] == "VerificationFailed", doc
    verification = doc["Verification"]
    # Only the leak is wrong: everything arrived and the manifests agree.
    assert verification["AbsentCount"] == 0 and verification["ManifestDifferences"] == []
    assert verification["PhiHitCount"] == verification["InstancesFound"] > 0
    assert {(h["Attribute"], h["Kind"]) for h in verification["PhiHits"]} == {("SeriesDescription", "PatientID")}
    # The report names the attribute and the kind, never the value.
    assert patient not in json.dumps(verification)


class Relabelling(Folder):
    """A folder that files the first CT series it receives as MR (a destination rewriting Modality)."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, root)
        self.series: str | None = None

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        for ds in datasets:
            if self.series is None and ds.Modality == "CT":
                self.series = str(ds.SeriesInstanceUID)
            if str(ds.SeriesInstanceUID) == self.series:
                ds.Modality = "MR"
        return super().send(datasets)


def test_verification_compares_the_table_1_counts(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    patient = _busiest(site)
    passed = _export_to(service, tmp_path, Folder("ARCHIVE", tmp_path / "archive"), {"PatientIDs": [patient]})
    summary = passed["Verification"]["Summary"]
    assert passed["State"] == "Completed" and summary["Site"] == summary["Copy"]
    rows = [p for p in site.manifest.plans if p.patient_id == patient]
    assert summary["Site"]["Patients"] == 1 and summary["Site"]["PlansReferenced"] == len(rows)
    assert summary["Site"]["TreatmentRecords"] == len({u for p in rows for u in p.record_uids})
    assert summary["Site"]["PlanningSeries"] == len({u for p in rows for u in p.planning_series_uids}) > 0
    assert summary["Site"]["ImageSeries"].get("CT", 0) > 0
    # A copy whose CT series became MR: the counts differ, and the verification says which.
    relabelling = Relabelling("ARCHIVE", tmp_path / "archive")
    failed = _export_to(service, tmp_path, relabelling, {"PatientIDs": [patient]})
    assert relabelling.series is not None and failed["State"] == "VerificationFailed"
    summary = failed["Verification"]["Summary"]
    assert summary["Copy"]["ImageSeries"].get("CT", 0) == summary["Site"]["ImageSeries"]["CT"] - 1
    assert summary["Copy"]["ImageSeries"].get("MR", 0) == summary["Site"]["ImageSeries"].get("MR", 0) + 1
    assert any(d.startswith("Summary.ImageSeries is ") for d in failed["Verification"]["ManifestDifferences"])


def test_a_generated_secret_survives_a_restart(site: Site, tmp_path: Path) -> None:
    """Without a configured secret the site key is generated once and kept: a restarted plugin (a new
    service on the same database) maps every UID and patient as before; another database does not."""
    first = _service(tmp_path, site)
    assert first.settings.secret is None
    uid, again = "1.2.826.0.1.3680043.2.1125.1.42", _service(tmp_path, site)
    assert again.key().uid(uid) == first.key().uid(uid)
    assert again.key().pseudonym("SYN001") == first.key().pseudonym("SYN001")
    # Kept apart from the pseudonym map: its own file, readable by the owner only; nothing in the database.
    assert first.db.scalar("SELECT count(*) FROM rth_site_keys") == 0
    secret_file = tmp_path / "exports.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert bytes.fromhex(secret_file.read_text().strip()) == first.key().secret
    (tmp_path / "other").mkdir()
    elsewhere = _service(tmp_path / "other", site)
    assert elsewhere.key().uid(uid) != first.key().uid(uid)


def test_cli_list_status_wait_cancel(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``rtharvest export list|status|wait|cancel`` over HTTP against the export routes (the plugin's own
    router, served by the tests' loopback API server): a verified export, one whose verification failed,
    and one cancelled before it ran."""
    from rtharvest.cli.commands import main as cli_main
    from rtharvest.export.routes import register

    from .browser.apiserver import ApiServer

    service = _service(tmp_path, site)
    plans = _plan_with_dose(site)
    good = _export_to(service, tmp_path, Folder("ARCHIVE", tmp_path / "archive"), plans)
    bad = _export_to(service, tmp_path, Dropping("ARCHIVE", tmp_path / "archive"), plans)
    idle = service.create({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": plans})["ID"]
    assert (good["State"], bad["State"], service.state(idle)) == ("Completed", "VerificationFailed", "Running")
    (tmp_path / "api").mkdir()
    api = ApiServer(tmp_path / "api").start()
    register(api.router, service)

    def run(*argv: str, options: Sequence[str] = ()) -> tuple[int, list[str], str]:
        out = io.StringIO()
        code = cli_main(["--url", api.url, *options, "export", *argv], out=out, env={})
        return code, out.getvalue().splitlines(), capsys.readouterr().err

    try:
        code, lines, _ = run("list")
        assert code == 0 and lines[0].split()[:3] == ["ID", "STATE", "HARVEST"]
        listed = {line.split()[0]: line.split() for line in lines[1:]}
        assert set(listed) == {good["ID"], bad["ID"], idle}
        total = good["Progress"]["InstancesTotal"]
        assert listed[good["ID"]][1:4] == ["Completed", "H1", "ARCHIVE"]
        assert f"{total} of {total}" in " ".join(listed[good["ID"]])
        assert listed[bad["ID"]][1] == "VerificationFailed" and listed[idle][1] == "Running"
        assert listed[idle][-5:] == ["0", "of", "0", "0", "0"]  # not selected yet: nothing to send

        code, lines, _ = run("status", good["ID"])
        assert code == 0
        assert lines[0] == f"Export {good['ID']} of harvest H1 to ARCHIVE (folder), site SITEA"
        assert lines[1].strip().startswith(f"Completed: {total} of {total} instances sent, 0 failed, {total} "
                                           "verified")
        assert "verification passed (0 absent, 0 manifest difference(s), 0 PHI hit(s))" in lines[1]
        code, lines, _ = run("status", bad["ID"])
        assert code == 0 and "verification FAILED (1 absent" in lines[1]

        code, lines, _ = run("wait", good["ID"], "--timeout", "5", "--interval", "0.1")
        assert code == 0 and len(lines) == 1 and lines[0].startswith("Completed: ")
        code, lines, err = run("wait", bad["ID"], "--timeout", "5", "--interval", "0.1")
        assert code == 5 and lines[0].startswith("VerificationFailed: ")  # completed with failures
        assert f"export {bad['ID']} completed with failures (VerificationFailed" in err

        code, lines, _ = run("cancel", idle)
        assert code == 0 and lines == [f"{idle}: Cancelled"]
        assert service.state(idle) == "Cancelled" and not service.run_one()
        code, lines, err = run("wait", idle, "--timeout", "5")
        assert code == 6 and lines[0].startswith("Cancelled: ") and "ended Cancelled" in err
        code, lines, err = run("cancel", good["ID"])  # a finished export cannot be cancelled
        assert code == 1 and lines == [] and "Completed" in err

        code, lines, err = run("status", "0123456789abcdef")
        assert code == 1 and lines == [] and "unknown export" in err
        code, lines, _ = run("list", options=["--json"])
        assert code == 0 and [d["ID"] for d in json.loads("\n".join(lines))] == [idle, bad["ID"], good["ID"]]
    finally:
        api.stop()


def test_a_destination_that_became_a_source_receives_nothing(site: Site, tmp_path: Path) -> None:
    """Refused at send time too: a harvest started after the export was created now reads ARCHIVE."""
    service = _service(tmp_path, site)
    answer = service.create({"Harvest": "H1", "Destination": "ARCHIVE", "Plans": {"PatientIDs": [_busiest(site)]}})
    service.clinical_sources = lambda: {"ARCHIVE": "the Source of harvest H2"}
    _drain(service)
    doc = service.document(answer["ID"])
    assert doc["State"] == "Failed" and doc["Progress"]["InstancesSent"] == 0
    assert doc["Errors"][0].startswith("ARCHIVE is the Source of harvest H2")
    assert not list((tmp_path / "archive").rglob("*.dcm"))


def test_an_older_database_keeps_its_secret_and_pseudonyms(site: Site, tmp_path: Path) -> None:
    """A database of an older version: the secret in rth_site_keys, 10-hex pseudonyms. The secret moves to
    its own file (same UIDs), recorded pseudonyms stay, new patients get 64-bit ones, and a pseudonym
    another patient already has is drawn again."""
    old = _service(tmp_path, site)
    secret = bytes(range(32))
    with old.db.transaction():
        old.db.execute("INSERT INTO rth_site_keys (site, secret, created_at) VALUES ('SITEA', ?, 0)", (secret,))
        old.db.execute("INSERT INTO rth_pseudonyms (site, patient_id, pseudonym, created_at)"
                       " VALUES ('SITEA', 'OLD1', 'SITEA-0123456789', 0)")
    service = _service(tmp_path, site)
    assert service.key().secret == secret
    assert service.db.scalar("SELECT count(*) FROM rth_site_keys") == 0
    assert (tmp_path / "exports.secret").stat().st_mode & 0o777 == 0o600
    assert service.pseudonym("OLD1") == "SITEA-0123456789"
    new = service.pseudonym("NEW1")
    assert new == service.key().pseudonym("NEW1") and len(new.split("-")[1]) == 16
    # Another patient took NEW2's first pseudonym: NEW2 gets the next draw, still unique.
    taken = service.key().pseudonym("NEW2")
    with service.db.transaction():
        service.db.execute("INSERT INTO rth_pseudonyms (site, patient_id, pseudonym, created_at)"
                           " VALUES ('SITEA', 'OTHER', ?, 0)", (taken,))
    assert service.pseudonym("NEW2") == service.key().pseudonym("NEW2", 1) != taken
    restarted = _service(tmp_path, site)
    assert restarted.key().secret == secret and restarted.pseudonym("NEW2") == service.pseudonym("NEW2")


class Choking(Folder):
    """A destination with a bug whose exception message quotes the original PatientID it was handed."""

    def __init__(self, name: str, root: Path, original_of: dict[str, str]) -> None:
        super().__init__(name, root)
        self.original_of = original_of

    def send(self, datasets: Sequence[Dataset]) -> dict[str, str]:
        raise ValueError(f"cannot file patient {self.original_of[str(datasets[0].PatientID)]}")


def test_an_internal_error_quoting_a_patient_stays_out_of_job_errors_and_events(site: Site, tmp_path: Path) -> None:
    service = _service(tmp_path, site)
    patient = _busiest(site)
    choking = Choking("ARCHIVE", tmp_path / "archive", {service.pseudonym(patient): patient})
    doc = _export_to(service, tmp_path, choking, {"PatientIDs": [patient]})
    assert doc["State"] == "Failed"
    assert doc["Errors"] and all(e.startswith("internal error: ValueError (message withheld") for e in doc["Errors"])
    events = [e.message for e in service.events.query(limit=1000)]
    assert any("internal error: ValueError" in m for m in events)
    assert not any(patient in m for m in [*events, *doc["Errors"]])

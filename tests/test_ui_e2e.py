"""Against the real servers: the manifest over REST, the ``rtharvest`` CLI and the Explorer page.

One harvest of the synthetic clinic's window "all" from the plain Orthanc source (module fixture, fresh
harvester store), then:

* the manifest over REST (JSON, CSV, whole store) equals the clinic's ground truth plan by plan;
* the ``rtharvest`` command (a subprocess, as a user runs it) lists, shows, exports, re-harvests and waits,
  with its documented exit codes, and refuses a wrong password clearly;
* headless Chromium opens ``/rtharvest/ui`` on the harvester (Basic auth as a DevTools header, then as
  ``http://user:password@`` in the URL), shows the harvest, the manifest rows and the charts with the ground
  truth's numbers, starts a harvest from its form, pauses and resumes it (checked over REST), and Orthanc
  Explorer's study page shows a harvested study's provenance. Screenshots go to ``artifacts/`` in the
  repository (gitignored) and to the test's tmp dir.

The harvest that is paused must stay Running long enough to be clicked, whatever the machine's speed: its
source ``HELD`` is a small pynetdicom Q/R SCP whose C-FIND answers only when the test releases it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pynetdicom import AE, QueryRetrievePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from rtharvest.edge.launcher import free_port
from rtharvest.synth.groundtruth import GroundTruth, PlanTruth, Window

from .conftest import Clinic
from .harvesting import provenance_of, start_harvest, stored_sop_uids, wait_completed
from .servers import LOCALHOST, DicomSource

pytestmark = pytest.mark.servers

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"
RTHARVEST = Path(sys.executable).parent / "rtharvest"
SOURCE = "ORTHANC_SRC"
#: Colours of the time chart's bars (harvests.js).
PATIENTS_RGB, PLANS_RGB = (0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B)
SUMMARY_KEYS = ("Patients", "PlansReferenced", "PlansCollected", "SuccessRate", "PlansByIntent", "PlansByStatus",
                "InvalidPlans", "ImageSeries", "PlanningSeries", "Registrations", "TreatmentRecords", "Fractions",
                "SummaryRecords")


class HeldSource:
    """A Q/R SCP whose every C-FIND waits until :meth:`release` (then matches nothing).

    A harvest from it stays Running, its seed query leased, for as long as the test needs.
    """

    def __init__(self, aet: str = "HELD", hold_s: float = 25.0) -> None:
        self.aet, self.hold_s = aet, hold_s
        self.port = free_port()
        self.asked = threading.Event()
        self._released = threading.Event()
        ae = AE(ae_title=aet)
        ae.supported_contexts = QueryRetrievePresentationContexts
        ae.add_supported_context(Verification)
        server = ae.start_server((LOCALHOST, self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, self._find)])
        assert server is not None
        self._server = server

    def _find(self, event: Any) -> Iterator[tuple[int, Any]]:
        self.asked.set()
        self._released.wait(self.hold_s)
        yield from ()  # no match: pynetdicom answers Success

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self.release()
        self._server.shutdown()

    @property
    def source(self) -> DicomSource:
        return DicomSource(name=self.aet, aet=self.aet, port=self.port, kind="held")


@dataclass
class Harvested:
    clinic: Clinic
    truth: GroundTruth
    window: Window
    harvest_id: str
    held: HeldSource

    @property
    def credentials(self) -> tuple[str, str]:
        creds = self.clinic.harvester.credentials
        assert creds is not None, "the harvester runs with authentication"
        return creds


@pytest.fixture(scope="module")
def harvested(clinic: Clinic, loaded: GroundTruth) -> Iterator[Harvested]:
    """A fresh harvester (plus the held source) that harvested window "all" from the plain Orthanc."""
    held = HeldSource()
    try:
        clinic.restart_harvester(fresh=True, extra_sources={held.aet: held.source})
        window = loaded.window("all")
        harvest_id = start_harvest(clinic.api, window, SOURCE)
        wait_completed(clinic.api, harvest_id)
        yield Harvested(clinic, loaded, window, harvest_id, held)
    finally:
        held.stop()
        # Leave the session's harvester as the other modules know it (without the held source).
        clinic.restart_harvester(fresh=True)


def _wait(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------
# 1. The manifest over REST equals the ground truth


def _by_plan(plans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows = {p["PlanUID"]: p for p in plans}
    assert len(rows) == len(plans), "a plan appears twice in the manifest"
    return rows


def _assert_plan_equals(row: dict[str, Any], t: PlanTruth) -> None:
    where = (t.patient_id, t.plan_uid, t.traps)
    assert row["Status"] == t.status, where
    assert row["PatientID"] == t.patient_id, where
    assert row["PlanIntent"] == t.plan_intent, where
    assert row["StructureSetUID"] == t.structure_set_uid, where
    for key, expected in (("DoseUIDs", t.dose_uids), ("PlanningSeriesUIDs", t.planning_series_uids),
                          ("RegistrationUIDs", t.registration_uids),
                          ("RegisteredSeriesUIDs", t.registered_series_uids), ("RecordUIDs", t.record_uids),
                          ("SummaryRecordUIDs", t.summary_record_uids)):
        assert sorted(row[key]) == sorted(expected), (*where, key)
    assert row["RegistrationTypes"] == t.registration_types, where
    assert (row["Treatments"], row["FirstTreatment"], row["LastTreatment"]) == \
        (t.treatments, t.first_treatment, t.last_treatment), where
    assert (row["Fractions"], row["FractionsPlanned"], row["Records"], row["SummaryRecords"]) == \
        (t.fractions, t.fractions_planned, t.records, t.summary_records), where
    got_missing = sorted((m["What"], m["UID"], m["Reason"]) for m in row["Missing"])
    assert got_missing == sorted((m.what, m.uid, m.reason) for m in t.missing), where


def assert_manifest_equals_truth(doc: dict[str, Any], window: Window) -> None:
    rows = _by_plan(doc["Plans"])
    assert set(rows) == {t.plan_uid for t in window.plans}
    for t in window.plans:
        _assert_plan_equals(rows[t.plan_uid], t)
    expected = window.summary.to_dict()
    for key in SUMMARY_KEYS:
        assert doc["Summary"][key] == expected[key], key
    assert doc["Summary"]["OrphanObjects"] == 0 and doc["Orphans"] == []


def test_manifest_over_rest_equals_ground_truth(harvested: Harvested) -> None:
    api, window, hid = harvested.clinic.api, harvested.window, harvested.harvest_id
    doc = api.get(f"/rtharvest/harvests/{hid}/manifest")
    assert doc["Harvest"] == hid
    assert_manifest_equals_truth(doc, window)
    # Every trap's status is there: the comparison above is not vacuous.
    assert {p["Status"] for p in doc["Plans"]} == {"Complete", "Incomplete", "Missing", "Invalid"}
    # The dangling references are the named missing links, and no failure is left unexplained.
    dangling = {d.uid for d in harvested.truth.dangling}
    assert {m["UID"] for p in doc["Plans"] for m in p["Missing"]} == dangling
    assert {f["Target"] for f in doc["Failures"]} <= dangling

    # CSV: one row per plan, straight into pandas.
    status, text = api.request("GET", f"/rtharvest/harvests/{hid}/manifest?format=csv")
    assert status == 200 and isinstance(text, str), text
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    assert len(frame) == len(window.plans)
    assert set(frame["Harvest"]) == {hid}
    by_plan = frame.set_index("PlanUID")
    assert set(by_plan.index) == {t.plan_uid for t in window.plans}
    for t in window.plans:
        row = by_plan.loc[t.plan_uid]
        assert row["Status"] == t.status and row["PatientID"] == t.patient_id, t.plan_uid
        assert row["StructureSetUID"] == (t.structure_set_uid or "")
        assert sorted(filter(None, row["DoseUIDs"].split(";"))) == sorted(t.dose_uids)
        assert sorted(filter(None, row["PlanningSeriesUIDs"].split(";"))) == sorted(t.planning_series_uids)
        assert sorted(filter(None, row["MissingWhat"].split(";"))) == sorted(m.what for m in t.missing)
        assert int(row["Treatments"]) == t.treatments
    assert Counter(frame["Status"]) == Counter(window.summary.plans_by_status)
    typed = pd.read_csv(io.StringIO(text), parse_dates=["FirstTreatment", "LastTreatment"])
    assert typed["Treatments"].sum() == sum(t.treatments for t in window.plans)
    assert str(typed["FirstTreatment"].dtype).startswith("datetime64")

    # The whole store holds this harvest only (plus harvests adding nothing): the same plans and counts.
    store = api.get("/rtharvest/manifest")
    assert store["Harvest"] is None
    assert_manifest_equals_truth(store, window)
    status, store_csv = api.request("GET", "/rtharvest/manifest?format=csv")
    assert status == 200
    assert len(pd.read_csv(io.StringIO(store_csv))) == len(window.plans)


# ---------------------------------------------------------------------------------------------------
# 2. The CLI against the real server


@dataclass
class Cli:
    url: str
    user: str
    password: str

    def __call__(self, *argv: str, password: str | None = None, timeout: float = 60) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RTHARVEST_")}
        args = [str(RTHARVEST), "--url", self.url, "--user", self.user, "--password", password or self.password,
                *argv]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        return done.returncode, done.stdout, done.stderr


def test_cli_against_the_real_server(harvested: Harvested, tmp_path: Path) -> None:
    api, window, hid = harvested.clinic.api, harvested.window, harvested.harvest_id
    user, password = harvested.credentials
    cli = Cli(harvested.clinic.harvester.url, user, password)
    plans = len(window.plans)
    dangling = {d.uid for d in harvested.truth.dangling}

    code, out, err = cli("harvest", "list")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith(hid))
    assert "Completed" in line and SOURCE in line and f"{window.summary.plans_collected} of {plans}" in line, line

    code, out, err = cli("harvest", "status", hid)
    assert code == 0, err
    assert f"Harvest {hid}" in out and f"window   {window.date_from}-{window.date_to}" in out, out
    assert "Completed: " in out, out
    assert f"{window.summary.patients} patient(s), plans {window.summary.plans_collected} of {plans} collected" in out
    code, out, _ = cli("--json", "harvest", "status", hid)
    assert code == 0 and json.loads(out) == api.get(f"/rtharvest/harvests/{hid}")

    # The manifest as CSV, to stdout and to a file: the same rows pandas reads from the REST answer.
    code, out, err = cli("manifest", hid, "--csv")
    assert code == 0, err
    frame = pd.read_csv(io.StringIO(out))
    assert len(frame) == plans and set(frame["PlanUID"]) == {t.plan_uid for t in window.plans}
    assert dict(zip(frame["PlanUID"], frame["Status"], strict=True)) == {t.plan_uid: t.status for t in window.plans}
    target = tmp_path / "store.csv"
    code, _, err = cli("manifest", "--all", "--csv", "-o", str(target))
    assert code == 0 and f"wrote {target}" in err
    assert len(pd.read_csv(target)) == plans
    code, out, _ = cli("manifest", hid, "--json")
    assert code == 0 and json.loads(out)["Summary"]["PlansReferenced"] == plans
    code, out, _ = cli("manifest", hid)  # a summary: counts, then the plans that are not Complete and why
    assert code == 0 and out.startswith(f"Manifest of harvest {hid}: {plans} treated plan(s) referenced")
    assert all(uid in out for uid in dangling) and len(out.splitlines()) < 40

    # Failed jobs: exactly the clinic's dangling references, not found at the source at the first attempt.
    code, out, err = cli("jobs", "--harvest", hid, "--state", "failed")
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert len(rows) == len(dangling) and all(hid in r and "failed" in r and "not found" in r for r in rows), out
    assert {uid for uid in dangling if any(uid in r for r in rows)} == dangling
    code, out, _ = cli("--json", "jobs", "--harvest", hid, "--state", "failed")
    failed = json.loads(out)
    assert {j["Target"] for j in failed} == dangling and all(j["Attempts"] == 1 for j in failed)

    code, out, err = cli("log", "--harvest", hid, "--limit", "500")
    assert code == 0, err
    lines = out.splitlines()
    assert lines and all(f"harvest={hid}" in x for x in lines)
    code, out, _ = cli("log", "--harvest", hid, "--level", "warning", "--since", "1h")
    assert code == 0 and "not found" in out

    # A re-harvest of the same window: started and followed from the command line; it moves nothing.
    arrivals = api.get("/rtharvest/status")["Arrivals"]
    code, out, err = cli("harvest", "start", "--source", SOURCE, "--from", str(window.date_from), "--to",
                         str(window.date_to), "--label", "cli re-harvest")
    assert code == 0, err
    second = out.strip()
    assert len(second) == len(hid) and second != hid, out
    code, out, err = cli("harvest", "wait", second, "--interval", "0.3", "--timeout", "120", timeout=150)
    # The dangling references fail again: completed with failures (5), not refused (1).
    assert code == 5, err
    assert out.splitlines()[-1].startswith("Completed:"), out
    assert f"harvest {second} completed with {len(dangling)} failed job(s)" in err
    assert f"see: rtharvest jobs --harvest {second} --state failed" in err
    doc = api.get(f"/rtharvest/harvests/{second}")
    assert doc["State"] == "Completed" and doc["Label"] == "cli re-harvest"
    assert api.get("/rtharvest/status")["Arrivals"] == arrivals
    assert_manifest_equals_truth(api.get(f"/rtharvest/harvests/{second}/manifest"), window)

    # Exit codes: refused (1) with the server's reason, usage (2), unreachable (3).
    code, _, err = cli("harvest", "pause", hid)
    assert code == 1 and "(409)" in err and "Completed" in err, err
    code, _, err = cli("harvest", "status", "0123456789abcdef")
    assert code == 1 and "unknown harvest" in err, err
    code, _, err = cli("harvest", "start", "--source", SOURCE)
    assert code == 2 and "--from/--to" in err, err
    code, _, err = cli("harvest", "start", "--source", "NOPE", "--from", "20200101")
    assert code == 1 and "unknown source" in err, err
    code, _, err = Cli(f"http://127.0.0.1:{free_port()}", user, password)("harvest", "list")
    assert code == 3 and "cannot reach" in err, err
    # A wrong password: a clear message, no output, non-zero.
    code, out, err = cli("harvest", "list", password="not-the-password")
    assert code == 1 and out == "", out
    assert "authentication failed (401)" in err and "--password" in err, err


# ---------------------------------------------------------------------------------------------------
# 3. The Explorer page in Chromium


def _screenshot(browser: Any, tmp_path: Path, name: str, full_page: bool = True) -> bytes:
    """A PNG of the page in the test's tmp dir and in ``artifacts/`` of the repository."""
    shot: bytes = browser.screenshot(tmp_path / name, full_page=full_page)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(shot)
    return shot


@pytest.mark.browser
def test_explorer_page_in_chromium(harvested: Harvested, tmp_path: Path) -> None:
    from .browser.cdp import Browser
    from .browser.png import decode

    api, window, hid = harvested.clinic.api, harvested.window, harvested.harvest_id
    base = harvested.clinic.harvester.url
    user, password = harvested.credentials
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    summary = window.summary

    with Browser(tmp_path / "profile", 1400, 1300) as browser:
        browser.call("Network.enable")
        browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {token}"})
        browser.navigate(f"{base}/rtharvest/ui#harvest={hid}")
        browser.wait_for(f"document.querySelectorAll('#plans tbody tr').length === {len(window.plans)}")
        row = f"document.querySelector('#harvests tr[data-id=\"{hid}\"]')"

        # The harvest is listed, Completed; the page offers no pause/resume/cancel for a finished harvest.
        assert browser.evaluate(f"{row}.querySelector('.chip').textContent") == "Completed"
        assert browser.evaluate(f"{row}.classList.contains('selected')") is True
        assert browser.evaluate(f"['pause', 'resume', 'cancel'].map(a => {row}.querySelector("
                                "'button[data-action=\"' + a + '\"]').hidden)") == [True, True, True]
        assert browser.evaluate(f"{row}.children[8].textContent") == \
            f"{summary.plans_collected} / {summary.plans_referenced}"

        # Summary cards, the manifest rows (one per plan, with its status) and the failed jobs.
        cards = browser.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('#summary .card'))"
                                 ".map(c => [c.querySelector('.label').textContent, c.querySelector('.value')"
                                 ".textContent]))")
        assert cards["Patients"] == str(summary.patients)
        assert cards["Plans referenced"] == str(summary.plans_referenced)
        assert cards["Plans collected"] == str(summary.plans_collected)
        assert cards["Success rate"] == f"{summary.success_rate * 100:.1f} %"
        assert cards["Treatment records"] == str(summary.treatment_records)
        rows = browser.evaluate("Array.from(document.querySelectorAll('#plans tbody tr')).map(r => "
                                "[r.children[0].textContent, r.dataset.status, r.children[4].textContent])")
        assert Counter((p, s) for p, s, _ in rows) == Counter((t.patient_id, t.status) for t in window.plans)
        missing = [m for _, s, m in rows if s in ("Incomplete", "Missing")]
        assert len(missing) == 2 and all("not found at source" in m for m in missing), missing
        browser.wait_for(f"document.querySelectorAll('#failed-jobs tbody tr').length === "
                         f"{len({d.uid for d in harvested.truth.dangling})}")

        # The charts are SVG drawn by the page, with the ground truth's numbers: patients and plans per
        # period of first treatment (QA plans excluded, a patient counted at their first), plans per intent
        # and per status.
        def bars(chart: str) -> list[list[Any]]:
            return list(browser.evaluate(
                f"Array.from(document.querySelectorAll('#{chart} svg rect[data-value]'))"
                ".map(r => [r.dataset.series || '', r.dataset.label, Number(r.dataset.value)])"))

        assert {label: value for _, label, value in bars("chart-intent")} == summary.plans_by_intent
        assert {label: value for _, label, value in bars("chart-status")} == summary.plans_by_status
        period = browser.evaluate("document.getElementById('chart-time').dataset.bin")
        firsts = {t.plan_uid: (t.patient_id, t.first_treatment) for t in window.plans
                  if t.status != "Invalid" and t.first_treatment}

        def when(date: str) -> str:
            if period == "Quarterly":
                return f"{date[:4]}-Q{(int(date[4:6]) - 1) // 3 + 1}"
            return f"{date[:4]}-{date[4:6]}"[:4 if period == "Yearly" else 7]

        patient_first: dict[str, str] = {}
        for patient, date in firsts.values():
            patient_first[patient] = min(patient_first.get(patient, date), date)
        expected_time = {("Plans", k): v for k, v in Counter(when(d) for _, d in firsts.values()).items()}
        expected_time |= {("Patients", k): v for k, v in Counter(when(d) for d in patient_first.values()).items()}
        drawn = {(series, label): value for series, label, value in bars("chart-time") if value}
        assert drawn == expected_time, period

        shot = _screenshot(browser, tmp_path, "ui-e2e-harvest.png")
        image = decode(shot)
        assert image.count(PATIENTS_RGB) > 200 and image.count(PLANS_RGB) > 200 and image.distinct_colors() > 10

        # A new harvest from the page's form, from the held source: it stays Running until released.
        browser.evaluate("document.getElementById('new-harvest-toggle').click()")
        browser.wait_for("Array.from(document.getElementById('nh-source').options).some(o => o.value === 'HELD')")
        browser.evaluate("(() => { document.getElementById('nh-source').value = 'HELD';"
                         " document.getElementById('nh-from').value = '2020-01-01';"
                         " document.getElementById('nh-to').value = '2020-12-31';"
                         " document.getElementById('nh-label').value = 'held for pause/resume';"
                         " document.querySelector('#new-harvest button[type=submit]').click(); })()")
        held_id = browser.wait_for("(() => { const s = window.rtharvestPage.state.selected;"
                                   f" return s && s !== {json.dumps(hid)} ? s : null; }})()")
        doc = api.get(f"/rtharvest/harvests/{held_id}")
        assert (doc["Source"], doc["From"], doc["To"], doc["Label"]) == \
            ("HELD", "20200101", "20201231", "held for pause/resume")
        assert harvested.held.asked.wait(20), "the held source was never queried"
        held_row = f"document.querySelector('#harvests tr[data-id=\"{held_id}\"]')"

        def chip_is(state: str) -> None:
            browser.wait_for(f"{held_row} && {held_row}.querySelector('.chip').textContent === '{state}'")

        def click(action: str) -> None:
            browser.evaluate(f"{held_row}.querySelector('button[data-action=\"{action}\"]').click()")

        chip_is("Running")
        browser.wait_for(f"!{held_row}.querySelector('button[data-action=\"pause\"]').hidden")
        click("pause")
        _wait(lambda: api.get(f"/rtharvest/harvests/{held_id}")["State"] == "Paused", what="Paused over REST")
        chip_is("Paused")
        assert browser.evaluate(f"{held_row}.querySelector('button[data-action=\"resume\"]').hidden") is False
        assert browser.evaluate(f"{held_row}.querySelector('button[data-action=\"pause\"]').hidden") is True
        browser.wait_for("document.getElementById('toast').textContent.indexOf('Paused') >= 0")
        _screenshot(browser, tmp_path, "ui-e2e-paused.png", full_page=False)
        click("resume")
        _wait(lambda: api.get(f"/rtharvest/harvests/{held_id}")["State"] == "Running", what="Running over REST")
        chip_is("Running")
        # Released, the seed query matches nothing: the harvest completes, and the page shows it.
        harvested.held.release()
        wait_completed(api, held_id, deadline_s=30)
        chip_is("Completed")
        events = api.get(f"/rtharvest/log?harvest={held_id}&limit=50")
        assert {"harvest paused", "harvest resumed"} <= {e["Message"] for e in events}, events
        errors = [c for c in browser.console if c.startswith(("error", "exception"))]
        assert errors == []

        # Orthanc Explorer: a harvested study's page shows its provenance, linked to the harvest.
        plan_uid = next(t for t in window.plans if t.status == "Complete").plan_uid
        study = api.get(f"/instances/{stored_sop_uids(api)[plan_uid]}/study")["ID"]
        series = api.get(f"/studies/{study}/series")
        browser.navigate(f"{base}/app/explorer.html")
        assert browser.wait_for("document.getElementById('rtharvest-link') &&"
                                " document.getElementById('rtharvest-link').getAttribute('href')") == "../rtharvest/ui"
        browser.navigate(f"{base}/app/explorer.html#study?uuid={study}")
        browser.wait_for("document.querySelectorAll('#rtharvest-provenance li.rtharvest-item a').length === "
                         f"{len(series)}")
        text = browser.evaluate("document.getElementById('rtharvest-provenance').textContent")
        assert "not harvested" not in text
        for s in series:
            meta = provenance_of(api, s["Instances"][0])
            assert meta["HarvestId"] == hid and meta["HarvestSource"] == SOURCE
            assert meta["HarvestHop"] in text and meta["HarvestedAt"] in text
        links = browser.evaluate("Array.from(document.querySelectorAll('#rtharvest-provenance a'))"
                                 ".map(a => a.getAttribute('href'))")
        assert set(links) == {f"../rtharvest/ui#harvest={hid}"}
        browser.wait_for("jQuery.mobile.activePage.attr('id') === 'study' &&"
                         " !document.querySelector('.ui-mobile-viewport-transitioning')")
        time.sleep(0.5)
        _screenshot(browser, tmp_path, "ui-e2e-explorer-study.png", full_page=False)
        assert [c for c in browser.console if c.startswith("exception")] == []

        # The other way to log in: credentials in the URL (the page's fetch() once refused every request then).
        browser.call("Network.setExtraHTTPHeaders", headers={})
        port = harvested.clinic.harvester.http_port
        browser.navigate(f"http://{user}:{password}@127.0.0.1:{port}/rtharvest/ui#harvest={hid}")
        browser.wait_for(f"document.querySelectorAll('#plans tbody tr').length === {len(window.plans)}")
        assert browser.evaluate("document.getElementById('banner').hidden") is True
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# 4. The plans table and the export form, at 1,400 and 1,000 px (the page's real routes on the tests'
#    loopback API server: a clinic of ten years and 51 plans, more than one page of the table)

#: Plans per page of the table (harvests.js PLAN_PAGE).
PLAN_PAGE = 25
STATUS_ORDER = ("Missing", "Incomplete", "Invalid", "Complete")


@dataclass
class PageClinic:
    api: Any
    harvest_id: str
    manifest: dict[str, Any]
    root: Path


@pytest.fixture(scope="module")
def page_clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageClinic]:
    from rtharvest.synth.generator import SynthOptions, generate

    from .browser.apiserver import ApiServer, load_harvest

    root = tmp_path_factory.mktemp("page-clinic")
    truth = generate(root / "clinic", SynthOptions(patients=6, history_patients=40, ct_slices=2, matrix=8))
    (root / "api").mkdir()
    api = ApiServer(root / "api").start()
    try:
        hid = load_harvest(api, root / "clinic", truth, label="ten years, 51 plans")
        manifest = json.loads(api.manifest(hid, "json").body)
        assert len(manifest["Plans"]) > 2 * PLAN_PAGE
        yield PageClinic(api, hid, manifest, root)
    finally:
        api.stop()


def _statuses_on_page(browser: Any) -> list[str]:
    return list(browser.evaluate("Array.from(document.querySelectorAll('#plans tbody tr')).map(r => r.dataset.status)"))


@pytest.mark.browser
@pytest.mark.parametrize("width", [1400, 1000])
def test_plans_table_pages_without_wrapping(page_clinic: PageClinic, tmp_path: Path, width: int) -> None:
    """The plans table pages (no inner scroll box), Missing and Incomplete plans first and filterable; UIDs
    and dates stay on one line and the page is no wider than the window; the chart picks years for ten
    years and says QA plans are left out; a Completed harvest offers no pause/resume/cancel; a not-found
    job says so instead of "1/3 attempts"; an Invalid plan says why."""
    from .browser.cdp import Browser
    from .browser.layout import PAGE_OVERFLOW, PLANS_BOX_SCROLLS, wrapped_values

    api, hid, plans = page_clinic.api, page_clinic.harvest_id, page_clinic.manifest["Plans"]
    expected = sorted((p["Status"] for p in plans), key=STATUS_ORDER.index)
    with Browser(tmp_path / "profile", width, 1000) as browser:
        browser.set_viewport(width, 1000)
        browser.navigate(f"{api.url}/rtharvest/ui#harvest={hid}")
        browser.wait_for(f"document.querySelectorAll('#plans tbody tr').length === {PLAN_PAGE}")
        browser.wait_for("document.querySelectorAll('#failed-jobs tbody tr').length > 0")

        # Pages, in status order, every plan once; Previous goes back.
        seen = _statuses_on_page(browser)
        assert browser.evaluate("document.getElementById('plans-pager').hidden") is False
        assert browser.evaluate("document.getElementById('plans-prev').disabled") is True
        while not browser.evaluate("document.getElementById('plans-next').disabled"):
            before = browser.evaluate("document.getElementById('plans-page').textContent")
            browser.evaluate("document.getElementById('plans-next').click()")
            browser.wait_for(f"document.getElementById('plans-page').textContent !== {json.dumps(before)}")
            seen += _statuses_on_page(browser)
        assert seen == expected
        assert browser.evaluate("document.getElementById('plans-page').textContent") == \
            f"plans {2 * PLAN_PAGE + 1}–{len(plans)} of {len(plans)} · page 3 of 3"
        browser.evaluate("document.getElementById('plans-prev').click()")
        assert browser.evaluate("document.getElementById('plans-page').textContent").endswith("page 2 of 3")

        # Filterable: Missing plans alone, the page counter back to the first page.
        browser.evaluate("(() => { const s = document.getElementById('f-status'); s.value = 'Missing';"
                         " s.dispatchEvent(new Event('change')); })()")
        missing = [p for p in plans if p["Status"] == "Missing"]
        assert _statuses_on_page(browser) == ["Missing"] * len(missing) and missing
        assert browser.evaluate("document.getElementById('plans-pager').hidden") is True
        browser.evaluate("(() => { const s = document.getElementById('f-status'); s.value = '';"
                         " s.dispatchEvent(new Event('change')); })()")
        assert _statuses_on_page(browser) == expected[:PLAN_PAGE]

        # An Invalid plan says why (the manifest's InvalidReason) on the page where it is listed.
        browser.evaluate("(() => { const s = document.getElementById('f-status'); s.value = 'Invalid';"
                         " s.dispatchEvent(new Event('change')); })()")
        reasons = browser.evaluate("Array.from(document.querySelectorAll('#plans tbody tr .invalid-reason'))"
                                   ".map(d => d.textContent)")
        assert reasons == [p["InvalidReason"] for p in plans if p["Status"] == "Invalid"] and reasons
        browser.evaluate("(() => { const s = document.getElementById('f-status'); s.value = '';"
                         " s.dispatchEvent(new Event('change')); })()")

        # Values on one line, the layout within the window, no scroll box around the table.
        assert browser.evaluate(wrapped_values("#plans .uid, #plans td.date, #plans td.uid-text, #harvests .uid,"
                                               " #failed-jobs .uid, #failed-jobs td.not-found")) == []
        assert browser.evaluate(PAGE_OVERFLOW) <= 0
        assert browser.evaluate(PLANS_BOX_SCROLLS) <= 0

        # The chart: years for a span of ten years, and what it counts.
        assert browser.evaluate("document.getElementById('chart-time').dataset.bin") == "Yearly"
        note = browser.evaluate("document.getElementById('chart-time-note').textContent")
        invalid = sum(1 for p in plans if p["Status"] == "Invalid")
        assert "years for this span" in note and f"QA plans left out: {invalid} plan(s)" in note
        browser.evaluate("(() => { const s = document.getElementById('period'); s.value = 'Quarterly';"
                         " s.dispatchEvent(new Event('change')); })()")
        labels = browser.evaluate("Array.from(new Set(Array.from(document.querySelectorAll("
                                  "'#chart-time svg rect[data-label]')).map(r => r.dataset.label)))")
        assert labels[0].startswith(page_clinic.manifest["Charts"]["Monthly"][0]["Period"][:4] + "-Q")
        drawn = browser.evaluate("Array.from(document.querySelectorAll('#chart-time svg rect[data-series=\"Plans\"]'))"
                                 ".reduce((a, r) => a + Number(r.dataset.value), 0)")
        assert drawn == sum(c["Plans"] for c in page_clinic.manifest["Charts"]["Monthly"])

        # Controls only where they apply; a not-found job says so.
        row = f"document.querySelector('#harvests tr[data-id=\"{hid}\"]')"
        assert browser.evaluate(f"Array.from({row}.querySelectorAll('button')).filter(b => !b.hidden)"
                                ".map(b => b.dataset.action)") == ["view"]
        cells = browser.evaluate("Array.from(document.querySelectorAll('#failed-jobs tbody tr'))"
                                 ".map(r => r.children[5].textContent)")
        assert cells and set(cells) == {"not found"}
        _screenshot(browser, tmp_path, f"ui-table-{width}.png")
        assert [c for c in browser.console if c.startswith(("error", "exception"))] == []


@pytest.mark.browser
def test_export_form_starts_an_export_of_the_selected_harvest(page_clinic: PageClinic, tmp_path: Path) -> None:
    """"New export…" with the Harvest field left empty exports the selected harvest (the placeholder's
    promise; the field was `required`, so the browser refused the form); the export runs to its folder
    and the page shows it Completed and verified. With nothing selected, the form says what is missing."""
    from rtharvest.export.routes import register
    from rtharvest.export.service import ExportService
    from rtharvest.export.settings import ExportSettings
    from rtharvest.store.jobqueue import RetryPolicy
    from rtharvest.store.tracking import Decision
    from rtharvest.synth.generator import SynthOptions, generate

    from .browser.apiserver import load_harvest
    from .browser.cdp import Browser

    # A harvest of its own: a small clinic of RT patients (no metadata-light history patients).
    api = page_clinic.api
    truth = generate(tmp_path / "clinic", SynthOptions(patients=3, seed=5, ct_slices=2, matrix=8))
    hid = load_harvest(api, tmp_path / "clinic", truth, label="to export")
    settings = ExportSettings(site="SITEA", database_path=tmp_path / "exports.sqlite", calling_aet="HARVEST",
                              modalities={}, folders={"RESEARCH": tmp_path / "research"})
    service = ExportService(settings, api.events, api.manifest.build,
                            lambda h: api.tracker.objects(h, Decision.KEPT),
                            lambda h: api.harvests.visible_state(api.harvests.get(h)),
                            policy=RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0))
    service.read_file = api.read_file
    register(api.router, service)
    with Browser(tmp_path / "profile", 1000, 1000) as browser:
        browser.set_viewport(1000, 1000)
        # Nothing selected (the whole store): an empty Harvest field is named, nothing is sent.
        browser.navigate(f"{api.url}/rtharvest/ui#store")
        browser.wait_for("document.getElementById('detail-title').textContent === 'Whole store'")
        browser.evaluate("document.getElementById('new-export-toggle').click()")
        browser.wait_for("document.getElementById('ne-destination').options.length === 1")
        assert browser.evaluate("document.getElementById('ne-harvest').required") is False
        browser.evaluate("document.querySelector('#new-export button[type=submit]').click()")
        assert "Choose a harvest" in browser.wait_for("!document.getElementById('ne-error').hidden &&"
                                                      " document.getElementById('ne-error').textContent")
        assert service.list_exports(10) == []

        # The harvest selected (its View button): the same empty field exports it.
        browser.evaluate("document.getElementById('new-export-toggle').click()")
        browser.evaluate(f"document.querySelector('#harvests tr[data-id=\"{hid}\"] button[data-action=\"view\"]')"
                         ".click()")
        browser.wait_for(f"window.rtharvestPage.state.selected === {json.dumps(hid)}")
        browser.evaluate("document.getElementById('new-export-toggle').click()")
        browser.wait_for("document.getElementById('ne-destination').value === 'RESEARCH'")
        assert hid in browser.evaluate("document.getElementById('ne-harvest').placeholder")
        browser.evaluate("document.querySelector('#new-export button[type=submit]').click()")
        browser.wait_for("document.getElementById('new-export').hidden")
        (export,) = service.list_exports(10)
        assert export["Harvest"] == hid and export["Destination"] == "RESEARCH"
        for _ in range(200):
            if not service.run_one():
                break
        done = service.document(export["ID"])
        assert done["State"] == "Completed", json.dumps(done["Verification"])[:3000]
        browser.wait_for("(() => { const r = document.querySelector('#exports tbody tr');"
                         " return r && r.children[1].textContent === 'Completed'; })()", timeout=30)
        cells = browser.evaluate("Array.from(document.querySelector('#exports tbody tr').children)"
                                 ".map(td => td.textContent)")
        assert cells[0] == export["ID"] and cells[2] == hid and cells[8].startswith("passed")
        assert any((tmp_path / "research").rglob("*.dcm"))
        _screenshot(browser, tmp_path, "ui-export-1000.png")
        assert [c for c in browser.console if c.startswith(("error", "exception"))] == []

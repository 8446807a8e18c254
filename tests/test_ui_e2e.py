"""Issue 7 against the real servers: manifest over REST, the ``rtharvest`` CLI and the Explorer page.

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

from rtharvest.launcher import free_port
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
                "InvalidPlans", "ImageSeries", "PlanningSeries", "Registrations", "TreatmentRecords")


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
                          ("RegisteredSeriesUIDs", t.registered_series_uids), ("RecordUIDs", t.record_uids)):
        assert sorted(row[key]) == sorted(expected), (*where, key)
    assert row["RegistrationTypes"] == t.registration_types, where
    assert (row["Treatments"], row["FirstTreatment"], row["LastTreatment"]) == \
        (t.treatments, t.first_treatment, t.last_treatment), where
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
    assert "Completed" in line and SOURCE in line and f"{window.summary.plans_collected}/{plans}" in line, line

    code, out, err = cli("harvest", "status", hid)
    assert code == 0, err
    assert f"Harvest {hid}" in out and f"window   {window.date_from}-{window.date_to}" in out, out
    assert "Completed: " in out, out
    assert f"{window.summary.patients} patient(s), plans {window.summary.plans_collected}/{plans} collected" in out
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
    code, out, _ = cli("manifest", hid)
    assert code == 0 and json.loads(out)["Summary"]["PlansReferenced"] == plans

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
    assert code == 0, err
    assert out.splitlines()[-1].startswith("Completed:"), out
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

        # The harvest is listed, Completed; the page offers no pause/resume for a finished harvest.
        assert browser.evaluate(f"{row}.querySelector('.chip').textContent") == "Completed"
        assert browser.evaluate(f"{row}.classList.contains('selected')") is True
        assert browser.evaluate(f"['pause', 'resume', 'cancel'].map(a => {row}.querySelector("
                                "'button[data-action=\"' + a + '\"]').disabled)") == [True, True, True]
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
                                "[r.children[0].textContent, r.dataset.status, r.children[12].textContent])")
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
        period = browser.evaluate("document.getElementById('period').value")
        cut = 4 if period == "Yearly" else 7
        firsts = {t.plan_uid: (t.patient_id, t.first_treatment) for t in window.plans
                  if t.status != "Invalid" and t.first_treatment}

        def when(date: str) -> str:
            return f"{date[:4]}-{date[4:6]}"[:cut]

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
        browser.wait_for(f"!{held_row}.querySelector('button[data-action=\"pause\"]').disabled")
        click("pause")
        _wait(lambda: api.get(f"/rtharvest/harvests/{held_id}")["State"] == "Paused", what="Paused over REST")
        chip_is("Paused")
        assert browser.evaluate(f"{held_row}.querySelector('button[data-action=\"resume\"]').disabled") is False
        assert browser.evaluate(f"{held_row}.querySelector('button[data-action=\"pause\"]').disabled") is True
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

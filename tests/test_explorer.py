"""The harvests page and the Orthanc Explorer extension: served, self-contained, and working in Chromium.

Served by the page routes of ``rtharvest.web.pages`` on the test API server (real routes, real queue
and tracker, a perfect harvest of the synthetic clinic as canned data). With ``/usr/bin/chromium``
present, the page is opened headless, its harvest list, manifest table, charts, failed jobs and log are
checked in the DOM, pause/resume are clicked, and screenshots are saved under the test's tmp dir
(look at them: ``page-*.png``). The extension is checked in a real Orthanc Explorer when Debian's Orthanc
and its Python plugin are installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtharvest.core.operations import Hop
from rtharvest.edge.launcher import free_port
from rtharvest.store.eventlog import Level
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.web import pages as explorer_routes

from .browser.apiserver import ApiServer, load_harvest

EXPLORER_DIR = Path(explorer_routes.__file__).resolve().parent / "explorer"
REPO = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
#: Colours the page draws with (charts.js / harvests.js).
PATIENTS_RGB, PLANS_RGB, COMPLETE_RGB = (0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B), (0x3B, 0x8A, 0x3E)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path).start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------------
# Served and self-contained


def test_page_and_assets_are_served(api: ApiServer) -> None:
    status, ctype, body = get(api.url + "/rtharvest/ui")
    assert status == 200 and ctype.startswith("text/html")
    html = body.decode()
    assert '<script src="ui/harvests.js"' in html and '<link rel="stylesheet" href="ui/harvests.css">' in html
    for name, content_type in explorer_routes.ASSETS.items():
        status, ctype, body = get(f"{api.url}/rtharvest/ui/{name}")
        assert status == 200 and ctype == content_type, name
        assert body.decode() == (EXPLORER_DIR / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["explorer-extension.js", "harvests.html", "secret.py", "..", "..%2Fmanifest.py",
                                  "x" * 65])
def test_other_files_are_not_served(api: ApiServer, name: str) -> None:
    status, ctype, body = get(f"{api.url}/rtharvest/ui/{name}")
    assert status == 404 and ctype.startswith("application/json")
    assert "Error" in json.loads(body)


def test_assets_are_self_contained() -> None:
    """No URL leaves the origin: hospital networks have no internet (and must not leak anything)."""
    names = [explorer_routes.PAGE, explorer_routes.EXTENSION, *explorer_routes.ASSETS]
    assert sorted(p.name for p in EXPLORER_DIR.iterdir()) == sorted(names)
    for name in names:
        text = (EXPLORER_DIR / name).read_text(encoding="utf-8")
        # The SVG namespace is an identifier, never fetched.
        absolute = [u for u in re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s'\"]*", text)
                    if u != "http://www.w3.org/2000/svg"]
        assert absolute == [], (name, absolute)
        assert "@import" not in text and "url(" not in text, name
        for attr in re.findall(r'\b(?:src|href|action)="([^"]*)"', text):
            assert not attr.startswith(("/", "http:", "https:", "//")), (name, attr)
    html = (EXPLORER_DIR / explorer_routes.PAGE).read_text(encoding="utf-8")
    assert "Content-Security-Policy" in html and "default-src 'self'" in html
    assert "<script>" not in html  # no inline script: the policy allows 'self' only
    for name in ("harvests.js", "charts.js"):
        script = (EXPLORER_DIR / name).read_text(encoding="utf-8")
        assert "innerHTML" not in script and "eval(" not in script, name  # data only through textContent


def test_package_data_ships_the_assets() -> None:
    assert '"explorer/*"' in (REPO / "pyproject.toml").read_text()
    assert explorer_routes.asset_text("harvests.html").startswith("<!DOCTYPE html>")


def test_extension_script() -> None:
    js = explorer_routes.explorer_extension()
    assert js.lstrip().startswith("/*") and "(function () {" in js and js.rstrip().endswith("})();")
    for name in ("HarvestId", "HarvestSource", "HarvestJob", "HarvestHop", "HarvestedAt"):
        assert name in js
    assert "'../rtharvest/ui'" in js and "/metadata?expand" in js and "#study" in js and "#lookup" in js


def test_register_adds_the_two_routes() -> None:
    from rtharvest.web.httpapi import HttpRequest, Router

    router = Router()
    explorer_routes.register(router)
    assert router.patterns == [explorer_routes.UI_ROUTE, explorer_routes.ASSET_ROUTE]
    response = router.handle(HttpRequest("GET", "/rtharvest/ui/charts.js"))
    assert response.status == 200 and b"RtCharts" in response.body
    assert router.handle(HttpRequest("POST", "/rtharvest/ui")).status == 405


# ---------------------------------------------------------------------------------------------------
# In a browser


@pytest.fixture()
def canned(api: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A completed harvest of the whole clinic, one of its 'year' window, and a running one."""
    root = tmp_path_factory.mktemp("page-clinic")
    truth = generate(root, SynthOptions())
    ids = {
        "all": load_harvest(api, root, truth, "all", label="all treatments 2012-2022"),
        "year": load_harvest(api, root, truth, "year"),
    }
    running = api.harvests.start({"Source": "ARIA", "LookupSources": ["ARIA", "MIM"], "From": "20230101",
                                  "To": "20231231", "Label": "2023 cohort"})
    ids["running"] = running.id
    api.events.write(Level.WARNING, "harvester", "RetrieveSeries failed (attempt 2): 3 of 8 instance(s) did not "
                     "arrive from MIM", harvest_id=running.id, job_id=12)
    api.events.write(Level.ERROR, "harvester", "RetrieveInstance failed for good: not found at ARIA",
                     harvest_id=ids["all"], job_id=1)
    ids["plans"] = str(len(truth.window("all").plans))
    summary = truth.window("all").summary
    ids.update(patients=str(summary.patients), referenced=str(summary.plans_referenced),
               success=f"{summary.success_rate * 100:.1f} %", fractions=str(summary.fractions),
               records=str(summary.treatment_records))
    return ids


@pytest.mark.browser
def test_page_in_chromium(api: ApiServer, canned: dict[str, str], tmp_path: Path) -> None:
    from .browser.cdp import Browser
    from .browser.png import decode

    with Browser(tmp_path / "profile") as browser:
        browser.navigate(f"{api.url}/rtharvest/ui#harvest={canned['all']}")
        browser.wait_for(f"document.querySelectorAll('#plans tbody tr').length === {canned['plans']}")
        # The harvest list with live progress.
        rows = browser.evaluate("Array.from(document.querySelectorAll('#harvests tbody tr')).map(r => r.dataset.id)")
        assert rows == [canned["running"], canned["year"], canned["all"]]
        states = browser.evaluate("Array.from(document.querySelectorAll('#harvests tbody tr .chip'))"
                                  ".map(c => c.textContent)")
        assert states == ["Running", "Completed", "Completed"]
        # The manifest: summary cards, table, filters, charts.
        cards = browser.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('#summary .card'))"
                                 ".map(c => [c.querySelector('.label').textContent, c.querySelector('.value')"
                                 ".textContent]))")
        assert (cards["Patients"], cards["Plans referenced"], cards["Success rate"]) == (
            canned["patients"], canned["referenced"], canned["success"])
        # Fractions and delivery records apart (the HDR course's summary record is neither).
        assert (cards["Fractions delivered"], cards["Treatment records"]) == (canned["fractions"], canned["records"])
        statuses = browser.evaluate("Array.from(document.querySelectorAll('#plans tbody tr'))"
                                    ".map(r => r.dataset.status)")
        assert sorted(set(statuses)) == ["Complete", "Incomplete", "Invalid", "Missing"]
        bars = browser.evaluate("document.querySelectorAll('#chart-time svg rect[data-series]').length")
        assert bars > 0
        assert browser.evaluate("document.querySelectorAll('#chart-intent svg rect[data-value]').length") == 4
        browser.evaluate("(() => { const s = document.getElementById('f-status'); s.value = 'Incomplete';"
                         " s.dispatchEvent(new Event('change')); })()")
        assert browser.evaluate("document.querySelectorAll('#plans tbody tr').length") == 1
        assert "RTSTRUCT" in browser.evaluate("document.querySelector('#plans tbody tr .missing-item').textContent")
        browser.evaluate("(() => { const s = document.getElementById('f-status'); s.value = '';"
                         " s.dispatchEvent(new Event('change')); })()")
        # Failed jobs with retry buttons, recent errors.
        browser.wait_for("document.querySelectorAll('#failed-jobs tbody tr').length === 2")
        assert browser.evaluate("document.querySelectorAll('#failed-jobs button[data-job]').length") == 2
        log = browser.evaluate("Array.from(document.querySelectorAll('#log tbody tr td:last-child'))"
                               ".map(td => td.textContent)")
        assert any("not found at ARIA" in m for m in log) and any("did not arrive" in m for m in log)
        # Pixels: the time chart shows patient and plan bars; complete plans are green.
        shot = browser.screenshot(tmp_path / "page-manifest.png")
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000
        clip = browser.evaluate("(() => { const r = document.getElementById('chart-time').getBoundingClientRect();"
                                " return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; })()")
        data = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={**clip, "scale": 1})["data"]
        import base64

        chart_png = base64.b64decode(data)
        (tmp_path / "page-chart.png").write_bytes(chart_png)
        chart = decode(chart_png)
        assert chart.count(PATIENTS_RGB) > 200 and chart.count(PLANS_RGB) > 200
        assert chart.distinct_colors() > 5

        # Pause and resume the running harvest from the page.
        click = ("document.querySelector('#harvests tr[data-id=\"{id}\"] button[data-action=\"{a}\"]').click()")
        browser.evaluate(click.format(id=canned["running"], a="pause"))
        _wait(lambda: api.queue.get_harvest(canned["running"]).state.value == "Paused")
        browser.wait_for(f"document.querySelector('#harvests tr[data-id=\"{canned['running']}\"] .chip')"
                         ".textContent === 'Paused'")
        assert browser.evaluate(f"document.querySelector('#harvests tr[data-id=\"{canned['running']}\"] "
                                "button[data-action=\"resume\"]').disabled") is False
        browser.screenshot(tmp_path / "page-paused.png", full_page=False)
        browser.evaluate(click.format(id=canned["running"], a="resume"))
        _wait(lambda: api.queue.get_harvest(canned["running"]).state.value == "Running")
        browser.wait_for(f"document.querySelector('#harvests tr[data-id=\"{canned['running']}\"] .chip')"
                         ".textContent === 'Running'")
        # Retry a failed job from the page.
        job_id = browser.evaluate("document.querySelector('#failed-jobs button[data-job]').dataset.job")
        browser.evaluate("document.querySelector('#failed-jobs button[data-job]').click()")
        _wait(lambda: api.queue.get_job(int(job_id)).state.value == "pending")
        browser.wait_for("document.querySelectorAll('#failed-jobs tbody tr').length === 1")
        # The whole store.
        browser.evaluate("document.getElementById('show-store').click()")
        browser.wait_for("document.getElementById('detail-title').textContent === 'Whole store'")
        browser.wait_for(f"document.querySelectorAll('#plans tbody tr').length === {canned['plans']}")
        errors = [c for c in browser.console if c.startswith(("error", "exception"))]
        assert errors == []


def _wait(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.mark.browser
def test_extension_in_orthanc_explorer(tmp_path: Path) -> None:
    """A plain Orthanc with only the extension: the home-page button and a study's provenance."""
    from .browser.cdp import Browser
    from .servers import stop_pid

    root = tmp_path / "clinic"
    truth = generate(root, SynthOptions(patients=1, seed=3, ct_slices=2, include_traps=False))
    script = tmp_path / "ext.py"
    extension = str(EXPLORER_DIR / explorer_routes.EXTENSION)
    script.write_text(f"import orthanc\northanc.ExtendOrthancExplorer(open({extension!r}).read())\n")
    http = free_port()
    config = {"Name": "ext-test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
              "HttpPort": http, "DicomPort": free_port(), "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [str(PYTHON_PLUGIN)], "PythonScript": str(script),
              "UserMetadata": {"HarvestId": 1024, "HarvestSource": 1025, "HarvestJob": 1026, "HarvestHop": 1027,
                               "HarvestedAt": 1028}}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("wb")
    # Its own session: stop_pid signals the process group.
    process = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{http}"
    try:
        _wait(lambda: _up(base), timeout=30)
        planning = next(i for i in truth.objects.values() if i.role == "planning_image")
        study_uid = planning.study_uid
        for info in truth.objects.values():
            if info.study_uid == study_uid:
                urllib.request.urlopen(urllib.request.Request(base + "/instances", data=(root / info.path)
                                                              .read_bytes(), method="POST"), timeout=10).read()
        study = json.loads(urllib.request.urlopen(f"{base}/studies", timeout=10).read())[0]
        series = json.loads(urllib.request.urlopen(f"{base}/studies/{study}/series", timeout=10).read())
        # Provenance where it is uniform: the first series carries it, the second (if any) only on its instances.
        values = (("HarvestId", "feedc0ffee123456"), ("HarvestSource", "ARIA"), ("HarvestJob", "42"),
                  ("HarvestHop", Hop.STRUCTURE_SET_SERIES.value), ("HarvestedAt", "2024-05-01T12:00:00Z"))
        per_instance = (("HarvestId", "0ddba11cafe00001"), ("HarvestSource", "MIM"), ("HarvestJob", "7"),
                        ("HarvestHop", Hop.REG_SERIES.value), ("HarvestedAt", "2024-05-02T08:00:00Z"))
        stamped = [(f"series/{series[0]['ID']}", values)]
        stamped += [(f"instances/{i}", per_instance) for s in series[1:2] for i in s["Instances"]]
        for resource, pairs in stamped:
            for name, value in pairs:
                urllib.request.urlopen(urllib.request.Request(f"{base}/{resource}/metadata/{name}",
                                                              data=value.encode(), method="PUT"), timeout=10).read()
        with Browser(tmp_path / "profile", 1300, 1100) as browser:
            browser.navigate(f"{base}/app/explorer.html")
            href = browser.wait_for("document.getElementById('rtharvest-link') &&"
                                    " document.getElementById('rtharvest-link').getAttribute('href')")
            assert href == "../rtharvest/ui"
            browser.screenshot(tmp_path / "explorer-home.png", full_page=False)
            browser.navigate(f"{base}/app/explorer.html#study?uuid={study}")
            browser.wait_for("document.querySelectorAll('#rtharvest-provenance li.rtharvest-item').length === "
                             f"{len(series)}")
            text = browser.evaluate("document.getElementById('rtharvest-provenance').textContent")
            assert "feedc0ffee123456" in text and "RTSTRUCT->SERIES" in text and "2024-05-01T12:00:00Z" in text
            assert ("0ddba11cafe00001" in text and "REG->SERIES" in text) == (len(series) > 1)
            assert ("first instance shown" in text) == (len(series) > 1)
            assert ("not harvested by rtharvest" in text) == (len(series) > 2)
            link = browser.evaluate("document.querySelector('#rtharvest-provenance a').getAttribute('href')")
            assert link == "../rtharvest/ui#harvest=feedc0ffee123456"
            # Let jQuery Mobile finish its page transition before the picture.
            browser.wait_for("jQuery.mobile.activePage.attr('id') === 'study' &&"
                             " !document.querySelector('.ui-mobile-viewport-transitioning')")
            time.sleep(0.5)
            browser.screenshot(tmp_path / "explorer-study.png", full_page=False)
            assert [c for c in browser.console if c.startswith("exception")] == []
    finally:
        stop_pid(process)
        log.close()


def _up(base: str) -> bool:
    try:
        urllib.request.urlopen(base + "/system", timeout=2).read()
        return True
    except OSError:
        return False


@pytest.mark.browser
def test_schedules_on_the_page(api: ApiServer, tmp_path: Path) -> None:
    """The page lists schedules with their last run, creates one from its form and deletes it."""
    from .browser.cdp import Browser

    api.schedules.create({"Name": "nightly", "Source": "ARIA", "LookupSources": ["ARIA", "MIM"], "At": "01:00",
                          "TimeZone": "Europe/Zurich", "OverlapDays": 3})
    with Browser(tmp_path / "profile") as browser:
        browser.navigate(f"{api.url}/rtharvest/ui")
        browser.wait_for("document.querySelectorAll('#schedules tbody tr').length === 1")
        cells = browser.evaluate("Array.from(document.querySelectorAll('#schedules tbody tr td'))"
                                 ".map(td => td.textContent)")
        assert cells[:5] == ["nightly", "ARIA, MIM", "01:00 Europe/Zurich", "3 d", "—"] and cells[6] == "never"
        fill = ("(() => {{ const e = document.getElementById('{id}'); e.value = {value!r}; }})()")
        browser.evaluate("document.getElementById('new-schedule-toggle').click()")
        for element, value in (("ns-name", "evening"), ("ns-at", "22:30"), ("ns-tz", "America/New_York"),
                               ("ns-overlap", "2"), ("ns-from", "2024-01-01")):
            browser.evaluate(fill.format(id=element, value=value))
        browser.evaluate("document.querySelector('#new-schedule button[type=submit]').click()")
        browser.wait_for("document.querySelectorAll('#schedules tbody tr').length === 2")
        created = api.schedules.get("evening")
        assert (created.time_zone, created.overlap_days, str(created.first_from)) == ("America/New_York", 2,
                                                                                      "2024-01-01")
        browser.evaluate("document.querySelector('#schedules button[data-schedule=\"evening\"]').click()")
        browser.wait_for("document.querySelectorAll('#schedules tbody tr').length === 1")
        assert [s.id for s in api.schedules.all()] == ["nightly"]
        browser.screenshot(tmp_path / "page-schedules.png", full_page=False)
        errors = [c for c in browser.console if c.startswith(("error", "exception"))]
        assert errors == []

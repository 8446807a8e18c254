"""The ``rtharvest`` command against the plugin's real routes (router, queue, tracker on a temp database).

The server is :mod:`tests.browser.apiserver`: the same ``build_routes`` Orthanc serves, over plain HTTP on
loopback. Usage errors exit 2, refusals 1 with the server's ``Error`` text, an unreachable server 3.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtharvest.cli import commands as cli
from rtharvest.store.eventlog import Level, NewEvent
from rtharvest.synth.generator import SynthOptions, generate

from .browser.apiserver import ApiServer, fail_job, load_harvest


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture()
def secured(tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path, auth=("alice", "s3cret")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("cli-clinic")
    return root, generate(root, SynthOptions(patients=3, seed=5))


class Tty(io.StringIO):
    """A terminal, as far as ``isatty`` is concerned."""

    def isatty(self) -> bool:
        return True


def run(url: str | None, *argv: str, env: dict[str, str] | None = None,
        out: io.StringIO | None = None, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    buffer = out if out is not None else io.StringIO()
    args = (["--url", url] if url else []) + list(argv)
    code = cli.main(args, out=buffer, env=env or {})
    err = capsys.readouterr().err if capsys is not None else ""
    return code, buffer.getvalue(), err


def start(api: ApiServer, *extra: str, to: str = "2020-12-31") -> str:
    code, out, _ = run(api.url, "harvest", "start", "--source", "ARIA", "--from", "20200101", "--to", to, *extra)
    assert code == 0, out
    return out.strip()


# ---------------------------------------------------------------------------------------------------


def test_start_status_list(api: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    hid = start(api, "--label", "lung 2020", "--lookup", "ARIA,MIM", "--patient", "P1", "--patient", "P2")
    harvest = api.queue.get_harvest(hid)
    assert harvest.label == "lung 2020"
    assert harvest.params["LookupSources"] == ["ARIA", "MIM"]
    assert harvest.params["Window"] == {"From": "20200101", "To": "20201231", "PatientIDs": ["P1", "P2"]}
    code, out, _ = run(api.url, "harvest", "status", hid)
    assert code == 0
    assert f"Harvest {hid}  lung 2020" in out and "Running:" in out and "20200101-20201231, 2 patient(s)" in out
    code, out, _ = run(api.url, "--json", "harvest", "status", hid)
    assert code == 0 and json.loads(out)["ID"] == hid
    code, out, _ = run(api.url, "harvest", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["ID", "STATE", "SOURCE"] and lines[1].startswith(hid)
    code, out, _ = run(api.url, "--json", "harvest", "list")
    assert [d["ID"] for d in json.loads(out)] == [hid]


def test_patients_file(api: ApiServer, tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("# cohort\nA1\n\nB2\n")
    code, out, _ = run(api.url, "harvest", "start", "--source", "ARIA", "--patients-file", str(ids))
    assert code == 0
    assert api.queue.get_harvest(out.strip()).params["Window"]["PatientIDs"] == ["A1", "B2"]


def test_control(api: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    hid = start(api)
    assert run(api.url, "harvest", "pause", hid)[:2] == (0, f"{hid}: Paused\n")
    assert run(api.url, "harvest", "resume", hid)[:2] == (0, f"{hid}: Running\n")
    assert run(api.url, "harvest", "cancel", hid)[:2] == (0, f"{hid}: Cancelled\n")
    code, out, err = run(api.url, "harvest", "resume", hid, capsys=capsys)
    assert code == 1 and out == ""
    assert err.startswith("rtharvest: server refused POST /rtharvest/harvests/") and "(409)" in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("harvest", "start", "--source", "NOPE", "--from", "20200101"), "unknown source 'NOPE'; configured sources: "
                                                                         "ARIA, MIM"),
        (("harvest", "start", "--source", "ARIA", "--from", "20201301"), "not a calendar date"),
        (("harvest", "start", "--source", "ARIA", "--from", "20200201", "--to", "20200101"), "is after"),
        (("harvest", "status", "0123456789abcdef"), "unknown harvest '0123456789abcdef'"),
        (("harvest", "pause", "0123456789abcdef"), "(404)"),
        (("jobs", "--state", "exploded"), "state must be one of"),
        (("jobs", "--retry", "999"), "unknown job 999"),
        (("log", "--level", "loud"), "level must be one of"),
        (("log", "--since", "yesterday-ish"), "since:"),
        (("manifest", "0123456789abcdef"), "unknown harvest"),
    ],
)
def test_server_refusals_exit_1_with_the_error_text(api: ApiServer, capsys: pytest.CaptureFixture[str],
                                                    argv: tuple[str, ...], fragment: str) -> None:
    code, out, err = run(api.url, *argv, capsys=capsys)
    assert code == 1, (out, err)
    assert fragment in err and err.startswith("rtharvest: ")


@pytest.mark.parametrize(
    "argv",
    [
        (),
        ("harvest",),
        ("harvest", "launch"),
        ("harvest", "status"),
        ("harvest", "start", "--from", "20200101"),  # --source missing
        ("harvest", "start", "--source", "ARIA", "--from", "2020"),
        ("harvest", "start", "--source", "ARIA"),  # neither dates nor patients
        ("harvest", "wait", "x", "--timeout", "-1"),
        ("manifest",),
        ("manifest", "abc", "--all"),
        ("jobs", "--limit", "many"),
        ("--url", "ftp://server", "harvest", "list"),
        ("--password", "pw", "harvest", "list"),  # a password without a user
    ],
)
def test_usage_errors_exit_2(api: ApiServer, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    before = len(api.requests)
    code, _, err = run(None, *argv, env={"RTHARVEST_URL": api.url}, capsys=capsys)
    assert code == 2, err
    assert "rtharvest" in err
    assert len(api.requests) == before  # nothing was sent


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(None, "--help")[0] == 0
    assert "harvest" in capsys.readouterr().out


def test_unreachable_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        code, _, err = run(f"http://127.0.0.1:{port}", "harvest", "list", capsys=capsys)
    assert code == 3
    assert f"cannot reach http://127.0.0.1:{port}" in err and "RTHARVEST_URL" in err


def test_not_the_plugin(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    server = ApiServer(tmp_path).start()
    try:
        code, _, err = run(server.url + "/elsewhere", "harvest", "list", capsys=capsys)
    finally:
        server.stop()
    assert code == 1 and "(404)" in err


def test_credentials_from_flags_and_environment(secured: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(secured.url, "harvest", "list", capsys=capsys)
    assert code == 1 and "authentication failed (401)" in err and "RTHARVEST_USER" in err
    code, _, err = run(secured.url, "--user", "alice", "--password", "wrong", "harvest", "list", capsys=capsys)
    assert code == 1 and "401" in err
    assert run(secured.url, "--user", "alice", "--password", "s3cret", "harvest", "list")[0] == 0
    env = {"RTHARVEST_URL": secured.url, "RTHARVEST_USER": "alice", "RTHARVEST_PASSWORD": "s3cret"}
    code, out, _ = run(None, "harvest", "start", "--source", "ARIA", "--patient", "P9", env=env)
    assert code == 0 and len(out.strip()) == 16
    # Flags win over the environment.
    code, _, err = run(None, "--password", "wrong", "harvest", "list", env=env, capsys=capsys)
    assert code == 1 and "401" in err


def test_jobs_list_and_retry(api: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    hid = start(api)
    job_id = fail_job(api.queue, hid, "C-FIND refused by ARIA", dimse_status=0xA700)
    code, out, _ = run(api.url, "jobs", "--harvest", hid, "--state", "failed")
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["ID", "HARVEST", "KIND", "STATE"]
    assert row.split()[:4] == [str(job_id), hid, "FindTreatmentRecords", "failed"]
    assert "0xA700" in row and "C-FIND refused by ARIA" in row
    code, out, _ = run(api.url, "jobs", "--retry", str(job_id))
    assert code == 0 and out.startswith(f"job {job_id}: pending")
    code, _, err = run(api.url, "jobs", "--retry", str(job_id), capsys=capsys)
    assert code == 1 and "only failed jobs can be retried" in err
    code, out, _ = run(api.url, "--json", "jobs", "--harvest", hid)
    assert code == 0 and json.loads(out)[0]["State"] == "pending"
    assert run(api.url, "jobs", "--state", "failed")[1] == "no jobs match\n"


def test_log(api: ApiServer) -> None:
    hid = start(api)
    api.events.write(Level.ERROR, "harvester", "RetrieveSeries failed for good: gave up", harvest_id=hid, job_id=7)
    code, out, _ = run(api.url, "log", "--level", "warning")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 and "ERROR" in lines[0] and "gave up" in lines[0]
    assert f"harvest={hid}" in lines[0] and "job=7" in lines[0]
    code, out, _ = run(api.url, "log", "--harvest", hid, "--since", "1h", "--limit", "10")
    assert code == 0 and "harvest started" in out
    assert cli.since_value("2h", now=lambda: 10_000.0) == "2800"
    assert cli.since_value("2024-05-01T00:00:00Z") == "2024-05-01T00:00:00Z"


def test_manifest_json_and_csv(api: ApiServer, clinic: tuple[Path, object], tmp_path: Path) -> None:
    root, truth = clinic
    hid = load_harvest(api, root, truth)
    window = truth.window("all")  # type: ignore[attr-defined]
    code, out, _ = run(api.url, "manifest", hid, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["Harvest"] == hid
    for key, value in window.summary.to_dict().items():
        assert doc["Summary"][key] == value, key
    assert [p["Status"] for p in doc["Plans"]] == [p.status for p in window.plans]
    target = tmp_path / "m.csv"
    code, out, _ = run(api.url, "manifest", hid, "--csv", "-o", str(target))
    assert code == 0 and out == ""
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert [r["PlanUID"] for r in rows] == [p.plan_uid for p in window.plans]
    code, out, _ = run(api.url, "manifest", "--all", "--csv")
    assert code == 0 and out.splitlines()[0].startswith("Harvest,PatientID,PlanUID")
    assert len(out.splitlines()) == len(window.plans) + 1


def test_manifest_summary_by_default(api: ApiServer, clinic: tuple[Path, object], tmp_path: Path) -> None:
    """``manifest ID`` prints a screenful (counts, then the plans that are not Complete, Missing first, each
    with why); ``--json`` before or after the command prints the document; ``-o`` writes the document."""
    root, truth = clinic
    hid = load_harvest(api, root, truth)
    window = truth.window("all")  # type: ignore[attr-defined]
    doc = json.loads(run(api.url, "manifest", hid, "--json")[1])
    assert json.loads(run(api.url, "--json", "manifest", hid)[1]) == doc
    code, out, _ = run(api.url, "manifest", hid)
    assert code == 0
    lines = out.splitlines()
    summary = doc["Summary"]
    assert lines[0].startswith(f"Manifest of harvest {hid}: {summary['PlansReferenced']} treated plan(s) referenced, "
                               f"{summary['PlansCollected']} collected, {summary['Patients']} patient(s)")
    by_status = {p.status: 0 for p in window.plans}
    for plan in window.plans:
        by_status[plan.status] += 1
    for status, count in by_status.items():
        assert f"{status} {count}" in lines[1]
    not_complete = [p for p in doc["Plans"] if p["Status"] != "Complete"]
    assert not_complete, "the synthetic clinic has Missing/Incomplete plans"
    assert f"Plans that are not Complete ({len(not_complete)}):" in out
    rows = [line.split() for line in lines if line.split() and line.split()[0] in ("Missing", "Incomplete", "Invalid")]
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), key=["Missing", "Incomplete", "Invalid"].index)
    missing = next(p for p in doc["Plans"] if p["Missing"])
    assert missing["Missing"][0]["Reason"] in out and len(lines) < 40
    target = tmp_path / "m.json"
    code, out, _ = run(api.url, "manifest", hid, "-o", str(target))
    assert code == 0 and out == "" and json.loads(target.read_text()) == doc
    assert run(api.url, "manifest", hid, "--csv", "--json")[0] == 2


def test_closed_pipe_ends_quietly(api: ApiServer, tmp_path: Path) -> None:
    """``rtharvest log | head -1``: head stops reading after one line; the command ends without a
    traceback and exit 0, like any filter whose reader went away (output far beyond a pipe's buffer)."""
    api.events.write_many(NewEvent(Level.WARNING, "harvester", f"event {i} " + "x" * 300) for i in range(2500))
    script = (f"{shlex.quote(sys.executable)} -m rtharvest.cli.commands --url {api.url} log --limit 5000 | head -1; "
              "echo \"status ${PIPESTATUS[0]}\" >&2")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.stdout.count("\n") == 1 and "event 2499" in done.stdout
    assert done.stderr.strip() == "status 0", done.stderr


def test_schedule_commands(api: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(api.url, "schedule", "list")
    assert code == 0 and out.startswith("no schedules")
    code, out, _ = run(api.url, "schedule", "add", "--name", "nightly-aria", "--source", "ARIA", "--lookup", "ARIA,MIM",
                       "--at", "01:00", "--timezone", "Europe/Zurich", "--overlap-days", "3", "--from", "2024-01-01")
    assert code == 0, out
    assert out.splitlines()[0] == ("Schedule nightly-aria (api): daily at 01:00 Europe/Zurich from ARIA (lookup: ARIA, "
                                   "MIM), overlap 3 day(s)")
    stored = api.schedules.get("nightly-aria").definition()
    assert stored["LookupSources"] == ["ARIA", "MIM"] and stored["From"] == "20240101" and stored["OverlapDays"] == 3
    code, out, _ = run(api.url, "schedule", "list")
    header, row = out.splitlines()
    assert header.split()[:3] == ["ID", "ORIGIN", "SOURCE"] and row.split()[:3] == ["nightly-aria", "api", "ARIA"]
    assert json.loads(run(api.url, "schedule", "show", "nightly-aria", "--json")[1])["ID"] == "nightly-aria"
    code, _, err = run(api.url, "schedule", "add", "--name", "nightly-aria", "--source", "ARIA", "--at", "02:00",
                       "--timezone", "UTC", capsys=capsys)
    assert code == 1 and "(409)" in err and "exists" in err
    assert run(api.url, "schedule", "delete", "nightly-aria")[:2] == (0, "nightly-aria: deleted (its harvests are "
                                                                          "kept)\n")
    code, _, err = run(api.url, "schedule", "show", "nightly-aria", capsys=capsys)
    assert code == 1 and "unknown schedule" in err
    assert run(api.url, "schedule", "add", "--source", "ARIA", "--at", "01:00")[0] == 2  # --timezone missing


@pytest.mark.parametrize("command", [(), ("harvest",), ("manifest",), ("jobs",), ("log",), ("schedule",), ("export",)])
def test_help_gives_examples_and_exit_codes(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(None, *command, "--help")[0] == 0
    text = capsys.readouterr().out
    examples = text.split("examples:\n", 1)[1].splitlines()
    assert examples and examples[0].strip().startswith("rtharvest ")
    if command in ((), ("harvest",), ("export",)):
        assert "5  completed with failures" in text and "1  the server refused" in text


def test_help_examples_parse(capsys: pytest.CaptureFixture[str]) -> None:
    """Every example ``--help`` shows is a command line the parser accepts."""
    parser = cli.build_parser()
    shown: list[str] = []
    for command in ((), ("harvest",), ("manifest",), ("jobs",), ("log",), ("schedule",), ("export",)):
        run(None, *command, "--help")
        text = capsys.readouterr().out.split("examples:\n", 1)[1]
        shown += [line.strip() for line in text.splitlines() if line.strip().startswith("rtharvest ")]
    assert len(shown) >= 20
    for line in shown:
        argv = [a for a in shlex.split(line.split("#")[0].split("|")[0])[1:]]
        argv = [DOC_PLACEHOLDERS.get(a, a) for a in argv]
        with contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(argv)  # SystemExit(2) on a wrong example


def test_export_commands_do_not_import_the_main_cli() -> None:
    """``rtharvest.export.cli`` takes what it shares with ``rtharvest.cli.commands`` from ``rtharvest.cli.util``: no
    import cycle (it used to borrow cli's private helpers while cli imported it)."""
    code = "import sys, rtharvest.export.cli; print('rtharvest.cli.commands' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_jobs_not_found_are_not_shown_as_attempts(api: ApiServer) -> None:
    """A job whose object no source holds failed for good at once: "1/3" tries would read as two more to
    come."""
    hid = start(api)
    fail_job(api.queue, hid, "RTRECORD->RTPLAN: 1.2.3 not found at ARIA")
    code, out, _ = run(api.url, "jobs", "--harvest", hid, "--state", "failed")
    row = out.splitlines()[1]
    assert code == 0 and "not found" in row.split("ARIA")[0] and "1/3" not in row


class _FinishAfterFirstPoll:
    """Finishes a harvest's record-search jobs once the server has answered the CLI's first poll of it, so
    the CLI saw it Running first; the fake waits for that answer (an event, with a deadline), not a time."""

    def __init__(self, api: ApiServer, hid: str) -> None:
        self.api, self.hid = api, hid
        self.polled = api.answered("GET", f"/rtharvest/harvests/{hid}")
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            assert self.polled.wait(20), "the CLI never polled the harvest"
            # A dated window is searched month by month: every one of its record-search jobs finishes.
            job = self.api.queue.claim("worker", 60)
            assert job is not None
            while job is not None:
                self.api.queue.complete(job.id, "worker", note="no records")
                job = self.api.queue.claim("worker", 60)
            self.api.tracker.mark_cleanup(self.hid)
        except BaseException as exc:  # noqa: BLE001 - reported to the test by join()
            self.error = exc

    def join(self) -> None:
        """Wait for the fake and re-raise what failed in it."""
        self.thread.join(30)
        assert not self.thread.is_alive(), "the fake worker did not finish"
        if self.error is not None:
            raise self.error


def test_wait_plain_lines(api: ApiServer) -> None:
    hid = start(api, to="20200131")  # one month: one record-search job
    fake = _FinishAfterFirstPoll(api, hid)
    code, out, _ = run(api.url, "harvest", "wait", hid, "--interval", "0.1", "--timeout", "20")
    fake.join()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Running: 0 of 1 jobs done, 0 failed")
    assert lines[-1].startswith("Completed: 1 of 1 jobs done, 0 failed, 0 running, 0 pending")
    assert len(lines) == len(set(lines))  # a line only when something changed
    assert "\r" not in out


def test_wait_progress_bar_on_a_tty(api: ApiServer) -> None:
    hid = start(api, to="20200131")  # one month: one record-search job
    fake = _FinishAfterFirstPoll(api, hid)
    tty = Tty()
    code, out, _ = run(api.url, "harvest", "wait", hid, "--interval", "0.1", "--timeout", "20", out=tty)
    fake.join()
    assert code == 0
    assert out.startswith("\r[") and "] 0 of 1 jobs done, 0 failed" in out
    assert "] 1 of 1 jobs done, 0 failed, 0 running  Completed" in out and out.endswith("Completed\n")


def test_wait_timeout_and_cancelled(api: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    hid = start(api)
    code, _, err = run(api.url, "harvest", "wait", hid, "--interval", "0.1", "--timeout", "0.3", capsys=capsys)
    assert code == 4 and "still Running after 0.3 s" in err
    run(api.url, "harvest", "cancel", hid)
    code, out, err = run(api.url, "harvest", "wait", hid, capsys=capsys)
    assert code == cli.EXIT_NOT_COMPLETED == 6 and "was cancelled" in err and out.startswith("Cancelled:")


def test_start_and_wait_reports_failed_jobs(api: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    def fail_soon() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            job = api.queue.claim("worker", 60)
            if job is not None:
                api.queue.fail(job.id, "worker", "nothing there", retryable=False)
                api.tracker.mark_cleanup(job.harvest_id)
                return
            time.sleep(0.05)

    t = threading.Thread(target=fail_soon, daemon=True)
    t.start()
    code, out, err = run(api.url, "harvest", "start", "--source", "ARIA", "--patient", "P1", "--wait",
                         "--interval", "0.1", capsys=capsys)
    t.join()
    # Completed, but not everything it set out to fetch: neither success (0) nor a refusal (1).
    assert code == cli.EXIT_FAILURES == 5
    hid = out.splitlines()[0]
    assert out.splitlines()[-1].startswith("Completed: 0 of 1 jobs done, 1 failed")
    assert f"harvest {hid} completed with 1 failed job(s) of 1; see: rtharvest jobs --harvest {hid} --state failed" \
        in err


def test_console_script_is_declared() -> None:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'rtharvest = "rtharvest.cli.commands:main"' in text



#: Placeholders the documentation writes where the parser wants a value of a given type.
DOC_PLACEHOLDERS = {"JOB_ID": "7", "EXPORT_ID": "0123456789abcdef"}
#: The first word after ``rtharvest`` that makes a code span a command example (the CLI's commands, and
#: the harvest actions a wrong example might put first).
DOC_COMMAND_WORDS = ("harvest", "manifest", "jobs", "log", "status", "export", "schedule",
                     "start", "pause", "resume", "cancel", "wait", "list")


def documented_commands() -> list[tuple[str, str]]:
    """``rtharvest COMMAND ...`` examples in README.md and docs/*.md (inline code and code blocks)."""
    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(rf"(?:^\s*|`)(rtharvest (?:--\S+ \S+ )*(?:{'|'.join(DOC_COMMAND_WORDS)})\b[^`#\n]*)")
    found: list[tuple[str, str]] = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            found.extend((path.name, match.group(1).strip()) for match in pattern.finditer(line))
    return found


def test_documented_commands_parse() -> None:
    # A command the documentation shows must be one the CLI accepts (operations.md once said
    # `rtharvest pause ID` for `rtharvest harvest pause ID`).
    commands = documented_commands()
    assert any(command.startswith("rtharvest harvest pause") for _, command in commands)
    parser = cli.build_parser()
    wrong = []
    for where, command in commands:
        argv = [DOC_PLACEHOLDERS.get(arg, arg) for arg in shlex.split(command)[1:]]
        if len(argv) == 1:
            # A command named in prose (`rtharvest export`): it must exist; its --help exits 0.
            argv.append("--help")
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code != 0:
                wrong.append(f"{where}: {command}")
    assert not wrong, wrong


def test_a_bodiless_405_names_the_allowed_methods() -> None:
    """Orthanc sends a 405 without a body (its plugin interface cannot add one): the message comes from the
    ``Allow`` header."""
    import email.message
    import urllib.error

    from rtharvest.cli.util import _http_error_message

    headers = email.message.Message()
    headers["Allow"] = "GET"
    exc = urllib.error.HTTPError("http://x/rtharvest/status", 405, "Method Not Allowed", headers, io.BytesIO(b""))
    assert _http_error_message(exc, "POST", "/rtharvest/status") == \
        "server refused POST /rtharvest/status (405): POST is not allowed here; use GET"

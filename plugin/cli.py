"""``rtharvest``: the command line of the harvester's REST API (standard library only).

Talks to Orthanc over HTTP(S) with Basic authentication, exactly like a script would::

    rtharvest --url http://pacs:8042 --user admin harvest start --source ARIA --from 20200101 --to 20201231
    rtharvest harvest wait 0123456789abcdef
    rtharvest manifest 0123456789abcdef --csv -o harvest.csv

Connection settings come from flags, else from the environment (``RTHARVEST_URL``, ``RTHARVEST_USER``,
``RTHARVEST_PASSWORD``), else ``http://localhost:8042`` without credentials. Prefer the environment
for the password: command lines are visible to every user of the machine (``ps``).

Exit codes: 0 success; 1 the server refused (its ``Error`` text is printed), a harvest was cancelled,
or the answer was not what the API gives; 2 usage error; 3 the server cannot be reached; 4 ``harvest
wait`` timed out.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
DEFAULT_URL = "http://localhost:8042"
FINAL_STATES = ("Completed", "Cancelled")


class CliError(Exception):
    """Ends the command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Client:
    """A minimal JSON client of ``/rtharvest`` (urllib: nothing to install on a hospital workstation)."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None,
                 timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CliError(f"--url must be an http(s) URL such as {DEFAULT_URL}, got {url!r}", EXIT_USAGE)
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._auth: str | None = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
            self._auth = f"Basic {token}"

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                timeout: float | None = None) -> bytes:
        """Send one request; return the body of a 2xx answer, raise :class:`CliError` otherwise."""
        params = {k: v for k, v in (query or {}).items() if v is not None and v != ""}
        url = self.url + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:  # noqa: S310 - http(s) only
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            raise CliError(_http_error_message(exc, method, path)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach {self.url}: {reason} (is Orthanc running? check --url or "
                           "RTHARVEST_URL)", EXIT_UNREACHABLE) from None

    def json(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
             timeout: float | None = None) -> Any:
        """:meth:`request` with the answer parsed as JSON."""
        raw = self.request(method, path, query, body, timeout)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CliError(f"{method} {path}: the server did not answer JSON (is {self.url} an Orthanc with the "
                           "rtharvest plugin?)") from None


def _http_error_message(exc: urllib.error.HTTPError, method: str, path: str) -> str:
    try:
        raw = exc.read()
    except Exception:  # a broken error body must not hide the status
        raw = b""
    text = raw.decode("utf-8", "replace").strip()
    detail = ""
    try:
        body = json.loads(text) if text else None
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        # The plugin answers {"Error": ...}; Orthanc's own errors carry Message/Details.
        detail = str(body.get("Error") or body.get("Details") or body.get("Message") or "")
    elif text and not text.lstrip().startswith("<"):
        detail = text[:300]
    if exc.code == 401:
        return ("authentication failed (401): give --user/--password or set RTHARVEST_USER/RTHARVEST_PASSWORD"
                + (f": {detail}" if detail else ""))
    if exc.code == 403:
        return f"forbidden (403): this user may not {method} {path}" + (f": {detail}" if detail else "")
    if not detail:
        detail = exc.reason if isinstance(exc.reason, str) else "no details"
        if exc.code == 404:
            detail += " (is the rtharvest plugin loaded in this Orthanc?)"
    return f"server refused {method} {path} ({exc.code}): {detail}"


# ---------------------------------------------------------------------------------------------------
# Output helpers


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: IO[str]) -> None:
    """Left-aligned columns; the last column is not padded (it may be long free text)."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    for row in [list(header), *cells]:
        line = "  ".join(v.ljust(widths[i]) if i < len(row) - 1 else v for i, v in enumerate(row))
        print(line.rstrip(), file=out)


def _window(doc: dict[str, Any]) -> str:
    dates = f"{doc.get('From') or ''}-{doc.get('To') or ''}" if doc.get("From") or doc.get("To") else ""
    patients = doc.get("PatientIDs") or []
    parts = [p for p in (dates, f"{len(patients)} patient(s)" if patients else "") if p]
    return ", ".join(parts) or "-"


def _progress_text(doc: dict[str, Any]) -> str:
    p = doc.get("Progress") or {}
    total, done, failed = int(p.get("JobsTotal", 0)), int(p.get("JobsDone", 0)), int(p.get("JobsFailed", 0))
    pct = 100.0 * (done + failed) / total if total else 0.0
    return (f"{doc.get('State', '?')}: {done}/{total} jobs done ({pct:.0f}%), {p.get('JobsRunning', 0)} running, "
            f"{p.get('JobsPending', 0)} pending, {failed} failed; {doc.get('Patients', 0)} patient(s), "
            f"plans {doc.get('PlansCollected', 0)}/{doc.get('PlansReferenced', 0)} collected")


def _bar(doc: dict[str, Any], width: int) -> str:
    p = doc.get("Progress") or {}
    total = int(p.get("JobsTotal", 0))
    finished = int(p.get("JobsDone", 0)) + int(p.get("JobsFailed", 0))
    fraction = finished / total if total else 0.0
    size = max(10, min(40, width - 60))
    filled = int(round(fraction * size))
    return (f"[{'#' * filled}{'.' * (size - filled)}] {fraction * 100:3.0f}% {finished}/{total} jobs, "
            f"{p.get('JobsRunning', 0)} running, {p.get('JobsFailed', 0)} failed  {doc.get('State', '?')}")


def _dump(value: Any, out: IO[str]) -> None:
    print(json.dumps(value, indent=2), file=out)


# ---------------------------------------------------------------------------------------------------
# Commands


def _harvest_path(harvest_id: str, suffix: str = "") -> str:
    return "/rtharvest/harvests/" + urllib.parse.quote(harvest_id, safe="") + suffix


def cmd_start(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest start``."""
    patients: list[str] = list(args.patient or [])
    if args.patients_file:
        try:
            with open(args.patients_file, encoding="utf-8") as fh:
                patients += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise CliError(f"--patients-file: {exc}", EXIT_USAGE) from None
    if not (args.date_from or args.date_to or patients):
        raise CliError("harvest start needs --from/--to dates and/or --patient IDs (a whole clinic is never "
                       "harvested by accident)", EXIT_USAGE)
    body: dict[str, Any] = {"Source": args.source}
    if args.lookup:
        body["LookupSources"] = [s for item in args.lookup for s in item.split(",") if s]
    for key, value in (("From", args.date_from), ("To", args.date_to), ("Label", args.label)):
        if value:
            body[key] = value
    if patients:
        body["PatientIDs"] = patients
    answer = client.json("POST", "/rtharvest/harvests", body=body)
    if args.json:
        _dump(answer, out)
    else:
        print(answer.get("ID"), file=out)
    if args.wait:
        return _wait(client, str(answer.get("ID")), args.timeout_wait, args.interval, out, args.json)
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest status ID``."""
    doc = client.json("GET", _harvest_path(args.id))
    if args.json:
        _dump(doc, out)
        return EXIT_OK
    print(f"Harvest {doc.get('ID')}  {doc.get('Label') or ''}".rstrip(), file=out)
    print(f"  source   {doc.get('Source')} (lookup: {', '.join(doc.get('LookupSources') or [])})", file=out)
    print(f"  window   {_window(doc)}", file=out)
    print(f"  created  {doc.get('CreatedAt')}", file=out)
    print(f"  {_progress_text(doc)}", file=out)
    return EXIT_OK


def cmd_control(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest pause|resume|cancel ID``."""
    answer = client.json("POST", _harvest_path(args.id, f"/{args.action}"), body={})
    if args.json:
        _dump(answer, out)
    else:
        print(f"{answer.get('ID')}: {answer.get('State')}", file=out)
    return EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest list``."""
    docs = client.json("GET", "/rtharvest/harvests", {"limit": args.limit})
    if args.json:
        _dump(docs, out)
        return EXIT_OK
    rows = []
    for d in docs:
        p = d.get("Progress") or {}
        rows.append((d.get("ID"), d.get("State"), d.get("Source"), _window(d), d.get("CreatedAt"),
                     f"{p.get('JobsDone', 0)}/{p.get('JobsTotal', 0)}", p.get("JobsFailed", 0),
                     f"{d.get('PlansCollected', 0)}/{d.get('PlansReferenced', 0)}", d.get("Label") or ""))
    if not rows:
        print("no harvests yet (start one with: rtharvest harvest start --source ...)", file=out)
        return EXIT_OK
    _table(rows, ("ID", "STATE", "SOURCE", "WINDOW", "CREATED", "JOBS", "FAILED", "PLANS", "LABEL"), out)
    return EXIT_OK


def _wait(client: Client, harvest_id: str, timeout: float | None, interval: float, out: IO[str],
          as_json: bool, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> int:
    tty = out.isatty()
    deadline = None if timeout is None else clock() + timeout
    last_line = ""
    last_print = 0.0
    doc: dict[str, Any] = {}
    while True:
        doc = client.json("GET", _harvest_path(harvest_id))
        state = doc.get("State")
        if tty:
            width = shutil.get_terminal_size((100, 20)).columns
            line = _bar(doc, width)[: width - 1]
            print("\r" + line.ljust(len(last_line)), end="", file=out, flush=True)
            last_line = line
        else:
            # A log file gets a line when something changed, and a heartbeat every minute at most.
            line = _progress_text(doc)
            if line != last_line or clock() - last_print >= 60:
                print(line, file=out, flush=True)
                last_line, last_print = line, clock()
        if state in FINAL_STATES:
            break
        if deadline is not None and clock() >= deadline:
            if tty:
                print(file=out)
            raise CliError(f"harvest {harvest_id} is still {state} after {timeout:g} s (keep waiting with: "
                           f"rtharvest harvest wait {harvest_id})", EXIT_TIMEOUT)
        sleep(interval)
    if tty:
        print(file=out)
    if as_json:
        _dump(doc, out)
    failed = int((doc.get("Progress") or {}).get("JobsFailed", 0))
    if doc.get("State") == "Cancelled":
        raise CliError(f"harvest {harvest_id} was cancelled")
    if failed:
        print(f"rtharvest: {failed} job(s) failed; see: rtharvest jobs --harvest {harvest_id} --state failed",
              file=sys.stderr)
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest wait ID``: poll until Completed or Cancelled."""
    return _wait(client, args.id, args.timeout_wait, args.interval, out, args.json)


def cmd_manifest(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``manifest ID|--all [--csv] [-o FILE]``."""
    if bool(args.id) == bool(args.all):
        raise CliError("manifest needs a harvest ID or --all (the whole store)", EXIT_USAGE)
    path = "/rtharvest/manifest" if args.all else _harvest_path(args.id, "/manifest")
    raw = client.request("GET", path, {"format": "csv" if args.csv else None})
    if not args.csv:
        try:
            raw = (json.dumps(json.loads(raw.decode("utf-8")), indent=2) + "\n").encode("utf-8")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CliError(f"GET {path}: the server did not answer JSON") from None
    if args.output and args.output != "-":
        try:
            with open(args.output, "wb") as fh:
                fh.write(raw)
        except OSError as exc:
            raise CliError(f"-o {args.output}: {exc}", EXIT_USAGE) from None
        print(f"wrote {args.output} ({len(raw)} bytes)", file=sys.stderr)
    else:
        out.write(raw.decode("utf-8"))
        out.flush()
    return EXIT_OK


def cmd_jobs(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``jobs [--harvest --state --limit] [--retry JOB]``."""
    if args.retry is not None:
        job = client.json("POST", f"/rtharvest/jobs/{args.retry}/retry", body={})
        if args.json:
            _dump(job, out)
        else:
            print(f"job {job.get('ID')}: {job.get('State')} (up to {job.get('MaxAttempts')} more attempts)",
                  file=out)
        return EXIT_OK
    jobs = client.json("GET", "/rtharvest/jobs", {"harvest": args.harvest, "state": args.state,
                                                   "limit": args.limit})
    if args.json:
        _dump(jobs, out)
        return EXIT_OK
    if not jobs:
        print("no jobs match", file=out)
        return EXIT_OK
    rows = [(j.get("ID"), j.get("Harvest"), j.get("Kind"), j.get("State"),
             f"{j.get('Attempts')}/{j.get('MaxAttempts')}", j.get("Source"), j.get("Target"),
             j.get("DimseStatus") or "", (j.get("LastError") or "")[:160]) for j in jobs]
    _table(rows, ("ID", "HARVEST", "KIND", "STATE", "TRIES", "SOURCE", "TARGET", "DIMSE", "LAST ERROR"), out)
    return EXIT_OK


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_value(value: str | None, now: Callable[[], float] = time.time) -> str | None:
    """``--since``: a duration back from now (``90s``, ``30m``, ``2h``, ``7d``) becomes epoch seconds;
    anything else (ISO 8601, epoch seconds) goes to the server as given, which validates it."""
    if not value:
        return None
    text = value.strip().lower()
    if len(text) > 1 and text[-1] in _UNITS and text[:-1].isdigit():
        return f"{now() - int(text[:-1]) * _UNITS[text[-1]]:.0f}"
    return value


def cmd_log(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``log [--level --harvest --since --limit]``."""
    events = client.json("GET", "/rtharvest/log", {"level": args.level, "harvest": args.harvest,
                                                    "since": since_value(args.since), "limit": args.limit})
    if args.json:
        _dump(events, out)
        return EXIT_OK
    for e in events:
        where = " ".join(f"{k.lower()}={e[k]}" for k in ("Harvest", "Job", "Source") if e.get(k) is not None)
        print(f"{e.get('Time')} {e.get('Level', '?'):<7} {e.get('Component', '')}: {e.get('Message', '')}"
              + (f"  [{where}]" if where else ""), file=out)
    return EXIT_OK


def cmd_server_status(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``status``: plugin and queue."""
    doc = client.json("GET", "/rtharvest/status")
    if args.json:
        _dump(doc, out)
        return EXIT_OK
    print(f"rtharvest {doc.get('PluginVersion')} on Orthanc {doc.get('OrthancVersion')}; "
          f"workers alive {doc.get('WorkersAlive')}/{doc.get('Workers', '?')}", file=out)
    if doc.get("ConfigurationError"):
        print(f"CONFIGURATION ERROR: {doc['ConfigurationError']}", file=out)
    queue = doc.get("Queue") or {}
    if queue:
        print("queue: " + ", ".join(f"{k} {v}" for k, v in queue.items()), file=out)
    if doc.get("Sources"):
        print("sources: " + ", ".join(doc["Sources"]), file=out)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# Parser


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a hint, for every usage error (sub-parsers included)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _date(value: str) -> str:
    compact = value.replace("-", "")
    if len(compact) != 8 or not compact.isdigit():
        raise argparse.ArgumentTypeError(f"expected a date as YYYYMMDD or YYYY-MM-DD, got {value!r}")
    return compact


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for documentation and tests)."""
    p = _Parser(prog="rtharvest", description="Control the rtharvest plugin of an Orthanc server.",
                epilog="Environment: RTHARVEST_URL, RTHARVEST_USER, RTHARVEST_PASSWORD. Exit codes: 0 ok, "
                       "1 refused by the server, 2 usage, 3 unreachable, 4 wait timed out.")
    p.add_argument("--url", help=f"Orthanc's HTTP root (default: $RTHARVEST_URL or {DEFAULT_URL})")
    p.add_argument("--user", help="Orthanc user (default: $RTHARVEST_USER)")
    p.add_argument("--password", help="password (default: $RTHARVEST_PASSWORD; prefer the environment)")
    p.add_argument("--timeout", type=_positive, default=30.0, help="seconds per HTTP request (default 30)")
    p.add_argument("--json", action="store_true", help="print the server's JSON instead of a summary")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    h = sub.add_parser("harvest", help="start, follow and control harvests")
    hs = h.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    hs.required = True
    start = hs.add_parser("start", help="start a harvest")
    start.add_argument("--source", required=True, help="where treatment records are queried (a DicomModalities name)")
    start.add_argument("--lookup", action="append", metavar="SOURCE",
                       help="where other objects are searched, in order (repeat or comma-separate; default: --source)")
    start.add_argument("--from", dest="date_from", type=_date, help="first treatment date (YYYYMMDD)")
    start.add_argument("--to", dest="date_to", type=_date, help="last treatment date (YYYYMMDD)")
    start.add_argument("--patient", action="append", metavar="ID", help="a PatientID (repeatable)")
    start.add_argument("--patients-file", metavar="FILE", help="file with one PatientID per line")
    start.add_argument("--label", help="a name for the harvest")
    start.add_argument("--wait", action="store_true", help="then wait until it ends (like harvest wait)")
    start.add_argument("--wait-timeout", dest="timeout_wait", type=_positive, help="give up waiting after SECONDS")
    start.add_argument("--interval", type=_positive, default=2.0, help="seconds between polls (default 2)")
    start.set_defaults(func=cmd_start)
    for action, text in (("status", "show one harvest"), ("pause", "pause a harvest"),
                         ("resume", "resume a paused harvest"), ("cancel", "cancel a harvest (final)")):
        c = hs.add_parser(action, help=text)
        c.add_argument("id", metavar="ID")
        c.set_defaults(func=cmd_status if action == "status" else cmd_control)
    w = hs.add_parser("wait", help="wait until a harvest is Completed or Cancelled, showing progress")
    w.add_argument("id", metavar="ID")
    w.add_argument("--timeout", dest="timeout_wait", type=_positive, help="give up after SECONDS (exit 4)")
    w.add_argument("--interval", type=_positive, default=2.0, help="seconds between polls (default 2)")
    w.set_defaults(func=cmd_wait)
    ls = hs.add_parser("list", help="list harvests, newest first")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(func=cmd_list)

    m = sub.add_parser("manifest", help="a harvest's manifest (JSON, or CSV with one row per plan)")
    m.add_argument("id", metavar="ID", nargs="?")
    m.add_argument("--all", action="store_true", help="the whole store instead of one harvest")
    m.add_argument("--csv", action="store_true", help="CSV instead of JSON")
    m.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    m.set_defaults(func=cmd_manifest)

    j = sub.add_parser("jobs", help="list jobs, or retry a failed one")
    j.add_argument("--harvest", metavar="ID")
    j.add_argument("--state", help="pending, leased, waiting, done, failed or cancelled")
    j.add_argument("--limit", type=int, default=100)
    j.add_argument("--retry", type=int, metavar="JOB", help="give failed job JOB another round of attempts")
    j.set_defaults(func=cmd_jobs)

    lg = sub.add_parser("log", help="the harvester's event log, newest first")
    lg.add_argument("--level", help="minimum level: debug, info, warning, error")
    lg.add_argument("--harvest", metavar="ID")
    lg.add_argument("--since", help="ISO 8601 time, epoch seconds, or a duration back from now: 90s, 30m, 2h, 7d")
    lg.add_argument("--limit", type=int, default=100)
    lg.set_defaults(func=cmd_log)

    st = sub.add_parser("status", help="plugin, workers and queue")
    st.set_defaults(func=cmd_server_status)
    from .export.cli import add_parser as add_export_parser  # here: that module imports this one

    add_export_parser(sub)
    from .backup import add_parser as add_backup_parser  # local commands: they read files, not REST

    add_backup_parser(sub)
    return p


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None,
         env: dict[str, str] | None = None) -> int:
    """Entry point of the ``rtharvest`` console script; returns the exit code."""
    out = out or sys.stdout
    environ = os.environ if env is None else env
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    user = args.user if args.user is not None else environ.get("RTHARVEST_USER") or None
    password = args.password if args.password is not None else environ.get("RTHARVEST_PASSWORD") or None
    try:
        if password is not None and user is None:
            raise CliError("a password without a user: give --user or set RTHARVEST_USER", EXIT_USAGE)
        client = Client(args.url or environ.get("RTHARVEST_URL") or DEFAULT_URL, user, password, args.timeout)
        return int(args.func(client, args, out))
    except CliError as exc:
        print(f"rtharvest: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\nrtharvest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

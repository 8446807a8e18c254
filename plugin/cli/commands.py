"""``rtharvest``: the command line of the harvester's REST API (standard library only).

Talks to Orthanc over HTTP(S) with Basic authentication, exactly like a script would::

    rtharvest --url http://pacs:8042 --user admin harvest start --source ARIA --from 20200101 --to 20201231
    rtharvest harvest wait 0123456789abcdef
    rtharvest manifest 0123456789abcdef            # a summary; --json the document, --csv one row per plan

Connection settings come from flags, else from the environment (``RTHARVEST_URL``, ``RTHARVEST_USER``,
``RTHARVEST_PASSWORD``), else ``http://localhost:8042`` without credentials. Prefer the environment
for the password: command lines are visible to every user of the machine (``ps``).

Every command prints a summary; ``--json`` (before or after the command) prints the server's document
instead. Exit codes are :data:`rtharvest.cli.util.EXIT_CODES_HELP`: 0 done, 1 refused by the server, 2 usage,
3 unreachable, 4 waiting timed out, 5 completed with failures, 6 ended without completing. Output to a
closed pipe (``rtharvest log | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import IO, Any

from ..export.cli import add_parser as add_export_parser
from .util import (
    DEFAULT_URL,
    EXIT_CODES_HELP,
    EXIT_FAILURES,
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Client,
    CliError,
    Parser,
    date,
    dump,
    examples,
    json_flag,
    positive,
    table,
)

__all__ = ["EXIT_FAILURES", "EXIT_NOT_COMPLETED", "EXIT_OK", "EXIT_REFUSED", "EXIT_TIMEOUT", "EXIT_UNREACHABLE",
           "EXIT_USAGE", "CliError", "Client", "build_parser", "main", "since_value"]

FINAL_STATES = ("Completed", "Cancelled")
# The helpers' former private names, for commands written against them.
_dump, _table, _positive, _date, _Parser = dump, table, positive, date, Parser


def _window(doc: dict[str, Any]) -> str:
    dates = f"{doc.get('From') or ''}-{doc.get('To') or ''}" if doc.get("From") or doc.get("To") else ""
    patients = doc.get("PatientIDs") or []
    parts = [p for p in (dates, f"{len(patients)} patient(s)" if patients else "") if p]
    return ", ".join(parts) or "-"


def _progress_counts(doc: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(total, done, failed, running, pending) jobs of a harvest document."""
    p = doc.get("Progress") or {}
    return (int(p.get("JobsTotal", 0)), int(p.get("JobsDone", 0)), int(p.get("JobsFailed", 0)),
            int(p.get("JobsRunning", 0)), int(p.get("JobsPending", 0)))


def progress_text(doc: dict[str, Any]) -> str:
    """``Completed: 227 of 229 jobs done, 2 failed, 0 running, 0 pending; ...``: failed jobs are never
    counted as done (a percentage of finished jobs read 100 % with jobs failed)."""
    total, done, failed, running, pending = _progress_counts(doc)
    return (f"{doc.get('State', '?')}: {done} of {total} jobs done, {failed} failed, {running} running, "
            f"{pending} pending; {doc.get('Patients', 0)} patient(s), plans {doc.get('PlansCollected', 0)} of "
            f"{doc.get('PlansReferenced', 0)} collected")


def progress_bar(doc: dict[str, Any], width: int) -> str:
    """One terminal line: a bar of the jobs that ended (done or failed), then how they ended."""
    total, done, failed, running, _ = _progress_counts(doc)
    fraction = (done + failed) / total if total else 0.0
    size = max(10, min(40, width - 70))
    filled = int(round(fraction * size))
    return (f"[{'#' * filled}{'.' * (size - filled)}] {done} of {total} jobs done, {failed} failed, "
            f"{running} running  {doc.get('State', '?')}")


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
        dump(answer, out)
    else:
        print(answer.get("ID"), file=out)
    if args.wait:
        return _wait(client, str(answer.get("ID")), args.timeout_wait, args.interval, out, args.json)
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest status ID``."""
    doc = client.json("GET", _harvest_path(args.id))
    if args.json:
        dump(doc, out)
        return EXIT_OK
    print(f"Harvest {doc.get('ID')}  {doc.get('Label') or ''}".rstrip(), file=out)
    print(f"  source   {doc.get('Source')} (lookup: {', '.join(doc.get('LookupSources') or [])})", file=out)
    print(f"  window   {_window(doc)}", file=out)
    print(f"  created  {doc.get('CreatedAt')}", file=out)
    print(f"  {progress_text(doc)}", file=out)
    return EXIT_OK


def cmd_control(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest pause|resume|cancel ID``."""
    answer = client.json("POST", _harvest_path(args.id, f"/{args.action}"), body={})
    if args.json:
        dump(answer, out)
    else:
        print(f"{answer.get('ID')}: {answer.get('State')}", file=out)
    return EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest list``."""
    docs = client.json("GET", "/rtharvest/harvests", {"limit": args.limit})
    if args.json:
        dump(docs, out)
        return EXIT_OK
    rows = []
    for d in docs:
        total, done, failed, _, _ = _progress_counts(d)
        rows.append((d.get("ID"), d.get("State"), d.get("Source"), _window(d), d.get("CreatedAt"),
                     f"{done} of {total}", failed,
                     f"{d.get('PlansCollected', 0)} of {d.get('PlansReferenced', 0)}", d.get("Label") or ""))
    if not rows:
        print("no harvests yet (start one with: rtharvest harvest start --source ...)", file=out)
        return EXIT_OK
    table(rows, ("ID", "STATE", "SOURCE", "WINDOW", "CREATED", "JOBS DONE", "FAILED", "PLANS", "LABEL"), out)
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
            line = progress_bar(doc, width)[: width - 1]
            print("\r" + line.ljust(len(last_line)), end="", file=out, flush=True)
            last_line = line
        else:
            # A log file gets a line when something changed, and a heartbeat every minute at most.
            line = progress_text(doc)
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
        dump(doc, out)
    total, done, failed, _, _ = _progress_counts(doc)
    if doc.get("State") == "Cancelled":
        raise CliError(f"harvest {harvest_id} was cancelled ({done} of {total} jobs done)", EXIT_NOT_COMPLETED)
    if failed:
        raise CliError(f"harvest {harvest_id} completed with {failed} failed job(s) of {total}; see: rtharvest "
                       f"jobs --harvest {harvest_id} --state failed", EXIT_FAILURES)
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``harvest wait ID``: poll until Completed or Cancelled."""
    return _wait(client, args.id, args.timeout_wait, args.interval, out, args.json)


#: Plans the manifest summary lists one by one (the rest are counted; the document has them all).
SUMMARY_PLANS = 20


def _missing_text(plan: dict[str, Any]) -> str:
    if plan.get("Status") == "Invalid":
        return str(plan.get("InvalidReason") or "invalid plan")
    links = plan.get("Missing") or []
    if not links:
        return ""
    first = links[0]
    more = f" (+{len(links) - 1} more)" if len(links) > 1 else ""
    return f"{first.get('What')} {first.get('UID')}: {first.get('Reason')}{more}"


def manifest_summary(doc: dict[str, Any], out: IO[str], limit: int = SUMMARY_PLANS) -> None:
    """What a manifest says, in a screenful: the counts, then the plans that are not Complete."""
    summary = doc.get("Summary") or {}
    plans = doc.get("Plans") or []
    by_status = summary.get("PlansByStatus") or {}
    rate = float(summary.get("SuccessRate") or 0.0)
    print(f"Manifest of {'harvest ' + str(doc['Harvest']) if doc.get('Harvest') else 'the whole store'}: "
          f"{summary.get('PlansReferenced', 0)} treated plan(s) referenced, {summary.get('PlansCollected', 0)} "
          f"collected, {summary.get('Patients', 0)} patient(s); success rate {rate * 100:.1f} % "
          "(Complete of the plans that are not Invalid)", file=out)
    print("  " + "   ".join(f"{status} {by_status.get(status, 0)}"
                             for status in ("Complete", "Incomplete", "Missing", "Invalid")), file=out)
    print(f"  treatment records {summary.get('TreatmentRecords', 0)}, planning series "
          f"{summary.get('PlanningSeries', 0)}, failed jobs {summary.get('FailedJobs', 0)}, objects no plan "
          f"accounts for {summary.get('OrphanObjects', 0)}", file=out)
    order = {"Missing": 0, "Incomplete": 1, "Invalid": 2}
    problems = sorted((p for p in plans if p.get("Status") in order), key=lambda p: order[str(p.get("Status"))])
    if problems:
        print(f"Plans that are not Complete ({len(problems)}):", file=out)
        rows = [(p.get("Status"), p.get("PatientID") or "", p.get("PlanUID"), p.get("PlanLabel") or "",
                 _missing_text(p)) for p in problems[:limit]]
        table(rows, ("  STATUS", "PATIENT", "PLAN UID", "LABEL", "WHY"), out)
        if len(problems) > limit:
            print(f"  ... and {len(problems) - limit} more", file=out)
    print("The whole document: --json; one row per plan: --csv", file=out)


def cmd_manifest(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``manifest ID|--all [--json|--csv] [-o FILE]``: a summary, the JSON document, or CSV."""
    if bool(args.id) == bool(args.all):
        raise CliError("manifest needs a harvest ID or --all (the whole store)", EXIT_USAGE)
    if args.csv and args.json:
        raise CliError("--csv and --json exclude each other", EXIT_USAGE)
    path = "/rtharvest/manifest" if args.all else _harvest_path(args.id, "/manifest")
    to_file = bool(args.output and args.output != "-")
    if args.csv:
        raw = client.request("GET", path, {"format": "csv"})
    else:
        doc = client.json("GET", path)
        if not (args.json or to_file):
            manifest_summary(doc, out)
            return EXIT_OK
        raw = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    if to_file:
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


def _tries(job: dict[str, Any]) -> str:
    # A source that answers "no such object" is asked once: "1/10" would read as nine retries to come.
    if job.get("State") == "failed" and "not found at" in str(job.get("LastError") or ""):
        return "not found"
    return f"{job.get('Attempts')}/{job.get('MaxAttempts')}"


def cmd_jobs(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``jobs [--harvest --state --limit] [--retry JOB]``."""
    if args.retry is not None:
        job = client.json("POST", f"/rtharvest/jobs/{args.retry}/retry", body={})
        if args.json:
            dump(job, out)
        else:
            print(f"job {job.get('ID')}: {job.get('State')} (up to {job.get('MaxAttempts')} more attempts)",
                  file=out)
        return EXIT_OK
    jobs = client.json("GET", "/rtharvest/jobs", {"harvest": args.harvest, "state": args.state,
                                                   "limit": args.limit})
    if args.json:
        dump(jobs, out)
        return EXIT_OK
    if not jobs:
        print("no jobs match", file=out)
        return EXIT_OK
    rows = [(j.get("ID"), j.get("Harvest"), j.get("Kind"), j.get("State"), _tries(j), j.get("Source"),
             j.get("Target"), j.get("DimseStatus") or "", (j.get("LastError") or "")[:160]) for j in jobs]
    table(rows, ("ID", "HARVEST", "KIND", "STATE", "TRIES", "SOURCE", "TARGET", "DIMSE", "LAST ERROR"), out)
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
        dump(events, out)
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
        dump(doc, out)
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


def _schedule_path(schedule_id: str) -> str:
    return "/rtharvest/schedules/" + urllib.parse.quote(schedule_id, safe="")


def _schedule_lines(doc: dict[str, Any], out: IO[str]) -> None:
    print(f"Schedule {doc.get('ID')} ({doc.get('Origin')}): daily at {doc.get('At')} {doc.get('TimeZone')} from "
          f"{doc.get('Source')} (lookup: {', '.join(doc.get('LookupSources') or [])}), overlap "
          f"{doc.get('OverlapDays')} day(s)", file=out)
    print(f"  covered to {doc.get('CoveredTo') or '-'}; next run {doc.get('NextRun') or '-'}"
          + (f"; waiting: {doc['Waiting']}" if doc.get("Waiting") else ""), file=out)
    runs = doc.get("Runs") or []
    if runs:
        table([(r.get("Harvest"), r.get("From"), r.get("To"), r.get("State")) for r in runs],
              ("  HARVEST", "FROM", "TO", "STATE"), out)


def cmd_schedule(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``schedule list|show|add|delete``."""
    if args.schedule_action == "list":
        docs = client.json("GET", "/rtharvest/schedules")
        if args.json:
            dump(docs, out)
            return EXIT_OK
        if not docs:
            print("no schedules (add one with: rtharvest schedule add --source ... --at HH:MM --timezone ZONE)",
                  file=out)
            return EXIT_OK
        rows = [(d.get("ID"), d.get("Origin"), d.get("Source"), f"{d.get('At')} {d.get('TimeZone')}",
                 d.get("CoveredTo") or "-", d.get("NextRun") or "-",
                 (d.get("Runs") or [{}])[-1].get("State", "-"), d.get("Waiting") or "") for d in docs]
        table(rows, ("ID", "ORIGIN", "SOURCE", "DAILY AT", "COVERED TO", "NEXT RUN", "LAST RUN", "WAITING"), out)
        return EXIT_OK
    if args.schedule_action == "add":
        body: dict[str, Any] = {"Source": args.source, "At": args.at, "TimeZone": args.timezone}
        for key, value in (("Name", args.name), ("From", args.date_from), ("Label", args.label),
                           ("OverlapDays", args.overlap_days)):
            if value is not None:
                body[key] = value
        if args.lookup:
            body["LookupSources"] = [s for item in args.lookup for s in item.split(",") if s]
        doc = client.json("POST", "/rtharvest/schedules", body=body)
    elif args.schedule_action == "delete":
        answer = client.json("DELETE", _schedule_path(args.id))
        if args.json:
            dump(answer, out)
        else:
            print(f"{answer.get('ID')}: deleted (its harvests are kept)", file=out)
        return EXIT_OK
    else:
        doc = client.json("GET", _schedule_path(args.id))
    if args.json:
        dump(doc, out)
    else:
        _schedule_lines(doc, out)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for documentation and tests)."""
    js = json_flag()
    p = Parser(prog="rtharvest", description="Control the rtharvest plugin of an Orthanc server.",
               epilog=examples(
                   "rtharvest --url http://pacs:8042 --user admin harvest start --source ARIA --from 20200101 "
                   "--to 20201231 --wait",
                   "rtharvest harvest list",
                   "rtharvest manifest 0123456789abcdef            # summary; --json, --csv -o plans.csv",
                   "rtharvest jobs --harvest 0123456789abcdef --state failed",
                   "rtharvest log --level warning --since 2h | head",
                   "rtharvest schedule add --source ARIA --at 01:00 --timezone Europe/Zurich",
                   "rtharvest export start --harvest 0123456789abcdef --destination RESEARCH --wait")
               + "\n\nenvironment: RTHARVEST_URL, RTHARVEST_USER, RTHARVEST_PASSWORD\n" + EXIT_CODES_HELP)
    p.add_argument("--url", help=f"Orthanc's HTTP root (default: $RTHARVEST_URL or {DEFAULT_URL})")
    p.add_argument("--user", help="Orthanc user (default: $RTHARVEST_USER)")
    p.add_argument("--password", help="password (default: $RTHARVEST_PASSWORD; prefer the environment)")
    p.add_argument("--timeout", type=positive, default=30.0, help="seconds per HTTP request (default 30)")
    p.add_argument("--json", action="store_true", help="print the server's JSON document instead of a summary")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    h = sub.add_parser("harvest", help="start, follow and control harvests", epilog=examples(
        "rtharvest harvest start --source ARIA --lookup ARIA,MIM --from 20200101 --to 20201231 --label lung",
        "rtharvest harvest start --source ARIA --patients-file ids.txt --wait",
        "rtharvest harvest wait 0123456789abcdef --timeout 3600",
        "rtharvest harvest pause 0123456789abcdef") + "\n\n" + EXIT_CODES_HELP)
    hs = h.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    hs.required = True
    start = hs.add_parser("start", parents=[js], help="start a harvest (prints its ID)")
    start.add_argument("--source", required=True, help="where treatment records are queried (a DicomModalities name)")
    start.add_argument("--lookup", action="append", metavar="SOURCE",
                       help="where other objects are searched, in order (repeat or comma-separate; default: --source)")
    start.add_argument("--from", dest="date_from", type=date, help="first treatment date (YYYYMMDD)")
    start.add_argument("--to", dest="date_to", type=date, help="last treatment date (YYYYMMDD)")
    start.add_argument("--patient", action="append", metavar="ID", help="a PatientID (repeatable)")
    start.add_argument("--patients-file", metavar="FILE", help="file with one PatientID per line")
    start.add_argument("--label", help="a name for the harvest")
    start.add_argument("--wait", action="store_true", help="then wait until it ends (like harvest wait)")
    start.add_argument("--wait-timeout", dest="timeout_wait", type=positive, help="give up waiting after SECONDS")
    start.add_argument("--interval", type=positive, default=2.0, help="seconds between polls (default 2)")
    start.set_defaults(func=cmd_start)
    for action, text in (("status", "show one harvest"), ("pause", "pause a harvest"),
                         ("resume", "resume a paused harvest"), ("cancel", "cancel a harvest (final)")):
        c = hs.add_parser(action, parents=[js], help=text)
        c.add_argument("id", metavar="ID")
        c.set_defaults(func=cmd_status if action == "status" else cmd_control)
    w = hs.add_parser("wait", parents=[js], help="wait until a harvest is Completed or Cancelled, showing progress "
                                                 "(exit 5 if jobs failed, 6 if cancelled)")
    w.add_argument("id", metavar="ID")
    w.add_argument("--timeout", dest="timeout_wait", type=positive, help="give up after SECONDS (exit 4)")
    w.add_argument("--interval", type=positive, default=2.0, help="seconds between polls (default 2)")
    w.set_defaults(func=cmd_wait)
    ls = hs.add_parser("list", parents=[js], help="list harvests, newest first")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(func=cmd_list)

    m = sub.add_parser("manifest", parents=[js],
                       help="a harvest's manifest: a summary (the plans that are not Complete and why); --json "
                            "the document, --csv one row per plan",
                       epilog=examples("rtharvest manifest 0123456789abcdef",
                                       "rtharvest manifest 0123456789abcdef --json -o manifest.json",
                                       "rtharvest manifest --all --csv -o store.csv"))
    m.add_argument("id", metavar="ID", nargs="?")
    m.add_argument("--all", action="store_true", help="the whole store instead of one harvest")
    m.add_argument("--csv", action="store_true", help="CSV (one row per plan) instead of a summary")
    m.add_argument("-o", "--output", metavar="FILE",
                   help="write the document (JSON, or CSV with --csv) to FILE instead of standard output")
    m.set_defaults(func=cmd_manifest)

    j = sub.add_parser("jobs", parents=[js], help="list jobs, or retry a failed one", epilog=examples(
        "rtharvest jobs --harvest 0123456789abcdef --state failed", "rtharvest jobs --retry 7"))
    j.add_argument("--harvest", metavar="ID")
    j.add_argument("--state", help="pending, leased, waiting, done, failed or cancelled")
    j.add_argument("--limit", type=int, default=100)
    j.add_argument("--retry", type=int, metavar="JOB", help="give failed job JOB another round of attempts")
    j.set_defaults(func=cmd_jobs)

    lg = sub.add_parser("log", parents=[js], help="the harvester's event log, newest first", epilog=examples(
        "rtharvest log --level warning --since 2h", "rtharvest log --harvest 0123456789abcdef | head"))
    lg.add_argument("--level", help="minimum level: debug, info, warning, error")
    lg.add_argument("--harvest", metavar="ID")
    lg.add_argument("--since", help="ISO 8601 time, epoch seconds, or a duration back from now: 90s, 30m, 2h, 7d")
    lg.add_argument("--limit", type=int, default=100)
    lg.set_defaults(func=cmd_log)

    st = sub.add_parser("status", parents=[js], help="plugin, workers and queue")
    st.set_defaults(func=cmd_server_status)

    sc = sub.add_parser("schedule", help="recurring incremental harvests: list, show, add, delete", epilog=examples(
        "rtharvest schedule list",
        "rtharvest schedule add --name nightly-aria --source ARIA --lookup ARIA,MIM --at 01:00 "
        "--timezone Europe/Zurich --overlap-days 7 --from 20240101",
        "rtharvest schedule show nightly-aria",
        "rtharvest schedule delete nightly-aria"))
    scs = sc.add_subparsers(dest="schedule_action", metavar="ACTION", parser_class=Parser)
    scs.required = True
    scs.add_parser("list", parents=[js], help="every schedule with its next run")
    add = scs.add_parser("add", parents=[js], help="create a schedule (harvests every day at --at, --timezone)")
    add.add_argument("--name", help="its ID (default: generated)")
    add.add_argument("--source", required=True, help="where treatment records are queried")
    add.add_argument("--lookup", action="append", metavar="SOURCE", help="lookup sources (repeat or comma-separate)")
    add.add_argument("--at", required=True, metavar="HH:MM", help="time of day (24 h) in --timezone")
    add.add_argument("--timezone", required=True, metavar="ZONE", help="an IANA zone such as Europe/Zurich or UTC")
    add.add_argument("--overlap-days", type=int, help="days each window reaches back for late records (default 7)")
    add.add_argument("--from", dest="date_from", type=date, help="the first window's first day (default yesterday)")
    add.add_argument("--label", help="a label for its harvests")
    for action, text in (("show", "one schedule and its runs"), ("delete", "delete a schedule (its harvests stay)")):
        c = scs.add_parser(action, parents=[js], help=text)
        c.add_argument("id", metavar="ID")
    sc.set_defaults(func=cmd_schedule)

    add_export_parser(sub, js)
    from ..harvest.backup import add_parser as add_backup_parser  # local commands: they read files, not REST

    add_backup_parser(sub)
    return p


def _quiet_stdout() -> None:
    """The reader of standard output has gone (``| head``): send what is still buffered nowhere, so the
    interpreter's own flush at exit does not raise ``BrokenPipeError`` again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (tests): nothing is left to flush
        pass


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
    except BrokenPipeError:
        # Like any Unix filter whose reader stopped reading: no traceback, no message.
        _quiet_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        print("\nrtharvest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``rtharvest export ...``: the export commands of the ``rtharvest`` CLI (over the REST API)::

    rtharvest export start --harvest 0123456789abcdef --destination CENTRAL --plans Complete --wait
    rtharvest export start --harvest H --destination ARCHIVE --status Complete --status Incomplete --dates keep
    rtharvest export list
    rtharvest export status EXPORT_ID
    rtharvest export wait EXPORT_ID
    rtharvest export cancel EXPORT_ID

Like the other commands: a summary, ``--json`` for the server's document, and the exit codes of
:mod:`rtharvest.cli.util` (``wait``: 0 Completed, 5 VerificationFailed or instances failed, 6 Failed or
Cancelled).
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from collections.abc import Callable
from typing import IO, Any

from ..cli.util import (
    EXIT_CODES_HELP,
    EXIT_FAILURES,
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Client,
    CliError,
    Parser,
    dump,
    examples,
    positive,
    table,
)

__all__ = ["add_parser"]

#: States after which an export changes no more.
FINAL = ("Completed", "HeldBack", "VerificationFailed", "Failed", "Cancelled")


def _path(export_id: str, suffix: str = "") -> str:
    return "/rtharvest/exports/" + urllib.parse.quote(export_id, safe="") + suffix


def _progress(doc: dict[str, Any]) -> str:
    p = doc.get("Progress") or {}
    text = (f"{doc.get('State')}: {p.get('InstancesSent', 0)} of {p.get('InstancesTotal', 0)} instances sent, "
            f"{p.get('InstancesFailed', 0)} failed, {p.get('InstancesVerified', 0)} verified, "
            f"{p.get('PlansSelected', 0)} plan(s)")
    check = doc.get("PreSendCheck") or {}
    if check.get("FindingsCount"):
        text += (f"; before sending: {check.get('InstancesCleaned', 0)} instance(s) cleaned, "
                 f"{check.get('InstancesHeld', 0)} held back")
    verification = doc.get("Verification")
    if verification:
        text += (f"; verification {'passed' if verification.get('Passed') else 'FAILED'} "
                 f"({verification.get('AbsentCount', 0)} absent, {len(verification.get('ManifestDifferences', []))}"
                 f" manifest difference(s), {verification.get('PhiHitCount', 0)} PHI hit(s))")
    return text


def body_of(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /rtharvest/exports`` body the options describe."""
    body: dict[str, Any] = {"Harvest": args.harvest, "Destination": args.destination}
    filters = {name: values for name, values in (("Status", args.status), ("PlanIntent", args.intent),
                                                 ("PlanUIDs", args.plan), ("PatientIDs", args.patient)) if values}
    if filters and args.plans:
        raise CliError("--plans and the filters (--status, --intent, --plan, --patient) exclude each other",
                       EXIT_USAGE)
    body["Plans"] = filters or args.plans or "Complete"
    profile: dict[str, Any] = {}
    if args.dates:
        profile["Dates"] = args.dates
    if args.descriptors:
        profile["Descriptors"] = args.descriptors
    if args.on_phi:
        profile["OnPhiFound"] = args.on_phi
    if args.retain_institution:
        profile["RetainInstitutionIdentity"] = True
    if args.retain_patient_characteristics:
        profile["RetainPatientCharacteristics"] = True
    if profile:
        body["Profile"] = profile
    if args.label:
        body["Label"] = args.label
    return body


def wait(client: Client, export_id: str, timeout: float | None, interval: float, out: IO[str], as_json: bool,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """Poll until the export reaches a final state: 0 Completed with nothing failed, 5 VerificationFailed or
    instances failed, 6 Failed or Cancelled."""
    deadline = None if timeout is None else clock() + timeout
    last = ""
    while True:
        doc = client.json("GET", _path(export_id))
        line = _progress(doc)
        if line != last:
            print(line, file=out, flush=True)
            last = line
        if doc.get("State") in FINAL:
            break
        if deadline is not None and clock() >= deadline:
            raise CliError(f"export {export_id} is still {doc.get('State')} after {timeout:g} s", EXIT_TIMEOUT)
        sleep(interval)
    if as_json:
        dump(doc, out)
    state = doc.get("State")
    errors = "; ".join(doc.get("Errors") or []) or f"see rtharvest export status {export_id}"
    if state in ("Failed", "Cancelled"):
        raise CliError(f"export {export_id} ended {state}: {errors}", EXIT_NOT_COMPLETED)
    failed = int((doc.get("Progress") or {}).get("InstancesFailed", 0))
    if state != "Completed" or failed:
        raise CliError(f"export {export_id} completed with failures ({state}, {failed} instance(s) failed): "
                       f"{errors}", EXIT_FAILURES)
    return EXIT_OK


def cmd_export(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """``export start|status|list|wait|cancel``."""
    if args.export_action == "start":
        answer = client.json("POST", "/rtharvest/exports", body=body_of(args))
        if args.json:
            dump(answer, out)
        else:
            print(answer.get("ID"), file=out)
        if args.wait:
            return wait(client, str(answer.get("ID")), args.timeout_wait, args.interval, out, args.json)
        return EXIT_OK
    if args.export_action == "list":
        docs = client.json("GET", "/rtharvest/exports", {"limit": args.limit})
        if args.json:
            dump(docs, out)
            return EXIT_OK
        rows = []
        for d in docs:
            p = d.get("Progress") or {}
            rows.append((d.get("ID"), d.get("State"), d.get("Harvest"), d.get("Destination"), d.get("CreatedAt"),
                         f"{p.get('InstancesSent', 0)} of {p.get('InstancesTotal', 0)}", p.get("InstancesFailed", 0),
                         p.get("InstancesVerified", 0)))
        if not rows:
            print("no exports yet (start one with: rtharvest export start --harvest ID --destination NAME)", file=out)
            return EXIT_OK
        table(rows, ("ID", "STATE", "HARVEST", "DESTINATION", "CREATED", "SENT", "FAILED", "VERIFIED"), out)
        return EXIT_OK
    if args.export_action == "wait":
        return wait(client, args.id, args.timeout_wait, args.interval, out, args.json)
    if args.export_action == "cancel":
        answer = client.json("POST", _path(args.id, "/cancel"), body={})
        if args.json:
            dump(answer, out)
        else:
            print(f"{answer.get('ID')}: {answer.get('State')}", file=out)
        return EXIT_OK
    doc = client.json("GET", _path(args.id))
    if args.json:
        dump(doc, out)
    else:
        print(f"Export {doc.get('ID')} of harvest {doc.get('Harvest')} to {doc.get('Destination')} "
              f"({doc.get('DestinationKind')}), site {doc.get('Site')}", file=out)
        print(f"  {_progress(doc)}", file=out)
        for error in doc.get("Errors") or []:
            print(f"  error: {error}", file=out)
    return EXIT_OK


def add_parser(sub: Any, json_parent: Parser) -> None:
    """Add ``export`` to the ``rtharvest`` sub-commands (``json_parent`` gives each action ``--json``)."""
    js = [json_parent]
    e = sub.add_parser("export", help="de-identified export of a harvest's plans to a research archive",
                       epilog=examples(
                           "rtharvest export start --harvest 0123456789abcdef --destination RESEARCH --wait",
                           "rtharvest export start --harvest 0123456789abcdef --destination RESEARCH --status Complete "
                           "--status Incomplete --dates keep",
                           "rtharvest export list",
                           "rtharvest export wait EXPORT_ID --timeout 3600") + "\n\n" + EXIT_CODES_HELP)
    es = e.add_subparsers(dest="export_action", required=True, metavar="ACTION", parser_class=Parser)
    start = es.add_parser("start", parents=js, help="start an export (prints its ID)")
    start.add_argument("--harvest", required=True, metavar="ID")
    start.add_argument("--destination", required=True, metavar="NAME",
                       help="a DicomModalities entry (C-STORE), a DICOMweb server (STOW-RS) or an export folder "
                            "(GET /rtharvest/destinations lists them)")
    start.add_argument("--plans", choices=("Complete", "All"), help="which plans (default Complete)")
    start.add_argument("--status", action="append", help="filter: plan status (repeatable)")
    start.add_argument("--intent", action="append", help="filter: PlanIntent (repeatable)")
    start.add_argument("--plan", action="append", metavar="UID", help="filter: plan UID (repeatable)")
    start.add_argument("--patient", action="append", metavar="ID", help="filter: PatientID (repeatable)")
    start.add_argument("--dates", choices=("shift", "keep", "remove"), help="date option (default shift)")
    start.add_argument("--descriptors", choices=("keep", "clean"), help="RT descriptors (default keep)")
    start.add_argument("--on-phi", choices=("clean", "hold"),
                       help="an identifying value found in kept text before sending: clean it out (default) or "
                            "hold the object back")
    start.add_argument("--retain-institution", action="store_true")
    start.add_argument("--retain-patient-characteristics", action="store_true")
    start.add_argument("--label")
    start.add_argument("--wait", action="store_true", help="then wait until it ends (like export wait)")
    start.add_argument("--wait-timeout", dest="timeout_wait", type=positive, help="give up waiting after SECONDS")
    start.add_argument("--interval", type=positive, default=2.0, help="seconds between polls (default 2)")
    ls = es.add_parser("list", parents=js, help="exports, newest first")
    ls.add_argument("--limit", type=int, default=100)
    for action, text in (("status", "one export's progress and verification"), ("cancel", "stop an export")):
        c = es.add_parser(action, parents=js, help=text)
        c.add_argument("id", metavar="ID")
    w = es.add_parser("wait", parents=js, help="wait until an export ends (exit 0 Completed, 5 completed with "
                                               "failures, 6 Failed or Cancelled)")
    w.add_argument("id", metavar="ID")
    w.add_argument("--timeout", dest="timeout_wait", type=positive, help="give up after SECONDS (exit 4)")
    w.add_argument("--interval", type=positive, default=2.0, help="seconds between polls (default 2)")
    e.set_defaults(func=cmd_export)

#!/usr/bin/env python3
"""The long version of tests/reliability: a bigger clinic, many more kills, faults and bad inputs.

Not run in CI. Starts its own servers on loopback (a plain Orthanc source, fault-injecting SCPs, the
harvester through the same launcher as users) and prints these figures::

    .venv/bin/python tools/soak.py                      # 20 patients, 40 kills, ~10 minutes
    .venv/bin/python tools/soak.py --patients 60 --kills 150 --rounds 3 --seed 7

Phases, repeated ``--rounds`` times on fresh harvester stores:

1. **kills** — one harvest of the whole clinic, SIGKILLed at ``--kills`` points (state-observed and seeded
   random, tests/reliability/helpers.py) and restarted each time; then the store must equal the ground truth.
2. **faults** — the source is killed and restarted mid-move while a harvest runs, and fault SCPs (refused
   associations, A7xx/Cxxx statuses, silence) are harvested beside it; the healthy harvest must be exact.
3. **bad input** — the generated corpus (tests/reliability/badinput.py) is stored into the harvester; it must
   stay up and a harvest afterwards must still be exact.

``--minutes M`` runs the **operations** soak instead, for about M minutes (figures: docs/operations.md,
"The soak run"): the harvester's index in a PostgreSQL cluster of its own, an export destination (a
folder) and a schedule that fires during the run; cycle after cycle, a harvest of the whole clinic on a
new store and database meets, at random moments, a SIGKILL of Orthanc, a PostgreSQL outage (stopped for
``--outage-seconds``, then started again) and an outage of the source (killed, then started again). While
each outage lasts the status route must answer within 5 s and name it (``Health``: ``StoreIndex`` or the
source ``Down``); afterwards the store must equal the ground truth, every failed job must carry a fault
class, and the harvest is exported::

    .venv/bin/python tools/soak.py --minutes 5             # a short run to see it work
    .venv/bin/python tools/soak.py --minutes 60 --patients 20

Exit status 0 only when no object was lost, nothing extra was collected and every fault was named.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rtharvest.edge.launcher import free_port  # noqa: E402
from rtharvest.edge.postgres import parse_url  # noqa: E402
from rtharvest.synth.generator import SynthOptions, generate  # noqa: E402
from rtharvest.synth.groundtruth import Window  # noqa: E402
from rtharvest.synth.loader import dicom_files, store_to_scp  # noqa: E402
from tests.conftest import Clinic, start_harvester  # noqa: E402
from tests.dimse.fault_scp import Fault, FaultScp  # noqa: E402
from tests.harvesting import start_harvest, stored_sop_uids, wait_completed  # noqa: E402
from tests.reliability.badinput import byte_variants, dataset_variants, load_bases  # noqa: E402
from tests.reliability.helpers import harvest_with_kills, kill_schedule, leased_kinds, queue_db  # noqa: E402
from tests.reliability.test_bad_input import Sender  # noqa: E402
from tests.servers import (  # noqa: E402
    LOCALHOST,
    DicomSource,
    PostgresCluster,
    RestClient,
    start_orthanc_source,
    start_postgres,
)

SOURCE = "ORTHANC_SRC"


class Figures:
    def __init__(self) -> None:
        self.kills = 0
        self.kill_points: dict[str, int] = {}
        self.source_kills = 0
        self.faults = 0
        self.bad_inputs = 0
        self.orthanc_crashes = 0
        self.harvests = 0
        self.lost = 0
        self.extra = 0
        self.postgres_outages = 0
        self.source_outages = 0
        self.faults_named = 0
        self.faults_unnamed: list[str] = []
        self.exports = 0
        self.schedule_runs = 0
        self.slowest_status_s = 0.0

    def check(self, clinic: Clinic, window: Window, what: str) -> None:
        stored = set(stored_sop_uids(clinic.api))
        lost = set(window.expected) - stored
        extra = stored & set(window.forbidden)
        self.harvests += 1
        self.lost += len(lost)
        self.extra += len(extra)
        state = "exact" if not lost and not extra else f"{len(lost)} LOST, {len(extra)} EXTRA"
        print(f"  {what}: {len(stored)} stored, {state}", flush=True)

    def report(self) -> None:
        print("\n== soak figures ==")
        points = ", ".join(f"{k}: {v}" for k, v in sorted(self.kill_points.items()))
        print(f"kills survived:        {self.kills}  ({points})")
        print(f"source kills survived: {self.source_kills}")
        print(f"faults injected:       {self.faults}  (failed attempts against faulty sources)")
        print(f"bad inputs tried:      {self.bad_inputs}  (Orthanc core crashes on them, restarted: "
              f"{self.orthanc_crashes})")
        print(f"harvests checked:      {self.harvests}")
        print(f"objects lost:          {self.lost}")
        print(f"forbidden collected:   {self.extra}")
        if self.postgres_outages or self.source_outages:
            print(f"PostgreSQL outages:    {self.postgres_outages}")
            print(f"source outages:        {self.source_outages}")
            print(f"exports completed:     {self.exports}")
            print(f"schedule runs:         {self.schedule_runs}")
            print(f"faults named:          {self.faults_named}")
            print(f"faults NOT named:      {len(self.faults_unnamed)}  {self.faults_unnamed[:5]}")
            print(f"slowest status answer: {self.slowest_status_s:.2f} s (during outages included)")


def phase_kills(clinic: Clinic, window: Window, rng: random.Random, kills: int, fig: Figures) -> None:
    """Harvests on fresh stores, each killed at seeded points, until ``kills`` kills were survived."""
    done = 0
    while done < kills:
        clinic.restart_harvester(fresh=True)
        points = kill_schedule(rng, max(3, min(kills - done, rng.randint(10, 25))), max_delay=1.5)
        run = harvest_with_kills(clinic, window, SOURCE, points)
        wait_completed(clinic.api, run.harvest_id, deadline_s=3600)
        for name in run.kills + run.missed:
            key = name if "after restart" not in name else "random delay"
            fig.kill_points[key] = fig.kill_points.get(key, 0) + 1
        n = len(run.kills) + len(run.missed)
        done += n
        fig.kills += n
        fig.check(clinic, window, f"harvest under {n} kills")


def phase_faults(clinic: Clinic, window: Window, fig: Figures) -> None:
    record = __import__("tests.reliability.test_source_faults", fromlist=["_record_answer"])._record_answer()
    faults = {"S_REFUSE": Fault(reject=True), "S_FIND_A7": Fault(find_status=0xA700),
              "S_MOVE_A7": Fault(find_answers=[record], move_status=0xA702),
              "S_MOVE_C0": Fault(find_answers=[record], move_status=0xC001),
              "S_SILENT": Fault(delay=60, ignore_cancel=True)}
    scps = {n: FaultScp(f, aet=n.replace("_", "")).start() for n, f in faults.items()}
    try:
        extra = {n: DicomSource(n, s.aet, s.port, "fault") for n, s in scps.items()}
        settings = {f"RtHarvest.Sources.{n}": {"Backend": "pynetdicom" if i % 2 else "orthanc", "FindTimeout": 1,
                                               "MoveTimeout": 2} for i, n in enumerate(faults)}
        clinic.restart_harvester(fresh=True, extra_sources=extra, overrides=settings)
        faulty = [clinic.api.post("/rtharvest/harvests", {"Source": n, "From": "19000101", "To": "20991231"})["ID"]
                  for n in faults]
        healthy = start_harvest(clinic.api, window, SOURCE)
        source = clinic.sources[SOURCE]
        assert source.orthanc is not None
        path = queue_db(clinic)
        for _ in range(3):  # kill the source mid-move a few times
            deadline = time.monotonic() + 20
            while not leased_kinds(path, healthy) & {"RetrieveSeries", "RetrieveInstance"}:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            else:
                source.orthanc.kill()
                time.sleep(2)
                source.orthanc.start()
                fig.source_kills += 1
        wait_completed(clinic.api, healthy, deadline_s=3600)
        for harvest_id in faulty:
            wait_completed(clinic.api, harvest_id, deadline_s=600)
            fig.faults += sum(j["Attempts"] for j in clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}"))
        # The source's own unreachability counts too.
        jobs = clinic.api.get(f"/rtharvest/jobs?harvest={healthy}&limit=10000")
        fig.faults += sum(max(0, j["Attempts"] - 1) for j in jobs)
        fig.check(clinic, window, f"healthy harvest beside {len(faults)} faulty sources, "
                  f"{fig.source_kills} source kills")
    finally:
        for scp in scps.values():
            scp.stop()


def phase_bad_input(clinic: Clinic, window: Window, out: Path, rng: random.Random, fig: Figures) -> None:
    clinic.restart_harvester(fresh=True)
    bases = load_bases(dicom_files(out))
    variants = list(dataset_variants(bases)) + list(byte_variants(bases, rng, per_base=120))
    sender = Sender(clinic, clinic.sources[SOURCE].aet, {str(ds.SOPClassUID) for ds, _ in bases.values()})
    try:
        for variant in variants:
            fig.bad_inputs += 1
            try:
                sender.send(variant)
            except OSError:
                # Orthanc 1.10.1 itself (DCMTK parsing a REST upload, before any plugin code runs) segfaults on
                # some corrupted files; a plain Orthanc without the plugin does too. Count it, keep the input,
                # restart on the same store and queue, and go on: the harvest afterwards must still be exact.
                proc = clinic.harvester.process
                try:
                    if proc is None or proc.wait(10) is None:
                        raise
                except subprocess.TimeoutExpired:
                    raise OSError("the harvester stopped answering but did not exit") from None
                kept = clinic.base / f"orthanc-crash-{fig.orthanc_crashes}.dcm"
                kept.write_bytes(variant.raw or b"")
                fig.orthanc_crashes += 1
                print(f"  Orthanc crashed on {variant.name!r} (exit {proc.returncode}); input kept in {kept}")
                clinic.restart_harvester(fresh=False)
                sender.assoc = None
    finally:
        sender.close()
    proc = clinic.harvester.process
    assert proc is not None and proc.poll() is None, "the harvester died under bad input"
    harvest_id = start_harvest(clinic.api, window, SOURCE)
    wait_completed(clinic.api, harvest_id, deadline_s=3600)
    stored = set(stored_sop_uids(clinic.api))
    lost = set(window.expected) - stored
    fig.harvests += 1
    fig.lost += len(lost)
    fig.extra += len(stored & set(window.forbidden))
    print(f"  harvest after {len(variants)} bad inputs: {len(lost)} lost", flush=True)


#: The status route must answer within this during an outage (it reads the plugin's own database only).
STATUS_DEADLINE_S = 5.0


def _status(clinic: Clinic, fig: Figures) -> dict:
    started = time.monotonic()
    code, body = clinic.api.request("GET", "/rtharvest/status", timeout=STATUS_DEADLINE_S)
    fig.slowest_status_s = max(fig.slowest_status_s, time.monotonic() - started)
    if code != 200:
        raise RuntimeError(f"GET /rtharvest/status -> {code}: {body}")
    return dict(body)


def _named(clinic: Clinic, fig: Figures, what: str, check: object, deadline_s: float = 60.0) -> None:
    """Poll the status route until ``check(health)`` is true: the fault is named; else record it unnamed."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            health = _status(clinic, fig).get("Health", {})
        except (OSError, RuntimeError) as exc:  # a status answer slower than the deadline counts as not named
            print(f"  status route: {exc}", flush=True)
            health = {}
        if health and check(health):  # type: ignore[operator]
            fig.faults_named += 1
            print(f"  named: {what}", flush=True)
            return
        time.sleep(1.0)
    fig.faults_unnamed.append(what)
    print(f"  NOT NAMED within {deadline_s:.0f} s: {what}", flush=True)


def _wait_stored(clinic: Clinic, at_least: int, deadline_s: float = 300.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if clinic.api.get("/statistics")["CountInstances"] >= at_least:
                return True
        except (OSError, AssertionError):
            pass
        time.sleep(0.2)
    return False


def phase_operations(clinic: Clinic, window: Window, postgres: PostgresCluster, out: Path, minutes: float,
                     outage_s: float, rng: random.Random, fig: Figures) -> None:
    """Cycles of a harvest under an Orthanc kill, a PostgreSQL outage and a source outage, then an export,
    until ``minutes`` have passed; a schedule created at the start fires during the run."""
    end = time.monotonic() + minutes * 60
    source = clinic.sources[SOURCE]
    assert source.orthanc is not None
    cycle = 0
    while cycle == 0 or time.monotonic() < end:
        cycle += 1
        target = parse_url(postgres.create_database(f"soak{cycle}"))
        clinic.restart_harvester(fresh=True, overrides={
            "PostgreSQL": target.section(), "RtHarvest.OutageBackoffMaxSeconds": 10,
            "RtHarvest.Export": {"Folders": {"OUT": str(out / f"export{cycle}")}}})
        # A schedule (in this cycle's queue) whose slot comes in a minute or two (UTC): its run fires while
        # the faults below happen, and must complete like any harvest.
        at = time.gmtime(time.time() + 90)
        clinic.api.post("/rtharvest/schedules", {"Name": "soak", "Source": SOURCE, "At": f"{at.tm_hour:02d}:"
                                                 f"{at.tm_min:02d}", "TimeZone": "UTC",
                                                 "From": window.date_from or "20100101"})
        harvest_id = start_harvest(clinic.api, window, SOURCE)
        print(f"cycle {cycle}: harvest {harvest_id} on database soak{cycle}", flush=True)
        expected = len(window.expected)
        faults = ["kill", "postgres", "source"]
        rng.shuffle(faults)
        for step, fault in enumerate(faults, 1):
            if not _wait_stored(clinic, expected * step // (len(faults) + 1)):
                print(f"  ({fault}: the harvest had already stored what it could)", flush=True)
            if fault == "kill":
                clinic.harvester.kill()
                clinic.restart_harvester(fresh=False)
                fig.kills += 1
                print("  Orthanc killed and restarted", flush=True)
            elif fault == "postgres":
                postgres.halt()
                fig.postgres_outages += 1
                try:
                    _named(clinic, fig, f"PostgreSQL outage (cycle {cycle})",
                           lambda h: h.get("StoreIndex", {}).get("State") == "Unavailable")
                    time.sleep(max(0.0, outage_s - 10))  # the outage lasts; status is read meanwhile
                    _status(clinic, fig)
                finally:
                    postgres.resume()
            else:
                source.orthanc.kill()
                fig.source_outages += 1
                try:
                    _named(clinic, fig, f"source outage (cycle {cycle})",
                           lambda h: h.get("Sources", {}).get(SOURCE, {}).get("State") == "Down")
                    time.sleep(max(0.0, outage_s - 10))
                finally:
                    source.orthanc.start()
        wait_completed(clinic.api, harvest_id, deadline_s=3600)
        fig.check(clinic, window, f"cycle {cycle}: harvest under a kill and two outages")
        failed = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&state=failed&limit=10000")
        unnamed = [j["ID"] for j in failed if not j.get("FaultClass")]
        if unnamed:
            fig.faults_unnamed.append(f"cycle {cycle}: failed jobs without FaultClass {unnamed[:5]}")
        export = clinic.api.post("/rtharvest/exports", {"Harvest": harvest_id, "Destination": "OUT"})
        deadline = time.monotonic() + 600
        while (state := clinic.api.get(f"/rtharvest/exports/{export['ID']}")["State"]) == "Running":
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        fig.exports += state == "Completed"
        print(f"  export {export['ID']}: {state}", flush=True)
        deadline = time.monotonic() + 300
        runs: list = []
        while time.monotonic() < deadline:
            runs = clinic.api.get("/rtharvest/schedules/soak")["Runs"]
            if runs and runs[-1]["State"] in ("Completed", "Cancelled"):
                break
            time.sleep(2.0)
        if runs and runs[-1]["State"] == "Completed":
            fig.schedule_runs += 1
            print(f"  schedule run {runs[-1]['Harvest']} ({runs[-1]['From']}-{runs[-1]['To']}): Completed",
                  flush=True)
        else:
            fig.faults_unnamed.append(f"cycle {cycle}: the schedule's run did not complete: {runs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--minutes", type=float, default=None,
                        help="run the operations soak (PostgreSQL index, schedule, exports, kills, outages) "
                             "for about this long instead of the rounds")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="how long each outage lasts")
    args = parser.parse_args(argv)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="rtharvest-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    what = (f"operations for {args.minutes:g} min" if args.minutes is not None
            else f"{args.kills} kills x {args.rounds} round(s)")
    print(f"soak: {args.patients} patients, {what}, seed {args.seed}, in {base}")
    truth = generate(base / "clinic", SynthOptions(patients=args.patients, seed=args.seed))
    window = truth.window("all")
    harvest_port = free_port()
    source = start_orthanc_source(base / "source", harvest_port)
    clinic: Clinic | None = None
    fig = Figures()
    try:
        files = dicom_files(base / "clinic")
        assert store_to_scp(files, LOCALHOST, source.port, source.aet) == len(files)
        harvester = start_harvester(base / "harvester", harvest_port, {SOURCE: source})
        clinic = Clinic(harvester, RestClient(harvester.url, harvester.credentials), {SOURCE: source}, base)
        if args.minutes is not None:
            postgres = start_postgres()
            try:
                phase_operations(clinic, window, postgres, base, args.minutes, args.outage_seconds, rng, fig)
            finally:
                clinic.harvester.stop()
                postgres.stop()
            return 0 if fig.lost == 0 and fig.extra == 0 and not fig.faults_unnamed else 1
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}:", flush=True)
            phase_kills(clinic, window, rng, args.kills, fig)
            phase_faults(clinic, window, fig)
            phase_bad_input(clinic, window, base / "clinic", rng, fig)
    finally:
        if clinic is not None:
            clinic.harvester.stop()
        source.stop()
        fig.report()
    return 0 if fig.lost == 0 and fig.extra == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

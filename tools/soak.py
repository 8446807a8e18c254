#!/usr/bin/env python3
"""The long version of tests/reliability: a bigger clinic, many more kills, faults and bad inputs.

Not run in CI. Starts its own servers on loopback (a plain Orthanc source, fault-injecting SCPs, the
harvester through the same launcher as users) and prints the figures issue 8 asks for::

    .venv/bin/python tools/soak.py                      # 20 patients, 40 kills, ~10 minutes
    .venv/bin/python tools/soak.py --patients 60 --kills 150 --rounds 3 --seed 7

Phases, repeated ``--rounds`` times on fresh harvester stores:

1. **kills** — one harvest of the whole clinic, SIGKILLed at ``--kills`` points (state-observed and seeded
   random, tests/reliability/helpers.py) and restarted each time; then the store must equal the ground truth.
2. **faults** — the source is killed and restarted mid-move while a harvest runs, and fault SCPs (refused
   associations, A7xx/Cxxx statuses, silence) are harvested beside it; the healthy harvest must be exact.
3. **bad input** — the generated corpus (tests/reliability/badinput.py) is stored into the harvester; it must
   stay up and a harvest afterwards must still be exact.

Exit status 0 only when no object was lost and nothing extra was collected.
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

from rtharvest.launcher import free_port  # noqa: E402
from rtharvest.synth.generator import SynthOptions, generate  # noqa: E402
from rtharvest.synth.groundtruth import Window  # noqa: E402
from rtharvest.synth.loader import dicom_files, store_to_scp  # noqa: E402
from tests.conftest import Clinic, start_harvester  # noqa: E402
from tests.dimse.fault_scp import Fault, FaultScp  # noqa: E402
from tests.harvesting import start_harvest, stored_sop_uids, wait_completed  # noqa: E402
from tests.reliability.badinput import byte_variants, dataset_variants, load_bases  # noqa: E402
from tests.reliability.helpers import harvest_with_kills, kill_schedule, leased_kinds, queue_db  # noqa: E402
from tests.reliability.test_bad_input import Sender  # noqa: E402
from tests.servers import LOCALHOST, DicomSource, RestClient, start_orthanc_source  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="rtharvest-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(f"soak: {args.patients} patients, {args.kills} kills x {args.rounds} round(s), seed {args.seed}, in {base}")
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

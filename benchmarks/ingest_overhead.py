"""Ingest overhead: C-STORE throughput into Orthanc with the rtharvest plugin loaded vs without it.

A benchmark that prints, not a test:

    .venv/bin/python benchmarks/ingest_overhead.py [--quick] [--instances 300] [--rounds 5] [--baseline DIR]

Two Orthancs run side by side from the same ``docker/orthanc.json`` through the same launcher, one with
the plugin and one without (``plugin=False``: no Python plugin at all); everything else is identical
(ports aside). dcmtk's ``storescu`` (``TCP_NODELAY=1``, one association per run) sends the same
512×512 synthetic instances to each in turn, alternating which goes first; after each run the store is
emptied over REST so that every run stores new instances, and the next run waits until that server is
idle again (its CPU time stops growing): work the plugin defers until arrivals pause runs then, not
during another server's timed run. The figure is the ratio of the median throughputs, i.e. the plugin's
cost on the C-STORE path (goal: ≤ 10 %); the deferred work is in the CPU per instance, which counts
everything each server did over all rounds.

``--baseline DIR``: a third Orthanc loads the plugin from another copy of the package (``DIR/rtharvest``,
e.g. ``git archive main plugin`` unpacked and renamed) and runs in the same rounds, so a change is
measured against the code before it side by side, on the same load.

What the plugin does per instance here is its OnStoredInstance path for an arrival no harvest expects
(read the SOPInstanceUID, look up expectations in SQLite, count it; the header is inspected for problems
on the ingest thread once arrivals pause); an expected arrival is decided on the ingest thread too — that
path is measured in the harvest (harvest_vs_wire.py) and the scale simulation (scale_simulation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_CONFIG, HARVEST_AET, LOCALHOST, OrthancProcess, RestClient, Results, machine

from rtharvest.edge.launcher import plugin_environment
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files

SENDER_AET = "BENCHSCU"


def instances(workdir: Path, count: int) -> list[Path]:
    out = workdir / "clinic-ingest"
    if not (out / "ground_truth.json").exists():
        generate(out, SynthOptions(patients=1, seed=11, ct_slices=100, matrix=512), overwrite=True)
    truth = GroundTruth.from_dict(json.loads((out / "ground_truth.json").read_text()))
    files = dicom_files(out)
    # Mostly images (what dominates a harvest's C-STOREs), plus every RT object of the clinic.
    # (storescu proposes no context for Deformable Spatial Registration: leave those out.)
    rt = [f for f in files if truth.objects[f.stem].modality not in ("CT", "MR", "PT")
          and truth.objects[f.stem].sop_class_uid != "1.2.840.10008.5.1.4.1.1.66.3"]
    images = [f for f in files if truth.objects[f.stem].modality in ("CT", "MR", "PT")]
    chosen = rt[: max(0, count // 10)]
    return chosen + images[: count - len(chosen)]


def store(server: OrthancProcess, files: list[Path]) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    done = subprocess.run(["storescu", "-aet", SENDER_AET, "-aec", HARVEST_AET, LOCALHOST, str(server.dicom_port),
                           *map(str, files)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return seconds


# The OnStoredInstance handler alone, in a plain Python process (no Orthanc, no other load on its thread):
# the CPU time of the calling thread per unexpected arrival is what the C-STORE path pays in Python, apart
# from GetInstanceData's copy and the plugin's thread-state set-up (the same for every version).
_CALLBACK_PROBE = r"""
import json, sys, tempfile, time
from pathlib import Path
from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog
from rtharvest.harvest.ingest import Ingest
from rtharvest.store.jobqueue import JobQueue
from rtharvest.store.tracking import Tracker
files = [Path(p).read_bytes() for p in sys.argv[2:]]
with tempfile.TemporaryDirectory() as tmp:
    db = Database(str(Path(tmp) / "q.sqlite"))
    db.migrate()
    ingest = Ingest(db, JobQueue(db), Tracker(db), EventLog(db), lambda h: None, lambda a: None)
    if hasattr(ingest, "start"):
        ingest.start()  # as the plugin runs it (the harvester starts the ingest thread)
    for i, data in enumerate(files[:20]):
        ingest.on_stored(f"warm-{i}", data, "BENCHSCU")
    cpu = []
    for r in range(int(sys.argv[1])):
        t0 = time.thread_time()
        for i, data in enumerate(files):
            ingest.on_stored(f"{r}-{i}", data, "BENCHSCU")
        cpu.append((time.thread_time() - t0) / len(files))
    if hasattr(ingest, "stop"):
        ingest.stop()
print(json.dumps(cpu))
"""


def callback_cpu_us(files: list[Path], passes: int, env: dict[str, str] | None) -> list[float]:
    """CPU µs per call of the OnStoredInstance handler on its own thread, one figure per pass."""
    done = subprocess.run([sys.executable, "-c", _CALLBACK_PROBE, str(passes), *map(str, files)],
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"callback probe failed: {done.stderr.strip()[-800:]}")
    return [v * 1e6 for v in json.loads(done.stdout.strip().splitlines()[-1])]


def cpu_seconds(server: OrthancProcess) -> float:
    """CPU time (user + system) the server's process has used so far: less sensitive to other load than
    wall time, and it includes work done off the C-STORE path."""
    fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quiesce(server: OrthancProcess, deadline_s: float = 60.0) -> float:
    """Wait until ``server`` is idle (it used < 10 ms of CPU over 0.25 s); returns the seconds waited.

    Work a server defers until arrivals pause (the plugin's header check of unexpected arrivals) then runs
    in its own time instead of during the next server's timed run, where it would slow *that* server: the
    runs measure each server's C-STORE path, and the deferred work is counted in the CPU per instance.
    """
    t0 = time.perf_counter()
    last = cpu_seconds(server)
    while time.perf_counter() - t0 < deadline_s:
        time.sleep(0.25)
        now = cpu_seconds(server)
        if now - last < 0.01:
            break
        last = now
    return time.perf_counter() - t0


def empty(api: RestClient) -> None:
    for patient in api.get("/patients"):
        api.request("DELETE", f"/patients/{patient}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="150 instances, 3 rounds")
    ap.add_argument("--instances", type=int, default=None, help="instances per run (default 300)")
    ap.add_argument("--rounds", type=int, default=None, help="runs per server (default 5)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--baseline", default=None, help="a directory holding another rtharvest package to measure too")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    count = args.instances or (150 if args.quick else 300)
    rounds = args.rounds or (3 if args.quick else 5)
    results = Results("ingest_overhead")
    print(f"== ingest overhead: {count} instances per run, {rounds} runs per server, interleaved ==")
    print(f"machine: {machine()}", flush=True)
    if shutil.which("storescu") is None:
        raise SystemExit("storescu not found: install Debian's dcmtk")
    tmp = tempfile.TemporaryDirectory(prefix="rth-bench-ingest-")
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    servers: dict[str, OrthancProcess] = {}
    try:
        files = instances(workdir, count)
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} instances, {size / 1e6:.0f} MB per run", flush=True)
        sender = {"AET": SENDER_AET, "Host": LOCALHOST, "Port": 1, "AllowEcho": True, "AllowFind": False,
                  "AllowMove": False, "AllowGet": False, "AllowStore": True}
        kinds: list[tuple[str, bool, dict[str, str] | None]] = [("plugin", True, None), ("plain", False, None)]
        base_env: dict[str, str] | None = None
        if args.baseline:
            base = Path(args.baseline).resolve()
            if not (base / "rtharvest" / "__init__.py").is_file():
                raise SystemExit(f"--baseline: {base}/rtharvest is not a package")
            site = plugin_environment()["PYTHONPATH"]
            base_env = {"PYTHONPATH": os.pathsep.join((str(base), site))}
            kinds.append(("baseline", True, base_env))
        for name, plugin, env in kinds:
            run_dir = workdir / f"orthanc-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            servers[name] = OrthancProcess(run_dir, DEFAULT_CONFIG, aet=HARVEST_AET, modalities={"BENCH": sender},
                                           plugin=plugin, env=env).start()
        apis = {name: RestClient(s.url, s.credentials) for name, s in servers.items()}
        for name in ("plugin", "baseline"):
            if name in apis and "Plugin" not in apis[name].get("/rtharvest/status"):
                raise SystemExit(f"the plugin did not load ({name})")
        # One warm-up store each (first-run caches, SQLite files), not counted.
        for name, server in servers.items():
            store(server, files[:20])
            empty(apis[name])
            quiesce(server)
        times: dict[str, list[float]] = {name: [] for name in servers}
        cpu0 = {name: cpu_seconds(server) for name, server in servers.items()}
        for r in range(rounds):
            names = list(servers)
            order = names[r % len(names):] + names[:r % len(names)]  # each goes first in turn
            for name in order:
                seconds = store(servers[name], files)
                stored = apis[name].get("/statistics")["CountInstances"]
                if stored != len(files):
                    raise SystemExit(f"{name}: {stored} of {len(files)} stored")
                times[name].append(seconds)
                empty(apis[name])
                quiesce(servers[name])
            print(f"round {r + 1}: " + ", ".join(f"{name} {len(files) / times[name][-1]:6.1f} inst/s"
                                                 for name in servers)
                  + f"; plugin cost this round {1 - times['plain'][-1] / times['plugin'][-1]:.1%}", flush=True)
        for server in servers.values():
            quiesce(server)  # work deferred until arrivals pause (the plugin's inspection) is counted too
        cpu_ms = {name: (cpu_seconds(server) - cpu0[name]) * 1000 / (rounds * len(files))
                  for name, server in servers.items()}
        arrivals = apis["plugin"].get("/rtharvest/status").get("Arrivals")
        rate = {name: len(files) / statistics.median(t) for name, t in times.items()}
        with_plugin, without = rate["plugin"], rate["plain"]
        costs = sorted(1 - p / q for p, q in zip(times["plain"], times["plugin"], strict=True))
        print("\n-- figures --")
        print(f"  with plugin {with_plugin:.1f} inst/s ({with_plugin * size / len(files) / 1e6:.1f} MB/s), without "
              f"{without:.1f} inst/s ({without * size / len(files) / 1e6:.1f} MB/s); median of {rounds}; "
              f"plugin counted {arrivals} arrivals; per-round cost {costs[0]:.1%} .. {costs[-1]:.1%}")
        results.add("instances", len(files))
        results.add("with_plugin_per_s", round(with_plugin, 1))
        results.add("without_plugin_per_s", round(without, 1))
        results.add("rounds", rounds)
        print("  Orthanc CPU per instance (store + delete, whole run): "
              + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu_ms.items())
              + "; plugin adds " + ", ".join(f"{name} {cpu_ms[name] - cpu_ms['plain']:+.2f} ms"
                                            for name in cpu_ms if name != "plain"))
        for name, ms in cpu_ms.items():
            results.add(f"cpu_ms_per_instance_{name}", round(ms, 3))
        results.add("per_round_cost_min_max", [round(costs[0], 3), round(costs[-1], 3)])
        if "baseline" in rate:
            base_costs = sorted(1 - p / q for p, q in zip(times["plain"], times["baseline"], strict=True))
            print(f"  baseline plugin {rate['baseline']:.1f} inst/s: cost {1 - rate['baseline'] / without:.1%} "
                  f"(per round {base_costs[0]:.1%} .. {base_costs[-1]:.1%})")
            results.add("baseline_per_s", round(rate["baseline"], 1))
            results.add("baseline_cost", round(1 - rate["baseline"] / without, 3))
        probes = {"plugin": callback_cpu_us(files, rounds, None)}
        if base_env is not None:
            probes["baseline"] = callback_cpu_us(files, rounds, base_env)
        print("  OnStoredInstance handler alone, CPU of its thread per unexpected arrival: " + ", ".join(
            f"{name} median {statistics.median(v):.0f} µs ({min(v):.0f}..{max(v):.0f})" for name, v in probes.items()))
        for name, v in probes.items():
            results.add(f"callback_cpu_us_{name}", round(statistics.median(v)))
        results.goal("plugin cost (1 - with/without)", 1 - with_plugin / without, 0.10, "{:.1%}",
                     bound="OnStoredInstance work per instance (see README profile)")
        results.write(args.json)
    finally:
        for server in servers.values():
            server.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""Scale: a metadata-only clinic of ~6,000 patients / ~14,000 plans through the real planner and durable queue.

A benchmark that prints, not a test:

    .venv/bin/python benchmarks/scale_simulation.py [--quick] [--patients 6000] [--slices 2]

No network, no Orthanc. The clinic is the synthetic generator's (``rtharvest.synth``), made light and
large here without touching the generator: one template clinic (13 RT patients, the QA phantom and the
non-RT patient, every trap; 8×8 images, ``--slices`` per image series) is generated, and copied until
it has the requested number of patients, each copy with its own UIDs and patient IDs (rewritten in the
serialised bytes with same-length substitutions, then parsed lazily by pydicom). An in-process
:class:`rtharvest.synth.simulation.FakeSource` (relational, instance return keys) answers C-FIND/C-MOVE from
those datasets.

The harvest of the whole clinic (the template's ``all`` window, which spans every record date) runs the
way the plugin runs it, minus the network: jobs live in the real :class:`rtharvest.store.jobqueue.JobQueue`
on a temporary SQLite file (WAL, synchronous=NORMAL); a worker claims a job, runs its operation with
:func:`rtharvest.core.strategies.execute` against the fake source, every arrival is decided by
:func:`rtharvest.core.planner.plan_arrival` and its follow-up operations are enqueued in their own
transaction (as ingest does, deduplicated by the queue), and the job is completed. Printed: total time,
jobs/s, arrivals/s, peak memory (``ru_maxrss`` of this process, which also holds the whole fake clinic),
queue database size, and a check that the collected set equals the copies of the ground truth.
Goal: the whole clinic in ≤ 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from _common import Results, machine

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import operation_from_dict
from rtharvest.core.planner import Arrival, HarvestContext, plan_arrival, start_operations
from rtharvest.core.strategies import QueryLevel, SourceCapability, execute
from rtharvest.store.db import Database
from rtharvest.store.jobqueue import EnqueueItem, JobQueue, SourceLimits
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.simulation import FakeSource

SOURCE = "FAKE"
UID = re.compile(rb"2\.25\.\d{8,}")
CAPABILITY = SourceCapability(relational=True, sequence_return_keys=False, instance_return_keys=True)
PRIORITY = {"FindTreatmentRecords": 0, "RetrieveInstance": 20, "FindReferencing": 10, "RetrieveSeries": 15,
            "FindSeriesInFrameOfReference": 5}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_clinic(workdir: Path, patients: int, plans: int,
                 slices: int) -> tuple[list[pydicom.Dataset], dict[str, Any], int, int, int]:
    """(datasets, template window, copies, patients, plans) of a clinic of at least ``patients`` patients."""
    template = workdir / "template"
    generate(template, SynthOptions(patients=13, seed=1, ct_slices=slices, matrix=8), overwrite=True)
    truth = json.loads((template / "ground_truth.json").read_text())
    objects = truth["Objects"]
    pids = sorted({o["PatientID"] for o in objects.values()})
    per_copy_plans = sum(1 for o in objects.values() if o["Modality"] == "RTPLAN")
    # Enough copies for both figures (the template has fewer plans per patient than the paper's clinic).
    copies = max(math.ceil(patients / len(pids)), math.ceil(plans / per_copy_plans))
    # Same-length patient IDs per copy: the bytes are rewritten in place, so lengths must not change.
    raw = [(template / o["Path"]).read_bytes() for o in objects.values()]
    datasets: list[pydicom.Dataset] = []
    for k in range(copies):
        tag = b"%04d" % k
        # Template IDs are at least 6 characters: 4 digits of copy + 2 of patient, padded to the old length.
        pid_map = {p.encode(): (tag + b"%02d" % i).ljust(len(p), b"X") for i, p in enumerate(pids)}
        for data in raw:
            data = UID.sub(lambda m, t=tag: m.group(0)[:-4] + t, data)
            for old, new in pid_map.items():
                data = data.replace(old, new)
            datasets.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))
    window = next(w for w in truth["Windows"] if w["Name"] == "all")
    return datasets, window, copies, copies * len(pids), copies * per_copy_plans


def run(queue: JobQueue, source: FakeSource, window: HarvestWindow, workers: int) -> dict[str, int]:
    harvest = queue.create_harvest(SOURCE, "scale")
    ctx = HarvestContext(window, harvest.id)

    def item(op: Any) -> EnqueueItem:
        return EnqueueItem(harvest.id, op.kind.value, SOURCE, op.to_dict(), op.dedupe_key(),
                           PRIORITY.get(op.kind.value, 0))

    queue.enqueue_many(item(op) for op in start_operations(ctx))
    counts = {"jobs": 0, "arrivals": 0, "kept": 0, "enqueue_tx": 0}
    collected: set[str] = set()
    lock = threading.Lock()

    def worker(n: int) -> None:
        owner = f"sim:{n}"
        idle = 0
        while True:
            job = queue.claim(owner, 300)
            if job is None:
                if queue.is_harvest_finished(harvest.id) or idle > 200:
                    return
                idle += 1
                time.sleep(0.005)
                continue
            idle = 0
            op = operation_from_dict(job.payload)
            arrivals: list[tuple[str, bool]] = []

            def retrieve(level: QueryLevel, ident: dict[str, Any], candidate: bool,
                         arrivals: list[tuple[str, bool]] = arrivals) -> None:
                arrivals.extend((uid, candidate) for uid in source.retrieve(level, ident))

            execute(op, CAPABILITY, source.find, retrieve)
            for uid, candidate in arrivals:
                decision = plan_arrival(Arrival(source.refs(uid), op, candidate), ctx)
                if decision.operations:
                    queue.enqueue_many(item(o) for o in decision.operations)
                with lock:
                    counts["arrivals"] += 1
                    counts["enqueue_tx"] += bool(decision.operations)
                    if decision.keep:
                        collected.add(uid)
            queue.complete(job.id, owner, note=f"{len(arrivals)} arrivals")
            with lock:
                counts["jobs"] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts["kept"] = len(collected)
    counts["collected_set"] = collected  # type: ignore[assignment]
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="600 patients / 1,400 plans")
    ap.add_argument("--patients", type=int, default=None, help="default 6000 (quick: 600)")
    ap.add_argument("--plans", type=int, default=None, help="at least this many plans (default 14000; quick 1400)")
    ap.add_argument("--slices", type=int, default=2, help="slices per image series (default 2: metadata only)")
    ap.add_argument("--workers", type=int, default=2, help="worker threads (default 2, one per core)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    patients = args.patients or (600 if args.quick else 6000)
    plans = args.plans or (1400 if args.quick else 14000)
    results = Results("scale_simulation")
    print(f"== scale simulation: >= {patients:,} patients and >= {plans:,} plans, {args.slices} slices/series, "
          f"{args.workers} workers ==")
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rth-bench-scale-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        datasets, window, copies, n_patients, n_plans = build_clinic(workdir, patients, plans, args.slices)
        source = FakeSource(datasets, CAPABILITY)
        del datasets
        t_build = time.perf_counter() - t0
        template_expected = len(window["Expected"])
        print(f"clinic: {n_patients:,} patients, {n_plans:,} plans, {len(source.instances):,} objects "
              f"({copies} copies of a {n_patients // copies}-patient template), built in {t_build:.1f} s, "
              f"RSS {rss_mb():,.0f} MB", flush=True)
        db_path = workdir / "queue.sqlite"
        db = Database(str(db_path))
        queue = JobQueue(db, default_limits=SourceLimits(max_concurrent=args.workers))
        hw = HarvestWindow.from_dict(window)
        t0 = time.perf_counter()
        counts = run(queue, source, hw, args.workers)
        seconds = time.perf_counter() - t0
        db.close()
        size = sum(os.path.getsize(p) for p in workdir.glob("queue.sqlite*"))
        collected = counts.pop("collected_set")  # type: ignore[arg-type]
        expected_total = template_expected * copies
        print("\n-- figures --")
        print(f"  {counts['jobs']:,} jobs, {counts['arrivals']:,} arrivals ({counts['kept']:,} kept, "
              f"{len(source.instances):,} objects at the source), {source.finds:,} C-FIND, {source.moves:,} C-MOVE")
        print(f"  harvest {seconds:.1f} s: {counts['jobs'] / seconds:,.0f} jobs/s, "
              f"{counts['arrivals'] / seconds:,.0f} arrivals/s; queue DB {size / 1e6:.1f} MB; "
              f"peak RSS {rss_mb():,.0f} MB (includes the in-memory clinic)")
        ok = len(collected) == expected_total
        print(f"  collected {len(collected):,} = {copies} × {template_expected} expected: {'yes' if ok else 'NO'}")
        results.add("patients", n_patients)
        results.add("plans", n_plans)
        results.add("objects", len(source.instances))
        results.add("jobs", counts["jobs"])
        results.add("arrivals", counts["arrivals"])
        results.add("seconds", round(seconds, 1))
        results.add("jobs_per_s", round(counts["jobs"] / seconds))
        results.add("arrivals_per_s", round(counts["arrivals"] / seconds))
        results.add("queue_db_MB", round(size / 1e6, 1))
        results.add("peak_rss_MB", round(rss_mb()))
        results.add("collected_equals_truth", ok)
        limit = 600 * min(1.0, max(n_patients / 6000, n_plans / 14000))
        results.goal(f"harvest time for {n_patients:,} patients (s)", seconds, limit, "{:.0f}",
                     bound="per-arrival reference extraction and planning (single GIL)")
        results.write(args.json)


if __name__ == "__main__":
    main()

"""Clinic scale: a whole clinic of 10 years harvested end to end, against the bare C-MOVE of the same series.

A benchmark that prints, not a test:

    .venv/bin/python benchmarks/clinic_scale.py [--patients 1000] [--slices 20] [--matrix 32]
                                                [--bare-concurrency 2] [--workdir DIR] [--json FILE]

What it does, on loopback and in one run on the same servers:

1. generates the synthetic clinic (``rtharvest.synth``) with ``--patients`` complete RT patients spread
   over 2012-2022: treatment records, plans, structure sets, doses, planning CT (MR simulation for some),
   registered diagnostic MR for most, PET for some, rigid and deformable registrations, plus the clinic's
   traps (trial plans, dangling references, unrelated scans, QA phantom). Images are small (``--matrix``,
   default 32×32) and ``--slices`` per image series, so that ≥ 50,000 instances fit on a small machine;
2. stores it into a source **Orthanc** (no plugin; dcmqrscp's indexer aborts at a few hundred studies);
3. a fresh harvester (Orthanc + plugin, through the tests' ``start_harvester``) harvests the ground
   truth's ``all`` window (the whole 10 years: the harvester splits it into its record-search parts),
   timed from ``POST /rtharvest/harvests`` until the harvest document says ``Completed`` (planning,
   provenance and the clean-up of inspected candidates included);
4. the same Orthanc with the same configuration *without the plugin*, on the same ports and AET, moves
   exactly the ground truth's expected instances with series-level C-MOVEs (instance level where only part
   of a series is expected), ``--bare-concurrency`` moves at a time (default 2, the harvester's
   ``MaxConcurrent`` per source): the **bare** transfer;
5. the harvester again on its store: a **re-harvest** of the same window (the figures so far are written
   before it, so a run cut short still leaves them).

Figures (printed, and written with ``--json`` for run_all.py): ``patients``, ``instances`` (expected by the
ground truth), ``harvest_s``, ``bare_s``, ``ratio`` (harvest / bare), ``finds_per_patient`` and
``moves_per_patient`` (the C-FIND and C-MOVE operations the harvester counted for the source, per
patient), ``missing`` and ``forbidden`` (store vs ground truth), ``peak_rss_mb`` (the harvester Orthanc's
peak resident memory, ``VmHWM``), ``reharvest_bytes`` (bytes the re-harvest moved: the instances it
recorded as moved, plus one mean instance per duplicate arrival).

Goals: ratio ≤ 1.3, harvest ≤ 15 min, peak RSS ≤ 1 GB, store = ground truth, re-harvest 0 bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    LOCALHOST,
    DicomSource,
    OrthancProcess,
    RestClient,
    Results,
    free_port,
    machine,
    start_harvester,
    wait_until,
)
from harvest_vs_wire import SOURCE, SOURCE_AET, Route, SourceLog, bare_round, harvester_db_moved, start_source

from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import LoadError, dicom_files, store_to_scp

#: How often the harvest document is polled: each poll is a REST callback that takes the plugin's GIL.
POLL_S = 0.5
#: Files per loading association: the loader gives up after a few aborted associations, which a loaded
#: machine produces over tens of thousands of files; each chunk gets its own budget (a C-STORE is idempotent).
LOAD_CHUNK = 2000


def make_clinic(workdir: Path, patients: int, slices: int, matrix: int, seed: int) -> tuple[Path, GroundTruth]:
    """The generated clinic (kept in ``workdir`` between runs)."""
    out = workdir / f"clinic-p{patients}-s{slices}-m{matrix}-seed{seed}"
    truth_file = out / "ground_truth.json"
    if truth_file.exists():
        return out, GroundTruth.from_dict(json.loads(truth_file.read_text()))
    t0 = time.perf_counter()
    truth = generate(out, SynthOptions(patients=patients, seed=seed, ct_slices=slices, matrix=matrix), overwrite=True)
    print(f"generated {len(truth.objects):,} objects in {time.perf_counter() - t0:.0f} s into {out}", flush=True)
    return out, truth


def load_source(source: OrthancProcess, files: list[Path]) -> None:
    """Store the clinic into the source, chunk by chunk (nothing when it already holds every file: a
    ``--workdir`` kept from an earlier run)."""
    held = int(RestClient(source.url, source.credentials).get("/statistics")["CountInstances"])
    if held >= len(files):
        print(f"source already holds {held:,} instances", flush=True)
        return
    for start in range(0, len(files), LOAD_CHUNK):
        for attempt in (1, 2, 3):
            try:
                store_to_scp(files[start:start + LOAD_CHUNK], LOCALHOST, source.dicom_port, SOURCE_AET)
                break
            except LoadError as exc:
                if attempt == 3:
                    raise
                print(f"loading files {start}-{start + LOAD_CHUNK} failed ({exc}); storing them again", flush=True)


def peak_rss_mb(pid: int | None) -> float:
    """Peak resident memory (``VmHWM``) of a running process, in MB (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def source_counts(api: RestClient) -> tuple[int, int]:
    """C-FIND and C-MOVE operations the harvester has sent to the source so far."""
    activity = api.get("/rtharvest/status").get("SourceActivity", {}).get(SOURCE, {})
    return int(activity.get("Finds", 0)), int(activity.get("Moves", 0))


def run_harvest(api: RestClient, window: Any, label: str, deadline_s: float) -> tuple[str, float, dict[str, Any]]:
    """Start a harvest of ``window`` and wait until it is Completed; (id, seconds, harvest document)."""
    body: dict[str, Any] = {"Source": SOURCE, "Label": label}
    if window.date_from:
        body["From"] = window.date_from
    if window.date_to:
        body["To"] = window.date_to
    t0 = time.perf_counter()
    harvest_id = str(api.post("/rtharvest/harvests", body)["ID"])
    doc: dict[str, Any] = {}

    def completed() -> bool:
        nonlocal doc
        doc = api.get(f"/rtharvest/harvests/{harvest_id}")
        return doc["State"] == "Completed"

    wait_until(completed, deadline_s, interval=POLL_S, what=f"harvest {harvest_id}")
    return harvest_id, time.perf_counter() - t0, doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1000, help="RT patients (default 1000; 50 checks it works)")
    ap.add_argument("--slices", type=int, default=20, help="slices per image series (default 20)")
    ap.add_argument("--matrix", type=int, default=32, help="rows = columns of every image (default 32)")
    ap.add_argument("--bare-concurrency", type=int, default=2, help="C-MOVEs at a time in the bare transfer")
    ap.add_argument("--deadline-min", type=float, default=240, help="give up on a harvest after this long")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", default=None, help="keeps the generated clinic between runs (default: temp)")
    ap.add_argument("--json", default=None, help="write the figures here (for run_all.py)")
    args = ap.parse_args()
    if args.patients < 1 or args.slices < 1 or args.matrix < 8 or args.bare_concurrency < 1:
        ap.error("--patients, --slices and --bare-concurrency must be ≥ 1, --matrix ≥ 8")
    results = Results("clinic_scale")
    print(f"== clinic scale: {args.patients} RT patients over 10 years, {args.matrix}x{args.matrix}, "
          f"{args.slices} slices/series; loopback ==")
    print(f"machine: {machine()}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="rth-bench-clinic-")
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    source: OrthancProcess | None = None
    harvester: OrthancProcess | None = None
    deadline_s = args.deadline_min * 60
    try:
        clinic, truth = make_clinic(workdir, args.patients, args.slices, args.matrix, args.seed)
        window = truth.window("all")
        expected, forbidden = set(window.expected), set(window.forbidden)
        truth_bytes = sum(truth.objects[u].size for u in expected)
        mean_size = truth_bytes / len(expected)
        n_patients = window.summary.patients
        harvest_port, http_port = free_port(), free_port()
        # The same source as the wire benchmark's (planner statistics in its index), without --verbose: the
        # harvester counts the operations here.
        source = start_source(workdir / "source", harvest_port, verbose=False, timeout=120)
        files = sorted(dicom_files(clinic))
        t0 = time.perf_counter()
        load_source(source, files)
        print(f"source holds {len(files):,} instances ({sum(o.size for o in truth.objects.values()) / 1e6:,.0f} MB,"
              f" loaded in {time.perf_counter() - t0:.0f} s); window 'all' ({window.date_from}-{window.date_to})"
              f" expects {len(expected):,} instances ({truth_bytes / 1e6:,.0f} MB) of {n_patients} patients",
              flush=True)

        # -- harvest ----------------------------------------------------------------------------------
        src = DicomSource(name=SOURCE, aet=SOURCE_AET, port=source.dicom_port, kind="orthanc")
        shutil.rmtree(workdir / "harvester", ignore_errors=True)  # a fresh store (a kept --workdir has one)
        harvester = start_harvester(workdir / "harvester", harvest_port, {SOURCE: src}, http_port=http_port)
        api = RestClient(harvester.url, harvester.credentials)
        first_id, harvest_s, doc = run_harvest(api, window, "clinic scale", deadline_s)
        finds, moves = source_counts(api)
        rss_harvest = peak_rss_mb(harvester.pid)
        stored = {i["MainDicomTags"]["SOPInstanceUID"]
                  for i in api.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})}
        print(f"harvest: {harvest_s:.1f} s, {finds} C-FIND, {moves} C-MOVE, {len(stored):,} instances stored, "
              f"{doc.get('Patients')} patients, peak RSS {rss_harvest:.0f} MB", flush=True)
        harvester.stop()
        harvester = None

        # -- the bare transfer of exactly the ground truth, same ports and AET -------------------
        route = Route(source.dicom_port, harvest_port, http_port)
        shutil.rmtree(workdir / f"bare0-c{args.bare_concurrency}", ignore_errors=True)  # an empty receiver
        bare = bare_round(workdir, 0, route, SourceLog(source.log_path), truth, args.bare_concurrency)
        bare_stored = int(bare.extra["stats"]["CountInstances"])
        print(f"bare: {bare.seconds:.1f} s, {bare.extra['series_moves']} moves ({args.bare_concurrency} at a time),"
              f" {bare_stored:,} instances stored", flush=True)
        figures: dict[str, Any] = {
            "patients": n_patients, "instances": len(expected), "source_instances": len(files),
            "harvest_s": round(harvest_s, 1), "bare_s": round(bare.seconds, 1),
            "ratio": round(harvest_s / bare.seconds, 3),
            "finds_per_patient": round(finds / n_patients, 1), "moves_per_patient": round(moves / n_patients, 1),
            "bare_moves_per_patient": round(bare.extra["series_moves"] / n_patients, 1),
            "missing": len(expected - stored), "forbidden": len(stored & forbidden),
            "unexpected": len(stored - expected - forbidden), "peak_rss_mb": round(rss_harvest),
            "bare_stored": bare_stored,
        }
        for key, value in figures.items():
            results.add(key, value)
        results.write(args.json)  # what is measured so far, should the re-harvest not finish

        # -- re-harvest on the same store ------------------------------------------------------------
        harvester = start_harvester(workdir / "harvester", harvest_port, {SOURCE: src}, http_port=http_port)
        api = RestClient(harvester.url, harvester.credentials)
        second_id, reharvest_s, _ = run_harvest(api, window, "clinic scale again", deadline_s)
        finds_2, moves_2 = source_counts(api)
        arrivals_2 = int(api.get("/rtharvest/status")["Arrivals"])
        rss_again = peak_rss_mb(harvester.pid)
        print(f"re-harvest: {reharvest_s:.1f} s, {finds_2} C-FIND, {moves_2} C-MOVE, {arrivals_2} arrivals, "
              f"peak RSS {rss_again:.0f} MB", flush=True)
        harvester.stop()
        db = harvester.run_dir / "rtharvest.sqlite"
        moved_again = harvester_db_moved(db, second_id)
        reharvest_bytes = sum(truth.objects[u].size for u in moved_again if u in truth.objects)
        reharvest_bytes += int(max(0, arrivals_2 - len(moved_again)) * mean_size)
        shutil.rmtree(harvester.run_dir / "storage", ignore_errors=True)
        harvester = None
        figures.update({"peak_rss_mb": round(max(rss_harvest, rss_again)), "reharvest_s": round(reharvest_s, 1),
                        "reharvest_finds_per_patient": round(finds_2 / n_patients, 1),
                        "reharvest_bytes": reharvest_bytes})

        # -- figures --------------------------------------------------------------------------------
        print("\n-- figures --")
        for key, value in figures.items():
            results.add(key, value)
            print(f"  {key:<24} {value}")
        results.goal("harvest time / bare time, loopback", figures["ratio"], 1.3, "{:.2f}",
                     bound="see benchmarks/README.md")
        results.goal("harvest seconds", harvest_s, 900, "{:.0f}", bound="see benchmarks/README.md")
        results.goal("harvester peak RSS, MB", figures["peak_rss_mb"], 1024, "{:.0f}")
        results.goal("missing + forbidden instances", figures["missing"] + figures["forbidden"], 0, "{:.0f}")
        results.goal("re-harvest bytes moved", reharvest_bytes, 0, "{:.0f}", bound="instances moved twice")
        if bare_stored != len(expected):
            results.note(f"the bare transfer stored {bare_stored} instances, the ground truth expects {len(expected)}")
        results.write(args.json)
    finally:
        if harvester is not None:
            harvester.stop()
        if source is not None:
            source.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()

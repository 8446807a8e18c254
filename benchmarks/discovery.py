"""Discovery at clinic scale: does finding a window's records cost what the window holds, or the history?

    .venv/bin/python benchmarks/discovery.py [--quick] [--history 1000] [--sources orthanc,dcmqrscp]
                                             [--compare] [--skip-whole] [--look-back DAYS] [--workdir DIR]

A synthetic clinic of a few full RT patients plus ``--history`` metadata-light patients (one course each:
an RT Plan and 3-5 treatment records, courses spread evenly over 2012-2022, records of a course in one
study dated at simulation) is served by a real source: a plain Orthanc (``orthanc``: ``RecordDiscovery:
TreatmentDate``; ``orthanc-upper``: the same Orthanc found by ``StudyDate`` with ``UpperLevelKeys``, one
IMAGE-level C-FIND per month; ``orthanc-studydate``: found by ``StudyDate`` without ``UpperLevelKeys``, the
walk studies -> record series -> records a source needs when it ignores series and study keys at IMAGE
level) and dcmqrscp (``RecordDiscovery: StudyDate``, look-back 90 days or ``--look-back``). For a one-week
window, a one-month window and the whole history, a fresh harvester harvests the window; printed per source
and window: C-FINDs and C-MOVEs the harvester sent (counted by its per-source gate, ``GET /rtharvest/status``
``SourceActivity``), seconds, the harvester's peak resident memory (VmHWM of the Orthanc process), and whether
the collected set equals the ground truth (computed by the generator from its own construction, not by the
planner).

``--compare``: the week and the month again, side by side, on a second source holding the same clinic
minus every history patient with nothing in the month window (before and after it, look-back period
included; the ground truth is the same); printed: how much that history outside the window adds to the
window's C-FINDs and C-MOVEs. ``--skip-whole``: no whole-history harvest (the slow part at 1,000 patients).

dcmqrscp (dcmtk 3.6.7) holds at most 500 studies per storage area (``DB_UpperMaxStudies``; beyond that
``dcmqridx`` aborts): dcmqrscp serves a clinic of at most ``--dcmqrscp-history`` (220) history patients.

Goals: a one-month window costs ≤ 5 % of the whole history's C-FINDs and C-MOVEs; history
outside the window adds ≤ 10 % to the window's C-FINDs.
Not a test: the machine is shared; the figures are counts and ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import LOCALHOST, RestClient, Results, free_port, machine, start_harvester, wait_until

from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.groundtruth import load as load_truth
from rtharvest.synth.loader import LoadError, dicom_files, index_for_dcmqrscp, store_to_scp
from tests.servers import DicomSource, start_dcmqrscp, start_orthanc_source

WINDOWS = (("week", "20170306", "20170312"), ("month", "20170301", "20170331"))
#: Source kind -> (harvester modality name, its RtHarvest.Sources settings).
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "orthanc": ("BENCH_ORTHANC", {"Backend": "orthanc", "InstanceReturnKeys": True,
                                  "RecordDiscovery": "TreatmentDate", "MaxConcurrent": 4}),
    "orthanc-studydate": ("BENCH_ORTHANC_SD", {"Backend": "orthanc", "InstanceReturnKeys": True,
                                               "RecordDiscovery": "StudyDate", "StudyDateLookBackDays": 90,
                                               "MaxConcurrent": 4}),
    # Orthanc matches StudyDate, PatientID and Modality in an IMAGE-level query: how a user configures it.
    "orthanc-upper": ("BENCH_ORTHANC_UP", {"Backend": "orthanc", "InstanceReturnKeys": True, "UpperLevelKeys": True,
                                           "RecordDiscovery": "StudyDate", "StudyDateLookBackDays": 90,
                                           "MaxConcurrent": 4}),
    "dcmqrscp": ("BENCH_DCMQR", {"Backend": "orthanc", "RecordDiscovery": "StudyDate", "StudyDateLookBackDays": 90,
                                 "MaxConcurrent": 4}),
}
SETTINGS = dict(KINDS.values())
#: dcmtk's compiled-in cap on studies per dcmqrscp storage area (dcmqrdbi.h DB_UpperMaxStudies).
DCMQRSCP_MAX_STUDIES = 500
#: History patients that fit in it next to the RT patients (two studies each).
DCMQRSCP_HISTORY = 220


def peak_rss_mb(pid: int | None) -> float:
    """VmHWM of a process in MB (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def harvest(base: Path, port: int, source: DicomSource, window: Any) -> dict[str, Any]:
    """One window on a fresh harvester: counts, seconds, peak memory, collected set vs ground truth."""
    harvester = start_harvester(base, port, {source.name: source},
                                overrides={f"RtHarvest.Sources.{source.name}": SETTINGS[source.name],
                                           "RtHarvest.Workers": 4})
    try:
        api = RestClient(harvester.url, harvester.credentials)
        body: dict[str, Any] = {"Source": source.name, "Label": f"discovery {window.name}"}
        if window.date_from:
            body["From"] = window.date_from
        if window.date_to:
            body["To"] = window.date_to
        t0 = time.perf_counter()
        harvest_id = str(api.post("/rtharvest/harvests", body)["ID"])
        wait_until(lambda: api.get(f"/rtharvest/harvests/{harvest_id}")["State"] == "Completed", 3600, 0.2,
                   f"harvest {harvest_id}")
        seconds = time.perf_counter() - t0
        activity = api.get("/rtharvest/status").get("SourceActivity", {}).get(source.name, {})
        found = api.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in found}
        return {"finds": int(activity.get("Finds", 0)), "moves": int(activity.get("Moves", 0)), "seconds": seconds,
                "peak_mb": peak_rss_mb(harvester.pid), "equal": stored == set(window.expected),
                "missing": len(set(window.expected) - stored), "extra": len(stored - set(window.expected))}
    finally:
        harvester.stop()


def make_clinic(out: Path, patients: int, history: int) -> tuple[GroundTruth, list[Path]]:
    """The seeded synthetic clinic and its files (reused from ``out`` when a kept ``--workdir`` holds the
    same clinic: generating 1,000 history patients takes minutes)."""
    t0 = time.perf_counter()
    options = SynthOptions(patients=patients, seed=13, ct_slices=2, matrix=8, course_record_study=True,
                           history_patients=history, windows=WINDOWS)
    kept = out / "ground_truth.json"
    if kept.is_file() and load_truth(kept).generator.get("Options") == json.loads(json.dumps(asdict(options))):
        truth = load_truth(kept)
        verb = "reused"
    else:
        truth = generate(out, options, overwrite=True)
        verb = "generated"
    files = dicom_files(out)
    print(f"{verb} {len(files):,} files ({patients} RT + {history} history patients) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return truth, files


def store_robustly(files: list[Path], source: DicomSource, chunk: int = 500, tries: int = 3) -> None:
    """C-STORE in chunks of one association each, a chunk retried when its association is lost.

    On the shared machine a source Orthanc occasionally drops a long loading association ("no response");
    storing again is harmless (the source overwrites), so the benchmark does not lose its setup to it.
    """
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        for attempt in range(1, tries + 1):
            try:
                store_to_scp(part, LOCALHOST, source.port, source.aet)
                break
            except LoadError as exc:
                if attempt == tries:
                    raise
                print(f"  loading {source.name}: {exc}; storing files {start}-{start + len(part)} again",
                      flush=True)


def without_outside_history(truth: GroundTruth, files: list[Path]) -> tuple[list[Path], int]:
    """The clinic minus every history patient with nothing in the month window (which holds the week):
    the same windows' ground truth, without the history outside them. Returns the files and how many
    history patients were left out."""
    month = set(truth.window("month").expected)
    history = {info.patient_id for info in truth.objects.values() if info.patient_id.startswith("HIS")}
    inside = {truth.objects[uid].patient_id for uid in month if uid in truth.objects}
    dropped = history - inside
    kept = [f for f in files if f.stem not in truth.objects or truth.objects[f.stem].patient_id not in dropped]
    return kept, len(dropped)


def study_count(truth: GroundTruth) -> int:
    return len({info.study_uid for info in truth.objects.values()})


def start_source(kind: str, run_dir: Path, port: int, files: list[Path]) -> DicomSource:
    """A source of ``kind`` holding ``files`` (dcmqrscp through its own indexer, the others over C-STORE)."""
    name = KINDS[kind][0]
    t0 = time.perf_counter()
    if kind == "dcmqrscp":
        source = start_dcmqrscp(run_dir, port, name=name, aet="BENCHDCMQR")
        assert source.storage is not None
        index_for_dcmqrscp(files, source.storage)
    else:
        source = start_orthanc_source(run_dir, port, name=name, aet=name.replace("_", "")[:16])
        store_robustly(files, source)
    print(f"  {kind}: loaded {len(files):,} files in {time.perf_counter() - t0:.0f} s", flush=True)
    return source


def added(with_history: int, without: int) -> float:
    """What the history outside the window added, as a fraction of the window's cost without it."""
    if without == 0:
        return 0.0 if with_history == 0 else float("inf")
    return (with_history - without) / without


def show(kind: str, label: str, figures: dict[str, Any]) -> None:
    print(f"  {kind:<17} {label:<15} {figures['finds']:>7} C-FIND {figures['moves']:>7} C-MOVE "
          f"{figures['seconds']:>8.1f} s {figures['peak_mb']:>7.0f} MB  "
          f"{'= truth' if figures['equal'] else 'MISMATCH'} ({figures['missing']} missing, "
          f"{figures['extra']} extra)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 history patients")
    ap.add_argument("--history", type=int, default=None, help="history patients (default 1000; quick 100)")
    ap.add_argument("--patients", type=int, default=6, help="full RT patients (default 6)")
    ap.add_argument("--sources", default="orthanc,dcmqrscp", help=f"any of {', '.join(KINDS)}")
    ap.add_argument("--compare", action="store_true",
                    help="also the windows without history and with history outside the month only")
    ap.add_argument("--skip-whole", action="store_true", help="no whole-history harvest")
    ap.add_argument("--dcmqrscp-history", type=int, default=DCMQRSCP_HISTORY,
                    help=f"history patients of the dcmqrscp clinic at most (default {DCMQRSCP_HISTORY}: "
                         f"dcmqrscp holds {DCMQRSCP_MAX_STUDIES} studies)")
    ap.add_argument("--look-back", type=int, default=None,
                    help="StudyDateLookBackDays of the StudyDate sources (default 90)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    history = args.history if args.history is not None else (100 if args.quick else 1000)
    kinds = [k.strip() for k in args.sources.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            ap.error(f"unknown source kind {kind!r} (one of {', '.join(KINDS)})")
    if args.look_back is not None:
        for _, settings in KINDS.values():
            if "StudyDateLookBackDays" in settings:
                settings["StudyDateLookBackDays"] = args.look_back
    results = Results("discovery")
    print(f"machine: {machine()}", flush=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rth-bench-discovery-"))
    try:
        clinics: dict[int, tuple[GroundTruth, list[Path], list[Path]]] = {}

        def clinic_of(kind: str) -> tuple[int, GroundTruth, list[Path], list[Path]]:
            """The clinic a source kind serves (dcmqrscp's is capped), generated once per size."""
            size = min(history, args.dcmqrscp_history) if kind == "dcmqrscp" else history
            if size not in clinics:
                truth, files = make_clinic(work / ("clinic" if size == history else f"clinic-{size}"),
                                           args.patients, size)
                if kind == "dcmqrscp" and study_count(truth) > DCMQRSCP_MAX_STUDIES:
                    ap.error(f"this clinic has {study_count(truth):,} studies; dcmqrscp (dcmtk) holds at most "
                             f"{DCMQRSCP_MAX_STUDIES} per storage area: lower --dcmqrscp-history")
                inside_files: list[Path] = []
                if args.compare:
                    inside_files, dropped = without_outside_history(truth, files)
                    print(f"compare: {dropped} of {size} history patients have nothing in the month window; "
                          f"the clinic without them has {len(inside_files):,} files", flush=True)
                clinics[size] = (truth, files, inside_files)
            return (size, *clinics[size])

        # Servers of this run under their own folder: a kept --workdir is reused for the clinic only.
        run = work / time.strftime("run-%Y%m%d-%H%M%S")
        port = free_port()
        rows: list[tuple[str, str, dict[str, Any]]] = []
        for kind in kinds:
            size, truth, files, inside_files = clinic_of(kind)
            print(f"{kind}: {size} history patients", flush=True)
            results.add(f"{kind}_history_patients", size)
            by: dict[str, dict[str, Any]] = {}
            source = start_source(kind, run / f"src-{kind}", port, files)
            try:
                for name in ("week", "month"):
                    by[name] = harvest(run / f"harvester-{kind}-{name}", port, source, truth.window(name))
                    show(kind, name, by[name])
                if args.compare:
                    # Side by side, right after the windows above: the same windows on the same clinic without
                    # the history patients that have nothing in them (a second source of the same kind).
                    bare = start_source(kind, run / f"src-{kind}-bare", port, inside_files)
                    try:
                        for name in ("week", "month"):
                            by[f"{name} bare"] = harvest(run / f"harvester-{kind}-bare-{name}", port, bare,
                                                         truth.window(name))
                            show(kind, f"{name} w/o outside", by[f"{name} bare"])
                    finally:
                        bare.stop()
                    settings = KINDS[kind][1]
                    bound = "" if settings["RecordDiscovery"] != "StudyDate" or settings.get("UpperLevelKeys") else (
                        f"StudyDate pre-filter without UpperLevelKeys: each record study dated in the window or its "
                        f"{settings['StudyDateLookBackDays']}-day look-back costs one SERIES-level C-FIND and one "
                        f"IMAGE-level C-FIND per record series, whoever's it is")
                    for name in ("week", "month"):
                        for what in ("finds", "moves"):
                            results.goal(f"{kind}: {name}, history outside adds to {what}",
                                         added(by[name][what], by[f"{name} bare"][what]), 0.10, fmt="{:.1%}",
                                         bound=bound)
                if not args.skip_whole:
                    by["all"] = harvest(run / f"harvester-{kind}-all", port, source, truth.window("all"))
                    show(kind, "all", by["all"])
            finally:
                source.stop()
            for name, figures in by.items():
                rows.append((kind, name, figures))
                results.add(f"{kind}_{name.replace(' ', '_')}", figures)
            if "all" in by:
                for what in ("finds", "moves"):
                    results.goal(f"{kind}: one month / whole history, {what}",
                                 by["month"][what] / max(1, by["all"][what]), 0.05, fmt="{:.1%}")
        results.note("collected set equals the ground truth in every window: "
                     + str(all(f["equal"] for _, _, f in rows)))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results.write(args.json)


if __name__ == "__main__":
    main()

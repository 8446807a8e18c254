"""Discovery at clinic scale: does finding a window's records cost what the window holds, or the history?

    .venv/bin/python benchmarks/discovery.py [--quick] [--history 1000] [--sources orthanc,dcmqrscp]

A synthetic clinic of a few full RT patients plus ``--history`` metadata-light patients (one course each:
an RT Plan and 3-5 treatment records, courses spread evenly over 2012-2022, records of a course in one
study dated at simulation) is served by a real source: a plain Orthanc (``RecordDiscovery: TreatmentDate``)
and dcmqrscp (``RecordDiscovery: StudyDate``, look-back 90 days). For a one-week window, a one-month window
and the whole history, a fresh harvester harvests the window; printed per source and window: C-FINDs and
C-MOVEs the harvester sent (counted by its per-source gate, ``GET /rtharvest/status`` ``SourceActivity``),
seconds, the harvester's peak resident memory (VmHWM of the Orthanc process), and whether the collected set
equals the ground truth (computed by the generator from its own construction, not by the planner).

Goals (issue 13): a one-month window costs ≤ 5 % of the whole history's C-FINDs and C-MOVEs.
Not a test: the machine is shared; the figures are counts and a ratio measured in one run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import LOCALHOST, RestClient, Results, free_port, machine, start_harvester, wait_until

from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, index_for_dcmqrscp, store_to_scp
from tests.servers import DicomSource, start_dcmqrscp, start_orthanc_source

WINDOWS = (("week", "20170306", "20170312"), ("month", "20170301", "20170331"))
SETTINGS = {
    "BENCH_ORTHANC": {"Backend": "orthanc", "InstanceReturnKeys": True, "RecordDiscovery": "TreatmentDate",
                      "MaxConcurrent": 4},
    "BENCH_DCMQR": {"Backend": "orthanc", "RecordDiscovery": "StudyDate", "StudyDateLookBackDays": 90,
                    "MaxConcurrent": 4},
}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 history patients")
    ap.add_argument("--history", type=int, default=None, help="history patients (default 1000; quick 100)")
    ap.add_argument("--patients", type=int, default=6, help="full RT patients (default 6)")
    ap.add_argument("--sources", default="orthanc,dcmqrscp")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    history = args.history if args.history is not None else (100 if args.quick else 1000)
    kinds = [k.strip() for k in args.sources.split(",") if k.strip()]
    results = Results("discovery")
    print(f"machine: {machine()}", flush=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rth-bench-discovery-"))
    try:
        t0 = time.perf_counter()
        truth: GroundTruth = generate(work / "clinic", SynthOptions(
            patients=args.patients, seed=13, ct_slices=2, matrix=8, course_record_study=True,
            history_patients=history, windows=WINDOWS), overwrite=True)
        files = dicom_files(work / "clinic")
        print(f"generated {len(files):,} files ({args.patients} RT + {history} history patients) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        port = free_port()
        rows: list[tuple[str, str, dict[str, Any]]] = []
        for kind in kinds:
            if kind == "orthanc":
                source = start_orthanc_source(work / "src-orthanc", port, name="BENCH_ORTHANC", aet="BENCHORTHANC")
                store_to_scp(files, LOCALHOST, source.port, source.aet)
            elif kind == "dcmqrscp":
                source = start_dcmqrscp(work / "src-dcmqr", port, name="BENCH_DCMQR", aet="BENCHDCMQR")
                assert source.storage is not None
                index_for_dcmqrscp(files, source.storage)
            else:
                ap.error(f"unknown source kind {kind!r}")
            try:
                for name in ("week", "month", "all"):
                    window = truth.window(name)
                    figures = harvest(work / f"harvester-{kind}-{name}", port, source, window)
                    rows.append((kind, name, figures))
                    print(f"  {kind:<9} {name:<6} {figures['finds']:>7} C-FIND {figures['moves']:>7} C-MOVE "
                          f"{figures['seconds']:>8.1f} s {figures['peak_mb']:>7.0f} MB  "
                          f"{'= truth' if figures['equal'] else 'MISMATCH'} ({figures['missing']} missing, "
                          f"{figures['extra']} extra)", flush=True)
                    results.add(f"{kind}_{name}", figures)
            finally:
                source.stop()
            by = {name: f for k, name, f in rows if k == kind}
            for what in ("finds", "moves"):
                whole = max(1, by["all"][what])
                results.goal(f"{kind}: one month / whole history, {what}", by["month"][what] / whole, 0.05,
                             fmt="{:.1%}")
        results.note("collected set equals the ground truth in every window: "
                     + str(all(f["equal"] for _, _, f in rows)))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results.write(args.json)


if __name__ == "__main__":
    main()

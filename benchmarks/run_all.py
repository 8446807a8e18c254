"""Run every benchmark of rtharvest one after the other and print the figures table for benchmarks/README.md.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only wire,ingest,scale,queue,store,discovery,clinic]

Each benchmark runs as its own process (so peak memory and servers never mix), prints its own output,
and leaves a JSON summary that this script turns into one Markdown table (date, machine, figures, goals)
for README.md; the wire benchmark's two goal rows, harvest time / bare time on loopback and with the
delay (``--delay-ms`` of harvest_vs_wire.py, default 10 ms each way), come out side by side.
None of this is a test: the machines are shared and noisy, so the headline figures are ratios measured
side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine

HERE = Path(__file__).resolve().parent
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "wire": ("harvest_vs_wire.py", []),
    "ingest": ("ingest_overhead.py", []),
    "scale": ("scale_simulation.py", []),
    "queue": ("queue_throughput.py", []),
    "store": ("store_scale.py", []),
    "discovery": ("discovery.py", []),
    "clinic": ("clinic_scale.py", []),
}
QUICK = {"wire": ["--quick"], "ingest": ["--quick"], "scale": ["--quick"],
         "queue": ["--jobs", "4000", "--events", "40000"], "store": ["--quick"], "discovery": ["--quick"],
         "clinic": ["--patients", "50"]}


def queue_figures(text: str) -> dict[str, str]:
    """The queue benchmark prints text only: pick its headline lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "enqueue+claim+complete, 1 tx each" in line:
            out["transitions_per_s"] = line.split(":", 1)[1].strip()
        elif line.startswith("claim+complete, 4 threads"):
            out["4_threads"] = " ".join(line.split()[3:5])
        elif line.startswith("enqueue_many, 500 per tx"):
            out["enqueue_many"] = line.split()[4]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes in all)")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    args = ap.parse_args()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    summaries: dict[str, dict] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rth-bench-all-") as tmp:
        for name in chosen:
            script, extra = BENCHMARKS[name]
            cmd = [sys.executable, str(HERE / script), *extra, *(QUICK[name] if args.quick else [])]
            if name != "queue":
                cmd += ["--json", str(Path(tmp) / f"{name}.json")]
            print(f"\n##### {script} {' '.join(cmd[2:])}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
            print(proc.stdout, end="", flush=True)
            print(f"##### {script}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
            if proc.returncode != 0:
                failures.append(script)
                continue
            if name == "queue":
                summaries[name] = {"figures": queue_figures(proc.stdout), "goals": []}
            else:
                summaries[name] = json.loads((Path(tmp) / f"{name}.json").read_text())

    today = datetime.date.today().isoformat()
    print("\n\n## Figures (paste into benchmarks/README.md)\n")
    print(f"Run {today}{' (--quick)' if args.quick else ''} on {machine()}.\n")
    print("| benchmark | figure | value | goal | met |")
    print("|---|---|---|---|---|")
    for name, summary in summaries.items():
        for goal in summary.get("goals", []):
            met = "yes" if goal["met"] else f"**no** ({goal['bound']})"
            print(f"| {name} | {goal['label']} | {goal['shown']} | {goal['goal']} | {met} |")
        for key, value in summary.get("figures", {}).items():
            print(f"| {name} | {key} | {value} | | |")
    for name, summary in summaries.items():
        for note in summary.get("notes", []):
            print(f"\n{name}: {note}")
    if failures:
        print(f"\nfailed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

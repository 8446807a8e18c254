"""Harvest vs wire: how close a harvest gets to the bare transfer, how little it moves, how many DIMSE calls.

A benchmark that prints, not a test:

    .venv/bin/python benchmarks/harvest_vs_wire.py [--quick] [--patients 3] [--slices 150] [--rounds 2]

What it does, all on loopback and in one run:

1. generates a synthetic clinic of realistic size (512×512 images, ``--slices`` per image series; the
   generator gives every image series of the clinic that many slices) and stores it into a source Orthanc;
2. per round, side by side (the order alternates between rounds):
   * **harvest**: a fresh harvester (Orthanc + plugin, through the tests' ``start_harvester``) harvests
     the ground truth's ``all`` window over REST; timed from ``POST /rtharvest/harvests`` until the
     harvest document says ``Completed`` (so it includes planning, provenance and the clean-up of
     rejected candidates); then a **re-harvest** of the same window on the same store, timed the same way;
   * **bare**: the same Orthanc with the same configuration *without the plugin*, on the same ports and
     AET, retrieves exactly the instances the ground truth expects, with series-level C-MOVEs
     (``POST /modalities/ORTHANC_SRC/move``, Orthanc's own C-MOVE SCU, the path the harvester's
     ``orthanc`` backend uses), once one move at a time and once two at a time (the harvester's
     ``MaxConcurrent`` for a source); the faster of the two is the wire time.

Figures:

* harvest time / bare time (goal ≤ 1.3), against the faster bare run;
* bytes moved / ground-truth bytes (goal ≤ 1.01). Bytes moved = the sizes (ground truth ``Bytes``) of the
  distinct instances the harvester recorded as arrived by C-MOVE (its tracker, ``rth_objects.moved = 1``),
  plus one mean instance size per duplicate arrival (the status route's ``Arrivals`` counter minus those
  distinct instances). Cross-checked against Orthanc's store statistics (``/statistics``), which after
  the clean-up hold the kept instances only;
* DIMSE operations per patient: the source Orthanc runs with ``--verbose`` and logs one line per C-FIND it
  answers ("DICOM C-Find request at level") and per C-MOVE ("Move-SCU request received"); the lines
  written during each phase are counted;
* the re-harvest's time and bytes moved (goal: 0 bytes).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_CONFIG,
    HARVEST_AET,
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

from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import LoadError, dicom_files, store_to_scp

SOURCE = "ORTHANC_SRC"
SOURCE_AET = "ORTHANCSRC"
FIND_LINE = re.compile(rb"DICOM C-Find request at level")
MOVE_LINE = re.compile(rb"Move-SCU request received")


@dataclass
class Phase:
    seconds: float
    finds: int = 0
    moves: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SourceLog:
    """Counts the C-FIND / C-MOVE requests the source Orthanc logged since a mark."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def counts(self) -> tuple[int, int]:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        return len(FIND_LINE.findall(data)), len(MOVE_LINE.findall(data))


def make_clinic(workdir: Path, patients: int, slices: int, seed: int) -> tuple[Path, GroundTruth]:
    out = workdir / f"clinic-p{patients}-s{slices}-seed{seed}"
    truth_file = out / "ground_truth.json"
    if truth_file.exists():
        return out, GroundTruth.from_dict(json.loads(truth_file.read_text()))
    t0 = time.perf_counter()
    truth = generate(out, SynthOptions(patients=patients, seed=seed, ct_slices=slices, matrix=512), overwrite=True)
    print(f"generated {len(truth.objects):,} objects in {time.perf_counter() - t0:.1f} s into {out}", flush=True)
    return out, truth


def start_source(run_dir: Path, harvest_port: int) -> OrthancProcess:
    """A plain Orthanc (no plugin) with --verbose, so that every C-FIND/C-MOVE it answers is logged."""
    config = {
        "Name": SOURCE_AET, "DicomAet": SOURCE_AET, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "DicomCheckModalityHost": False,
        "OverwriteInstances": True,
    }
    source = OrthancProcess(run_dir, config, aet=SOURCE_AET, plugin=False, verbose=True,
                            modalities={"HARVEST": [HARVEST_AET, LOCALHOST, harvest_port]})
    return source.start()


def harvester_db_moved(db_path: Path, harvest_id: str) -> list[str]:
    """SOP UIDs the harvester recorded as moved in for ``harvest_id`` (read after Orthanc stopped)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT sop_uid FROM rth_objects WHERE harvest_id = ? AND moved = 1",
                           (harvest_id,)).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def run_harvest(api: RestClient, window: Any, label: str, deadline_s: float) -> tuple[str, float, dict[str, Any]]:
    body: dict[str, Any] = {"Source": SOURCE, "Label": label}
    if window.date_from:
        body["From"] = window.date_from
    if window.date_to:
        body["To"] = window.date_to
    if window.patient_ids:
        body["PatientIDs"] = window.patient_ids
    t0 = time.perf_counter()
    harvest_id = str(api.post("/rtharvest/harvests", body)["ID"])
    doc: dict[str, Any] = {}

    def completed() -> bool:
        nonlocal doc
        doc = api.get(f"/rtharvest/harvests/{harvest_id}")
        return doc["State"] == "Completed"

    wait_until(completed, deadline_s, interval=0.05, what=f"harvest {harvest_id}")
    return harvest_id, time.perf_counter() - t0, doc


def harvest_round(base: Path, index: int, ports: tuple[int, int], source: OrthancProcess, log: SourceLog,
                  truth: GroundTruth, deadline_s: float) -> tuple[Phase, Phase]:
    window = truth.window("all")
    src = DicomSource(name=SOURCE, aet=SOURCE_AET, port=source.dicom_port, kind="orthanc")
    harvester = start_harvester(base / f"harvester{index}", ports[0], {SOURCE: src}, http_port=ports[1])
    try:
        api = RestClient(harvester.url, harvester.credentials)
        log.mark()
        first_id, seconds, doc = run_harvest(api, window, f"bench {index}", deadline_s)
        finds, moves = log.counts()
        arrivals_1 = int(api.get("/rtharvest/status")["Arrivals"])
        stats_1 = api.get("/statistics")
        stored = {i["MainDicomTags"]["SOPInstanceUID"]
                  for i in api.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})}
        harvest = Phase(seconds, finds, moves, {"id": first_id, "arrivals": arrivals_1, "stats": stats_1,
                                                 "stored": stored, "doc": doc})
        log.mark()
        second_id, seconds2, _ = run_harvest(api, window, f"bench {index} again", deadline_s)
        finds2, moves2 = log.counts()
        arrivals_2 = int(api.get("/rtharvest/status")["Arrivals"])
        again = Phase(seconds2, finds2, moves2, {"id": second_id, "arrivals": arrivals_2 - arrivals_1})
    finally:
        harvester.stop()
    db = harvester.run_dir / "rtharvest.sqlite"
    harvest.extra["moved_uids"] = harvester_db_moved(db, first_id)
    again.extra["moved_uids"] = harvester_db_moved(db, second_id)
    shutil.rmtree(harvester.run_dir / "storage", ignore_errors=True)
    return harvest, again


def bare_resources(truth: GroundTruth) -> list[tuple[str, list[dict[str, str]]]]:
    """(level, resources) per series of the expected instances: series-level when the whole series is wanted."""
    expected = set(truth.window("all").expected)
    by_series: dict[str, list[str]] = defaultdict(list)
    for uid, info in truth.objects.items():
        by_series[info.series_uid].append(uid)
    moves: list[tuple[int, str, list[dict[str, str]]]] = []
    for series, uids in by_series.items():
        wanted = [u for u in uids if u in expected]
        if not wanted:
            continue
        study = truth.objects[wanted[0]].study_uid
        if len(wanted) == len(uids):
            moves.append((len(wanted), "Series", [{"StudyInstanceUID": study, "SeriesInstanceUID": series}]))
        else:
            moves.append((len(wanted), "Instance", [{"StudyInstanceUID": study, "SeriesInstanceUID": series,
                                        "SOPInstanceUID": u} for u in wanted]))
    # Biggest first, so that two concurrent moves stay balanced.
    moves.sort(key=lambda m: -m[0])
    return [(level, resources) for _, level, resources in moves]


def bare_round(base: Path, index: int, ports: tuple[int, int], source: OrthancProcess, log: SourceLog,
               truth: GroundTruth, concurrency: int) -> Phase:
    entry = DicomSource(name=SOURCE, aet=SOURCE_AET, port=source.dicom_port, kind="orthanc").modality_entry
    plain = OrthancProcess(base / f"bare{index}-c{concurrency}", DEFAULT_CONFIG, dicom_port=ports[0],
                           http_port=ports[1], aet=HARVEST_AET, modalities={SOURCE: entry}, plugin=False)
    plain.start()
    try:
        api = RestClient(plain.url, plain.credentials)
        moves = bare_resources(truth)
        log.mark()

        def move(item: tuple[str, list[dict[str, str]]]) -> None:
            level, resources = item
            api.post(f"/modalities/{SOURCE}/move", {"Level": level, "Resources": resources,
                                                   "TargetAet": HARVEST_AET, "Timeout": 600})

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(move, moves))
        seconds = time.perf_counter() - t0
        finds, moves_logged = log.counts()
        stats = api.get("/statistics")
    finally:
        plain.stop()
    shutil.rmtree(plain.run_dir / "storage", ignore_errors=True)
    return Phase(seconds, finds, moves_logged, {"stats": stats, "series_moves": len(moves)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 patients, 100 slices, 1 round")
    ap.add_argument("--patients", type=int, default=None, help="RT patients (default 3; quick 2)")
    ap.add_argument("--slices", type=int, default=None, help="slices per image series (default 150; quick 100)")
    ap.add_argument("--rounds", type=int, default=None, help="harvest/bare pairs (default 2; quick 1)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", default=None, help="keeps the generated clinic between runs (default: temp)")
    ap.add_argument("--json", default=None, help="write the figures here (for run_all.py)")
    args = ap.parse_args()
    patients = args.patients or (2 if args.quick else 3)
    slices = args.slices or (100 if args.quick else 150)
    rounds = args.rounds or (1 if args.quick else 2)
    results = Results("harvest_vs_wire")
    print(f"== harvest vs wire: {patients} RT patients, 512x512, {slices} slices/series, {rounds} round(s) ==")
    print(f"machine: {machine()}", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="rth-bench-wire-")
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    source: OrthancProcess | None = None
    try:
        clinic, truth = make_clinic(workdir, patients, slices, args.seed)
        window = truth.window("all")
        expected = set(window.expected)
        truth_bytes = sum(truth.objects[u].size for u in expected)
        mean_size = truth_bytes / len(expected)
        n_patients = window.summary.patients
        ports = (free_port(), free_port())
        source = start_source(workdir / "source", ports[0])
        log = SourceLog(source.log_path)
        files = dicom_files(clinic)
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:  # a loaded machine occasionally aborts the loading association: store again (idempotent)
                store_to_scp(files, LOCALHOST, source.dicom_port, SOURCE_AET)
                break
            except LoadError as exc:
                if attempt == 2:
                    raise
                print(f"loading the source failed ({exc}); storing again", flush=True)
        total_bytes = sum(o.size for o in truth.objects.values())
        print(f"source holds {len(files):,} instances ({total_bytes / 1e6:,.0f} MB, loaded in "
              f"{time.perf_counter() - t0:.1f} s); window 'all' expects {len(expected):,} instances "
              f"({truth_bytes / 1e6:,.0f} MB) of {n_patients} patients", flush=True)

        harvests: list[Phase] = []
        agains: list[Phase] = []
        bares: dict[int, list[Phase]] = {1: [], 2: []}
        for r in range(rounds):
            def do_harvest(r: int = r) -> None:
                h, a = harvest_round(workdir, r, ports, source, log, truth, deadline_s=1800)  # type: ignore[arg-type]
                harvests.append(h)
                agains.append(a)
                print(f"round {r + 1}: harvest {h.seconds:6.2f} s ({h.finds} C-FIND, {h.moves} C-MOVE, "
                      f"{len(h.extra['moved_uids'])} instances moved); re-harvest {a.seconds:5.2f} s "
                      f"({a.finds} C-FIND, {a.moves} C-MOVE, {a.extra['arrivals']} arrivals)", flush=True)

            def do_bare(r: int = r) -> None:
                for c in (1, 2):
                    b = bare_round(workdir, r, ports, source, log, truth, c)  # type: ignore[arg-type]
                    bares[c].append(b)
                    print(f"round {r + 1}: bare, {c} at a time {b.seconds:6.2f} s ({b.moves} C-MOVE for "
                          f"{b.extra['series_moves']} series; {b.extra['stats']['CountInstances']} stored)",
                          flush=True)

            for step in ((do_harvest, do_bare) if r % 2 == 0 else (do_bare, do_harvest)):
                step()

        # -- figures ------------------------------------------------------------------------------
        h_time = statistics.median(h.seconds for h in harvests)
        bare_1 = statistics.median(b.seconds for b in bares[1])
        bare_2 = statistics.median(b.seconds for b in bares[2])
        wire = min(bare_1, bare_2)
        last = harvests[-1]
        moved = set(last.extra["moved_uids"])
        moved_bytes = sum(truth.objects[u].size for u in moved if u in truth.objects)
        duplicates = max(0, last.extra["arrivals"] - len(moved))
        moved_bytes_total = moved_bytes + duplicates * mean_size
        extra = moved - expected
        missing = expected - last.extra["stored"]
        forbidden = last.extra["stored"] & set(window.forbidden)
        stats = last.extra["stats"]
        again = agains[-1]
        again_bytes = sum(truth.objects[u].size for u in again.extra["moved_uids"] if u in truth.objects)
        again_bytes += max(0, again.extra["arrivals"] - len(again.extra["moved_uids"])) * mean_size
        bare_stored = bares[1][-1].extra["stats"]["CountInstances"]

        print("\n-- figures --")
        stored_mb = int(stats["TotalUncompressedSize"]) / 1e6
        print(f"  store after harvest: {stats['CountInstances']} instances, {stored_mb:.1f}"
              f" MB (Orthanc /statistics); ground truth expects {len(expected)}, {truth_bytes / 1e6:.1f} MB;"
              f" missing {len(missing)}, forbidden kept {len(forbidden)}")
        print(f"  moved: {len(moved)} distinct instances ({len(extra)} beyond the expected ones, "
              f"{sum(truth.objects[u].size for u in extra) / 1e6:.2f} MB), Arrivals={last.extra['arrivals']}"
              f" ({duplicates} duplicate C-STOREs)")
        print(f"  bare moves stored {bare_stored} instances (expected {len(expected)})")
        print(f"  harvest {h_time:.2f} s; bare {bare_1:.2f} s one at a time, {bare_2:.2f} s two at a time"
              f" (median of {rounds})")
        results.add("patients", n_patients)
        results.add("instances_expected", len(expected))
        results.add("bytes_expected", truth_bytes)
        results.add("harvest_s", round(h_time, 3))
        results.add("bare_1_s", round(bare_1, 3))
        results.add("bare_2_s", round(bare_2, 3))
        results.add("harvest_MBps", round(truth_bytes / 1e6 / h_time, 1))
        results.add("bare_MBps", round(truth_bytes / 1e6 / wire, 1))
        results.add("finds_per_patient", round(last.finds / n_patients, 1))
        results.add("moves_per_patient", round(last.moves / n_patients, 1))
        results.add("bare_moves_per_patient", round(bares[1][-1].moves / n_patients, 1))
        results.add("reharvest_s", round(again.seconds, 3))
        results.add("reharvest_finds_per_patient", round(again.finds / n_patients, 1))
        results.add("reharvest_moves", again.moves)
        results.add("reharvest_bytes", int(again_bytes))
        results.add("missing", len(missing))
        results.add("forbidden", len(forbidden))
        results.add("rounds", rounds)
        results.goal("harvest time / bare time", h_time / wire, 1.3, "{:.2f}",
                     bound="see the profile in benchmarks/README.md")
        results.goal("bytes moved / ground-truth bytes", moved_bytes_total / truth_bytes, 1.01, "{:.4f}",
                     bound="candidates retrieved only to inspect their references")
        print(f"  {'DIMSE per patient (harvest)':<46} {last.finds / n_patients:>6.1f} C-FIND, "
              f"{last.moves / n_patients:.1f} C-MOVE   (bare: {bares[1][-1].moves / n_patients:.1f} C-MOVE)")
        print(f"  {'DIMSE per patient (re-harvest)':<46} {again.finds / n_patients:>6.1f} C-FIND, "
              f"{again.moves / n_patients:.1f} C-MOVE")
        print(f"  {'re-harvest time / first harvest time':<46} {again.seconds / h_time:>12.3f}   "
              f"({again.seconds:.2f} s)")
        results.goal("re-harvest bytes moved", again_bytes, 0, "{:.0f}", bound="instances moved twice")
        if missing or forbidden:
            results.note(f"store differs from the ground truth: {len(missing)} missing, {len(forbidden)} forbidden")
        results.write(args.json)
    finally:
        if source is not None:
            source.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()

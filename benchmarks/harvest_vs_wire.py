"""Harvest vs wire: how close a harvest gets to the bare transfer, how little it moves, how many DIMSE calls.

A benchmark that prints, not a test:

    .venv/bin/python benchmarks/harvest_vs_wire.py [--quick] [--patients 3] [--slices 150] [--rounds 2]
                                                   [--delay-ms 10]

What it does, on loopback and in one run:

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
     ``MaxConcurrent`` for a source); the faster of the two is the wire time;
3. the same harvest and the same bare transfer again in a **latency scenario** (``--delay-ms``, default
   10 ms each way; 0 leaves it out): every DICOM byte between the two servers passes a TCP delay line
   (``_latency_proxy.py``, started and stopped here). The harvester's C-FIND/C-MOVE associations go to a
   proxy in front of the source; the source's C-STOREs go to the port its modality entry names for the
   harvester, where a second proxy now listens and forwards to the harvester (which listens on another
   port in this scenario). So every round trip costs ``2 × delay`` more (and a new association one more
   for the TCP handshake), as between a harvester and a hospital's system, while bulk data is not throttled.
   Both scenarios run in every round, one after the other.

Figures:

* harvest time / bare time (goal ≤ 1.3 on loopback and with the delay), each against the faster bare run
  of its own scenario;
* bytes moved / ground-truth bytes (goal ≤ 1.01). Bytes moved = the sizes (ground truth ``Bytes``) of the
  distinct instances the harvester recorded as arrived by C-MOVE (its tracker, ``rth_objects.moved = 1``),
  plus one mean instance size per duplicate arrival (the status route's ``Arrivals`` counter minus those
  distinct instances). Cross-checked against Orthanc's store statistics (``/statistics``), which after
  the clean-up hold the kept instances only;
* DIMSE operations per patient (both scenarios): the source Orthanc runs with ``--verbose`` and logs one
  line per C-FIND it answers ("DICOM C-Find request at level") and per C-MOVE ("Move-SCU request
  received"); the lines written during each phase are counted. With the delay, also the associations the
  proxy in front of the source accepted (each costs a handshake and a negotiation round trip);
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
from _latency_proxy import LatencyProxy

from rtharvest.edge.indexstats import ensure_statistics, index_file
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


@dataclass(frozen=True)
class Route:
    """How the harvester (or the bare Orthanc in its place) and the source reach each other in one scenario."""

    source_port: int  # where the harvester's associations go: the source, or a proxy in front of it
    dicom_port: int  # where the harvester listens (the source's C-STOREs arrive here, maybe through a proxy)
    http_port: int
    to_source: LatencyProxy | None = None
    to_harvester: LatencyProxy | None = None

    def associations(self) -> tuple[int, int]:
        """Connections the proxies have accepted so far: (to the source, to the harvester)."""
        return (self.to_source.connections if self.to_source else 0,
                self.to_harvester.connections if self.to_harvester else 0)


@dataclass
class Scenario:
    """One network between the two servers (loopback, or a delay each way) and what was measured on it."""

    label: str
    key: str  # prefix of its JSON figures ("" for loopback)
    delay_s: float
    inner_port: int  # where the harvester listens when a proxy takes the port the source knows
    harvests: list[Phase] = field(default_factory=list)
    agains: list[Phase] = field(default_factory=list)
    bares: dict[int, list[Phase]] = field(default_factory=lambda: {1: [], 2: []})

    @contextmanager
    def route(self, source_port: int, harvest_port: int, http_port: int) -> Iterator[Route]:
        """The servers' ports for this scenario; the proxies run while the context is open."""
        if not self.delay_s:
            yield Route(source_port, harvest_port, http_port)
            return
        # The source's modality entry for the harvester names `harvest_port`: the proxy takes that port and
        # the harvester listens behind it, so the source needs no reconfiguration between scenarios.
        with LatencyProxy(source_port, self.delay_s) as to_source, \
                LatencyProxy(self.inner_port, self.delay_s, listen_port=harvest_port) as to_harvester:
            yield Route(to_source.port, self.inner_port, http_port, to_source, to_harvester)


def make_clinic(workdir: Path, patients: int, slices: int, seed: int) -> tuple[Path, GroundTruth]:
    out = workdir / f"clinic-p{patients}-s{slices}-seed{seed}"
    truth_file = out / "ground_truth.json"
    if truth_file.exists():
        return out, GroundTruth.from_dict(json.loads(truth_file.read_text()))
    t0 = time.perf_counter()
    truth = generate(out, SynthOptions(patients=patients, seed=seed, ct_slices=slices, matrix=512), overwrite=True)
    print(f"generated {len(truth.objects):,} objects in {time.perf_counter() - t0:.1f} s into {out}", flush=True)
    return out, truth


def start_source(run_dir: Path, harvest_port: int, verbose: bool = True, timeout: float = 30.0) -> OrthancProcess:
    """A plain Orthanc (no plugin) that knows the harvester as its move destination; with ``verbose`` every
    C-FIND/C-MOVE it answers is logged (this benchmark counts them there)."""
    config = {
        "Name": SOURCE_AET, "DicomAet": SOURCE_AET, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "DicomCheckModalityHost": False,
        "OverwriteInstances": True,
    }
    # Like a clinical archive's database (and the harvester's own index), the source's index has planner
    # statistics: without them Orthanc scans its index for every look-up by UID (docs/platform.md).
    ensure_statistics(index_file(run_dir / "storage"))
    source = OrthancProcess(run_dir, config, aet=SOURCE_AET, plugin=False, verbose=verbose,
                            modalities={"HARVEST": [HARVEST_AET, LOCALHOST, harvest_port]})
    return source.start(timeout=timeout)


def harvester_db_moved(db_path: Path, harvest_id: str) -> list[str]:
    """SOP UIDs the harvester recorded as moved in for ``harvest_id`` (read after Orthanc stopped)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT sop_uid FROM rth_objects WHERE harvest_id = ? AND moved = 1",
                           (harvest_id,)).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def harvester_db_chain_s(db_path: Path, harvest_id: str) -> float:
    """Seconds from the harvest's start until its first image (CT/MR/PT) arrived: the chain of searches
    (records, plan, structure set, planning series) that must run before any image can move, which the bare
    transfer does not have (read after Orthanc stopped)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT min(o.arrived_at) - h.created_at FROM rth_objects o JOIN harvests h "
                          "ON h.id = o.harvest_id WHERE o.harvest_id = ? AND o.modality IN ('CT', 'MR', 'PT')",
                          (harvest_id,)).fetchone()
    finally:
        con.close()
    return float(row[0]) if row and row[0] is not None else 0.0


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


def harvest_round(base: Path, index: int, route: Route, log: SourceLog,
                  truth: GroundTruth, deadline_s: float) -> tuple[Phase, Phase]:
    window = truth.window("all")
    src = DicomSource(name=SOURCE, aet=SOURCE_AET, port=route.source_port, kind="orthanc")
    harvester = start_harvester(base / f"harvester{index}", route.dicom_port, {SOURCE: src},
                                http_port=route.http_port)
    try:
        api = RestClient(harvester.url, harvester.credentials)
        log.mark()
        assoc_0 = route.associations()
        first_id, seconds, doc = run_harvest(api, window, f"bench {index}", deadline_s)
        finds, moves = log.counts()
        assoc = tuple(b - a for a, b in zip(assoc_0, route.associations(), strict=True))
        arrivals_1 = int(api.get("/rtharvest/status")["Arrivals"])
        stats_1 = api.get("/statistics")
        stored = {i["MainDicomTags"]["SOPInstanceUID"]
                  for i in api.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})}
        harvest = Phase(seconds, finds, moves, {"id": first_id, "arrivals": arrivals_1, "stats": stats_1,
                                                 "stored": stored, "doc": doc,
                                                 "associations": assoc})
        log.mark()
        second_id, seconds2, _ = run_harvest(api, window, f"bench {index} again", deadline_s)
        finds2, moves2 = log.counts()
        arrivals_2 = int(api.get("/rtharvest/status")["Arrivals"])
        again = Phase(seconds2, finds2, moves2, {"id": second_id, "arrivals": arrivals_2 - arrivals_1})
    finally:
        harvester.stop()
    db = harvester.run_dir / "rtharvest.sqlite"
    harvest.extra["moved_uids"] = harvester_db_moved(db, first_id)
    harvest.extra["chain_s"] = harvester_db_chain_s(db, first_id)
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


def bare_round(base: Path, index: int, route: Route, log: SourceLog, truth: GroundTruth, concurrency: int) -> Phase:
    entry = DicomSource(name=SOURCE, aet=SOURCE_AET, port=route.source_port, kind="orthanc").modality_entry
    plain = OrthancProcess(base / f"bare{index}-c{concurrency}", DEFAULT_CONFIG, dicom_port=route.dicom_port,
                           http_port=route.http_port, aet=HARVEST_AET, modalities={SOURCE: entry}, plugin=False)
    plain.start()
    try:
        api = RestClient(plain.url, plain.credentials)
        moves = bare_resources(truth)
        log.mark()

        def move(item: tuple[str, list[dict[str, str]]]) -> None:
            level, resources = item
            api.post(f"/modalities/{SOURCE}/move", {"Level": level, "Resources": resources,
                                                   "TargetAet": HARVEST_AET, "Timeout": 600})

        assoc_0 = route.associations()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(move, moves))
        seconds = time.perf_counter() - t0
        finds, moves_logged = log.counts()
        assoc = tuple(b - a for a, b in zip(assoc_0, route.associations(), strict=True))
        stats = api.get("/statistics")
    finally:
        plain.stop()
    shutil.rmtree(plain.run_dir / "storage", ignore_errors=True)
    return Phase(seconds, finds, moves_logged, {"stats": stats, "series_moves": len(moves), "associations": assoc})


def scenario_figures(sc: Scenario, n_patients: int, window: Any, results: Results) -> dict[str, Any]:
    """Medians and per-patient DIMSE counts of one scenario; adds them to ``results`` under its key."""
    h_time = statistics.median(h.seconds for h in sc.harvests)
    bare_1 = statistics.median(b.seconds for b in sc.bares[1])
    bare_2 = statistics.median(b.seconds for b in sc.bares[2])
    last, bare = sc.harvests[-1], sc.bares[1][-1]
    chain = statistics.median(h.extra["chain_s"] for h in sc.harvests)
    fig = {
        "harvest_s": round(h_time, 3), "bare_1_s": round(bare_1, 3), "bare_2_s": round(bare_2, 3),
        "ratio": h_time / min(bare_1, bare_2),
        # The chain before the first image can move, added to the bare transfer: the ratio if the chain were
        # all the harvest added. Not a strict bound: records move during the chain, which the bare transfer
        # moves as part of its time.
        "chain_s": round(chain, 3), "chain_ratio": round((chain + min(bare_1, bare_2)) / min(bare_1, bare_2), 3),
        "finds_per_patient": round(last.finds / n_patients, 1),
        "moves_per_patient": round(last.moves / n_patients, 1),
        "bare_moves_per_patient": round(bare.moves / n_patients, 1),
        "missing": len(set(window.expected) - last.extra["stored"]),
        "forbidden": len(last.extra["stored"] & set(window.forbidden)),
    }
    if sc.delay_s:
        fig["associations_per_patient"] = round(last.extra["associations"][0] / n_patients, 1)
        fig["bare_associations_per_patient"] = round(bare.extra["associations"][0] / n_patients, 1)
    for name, value in fig.items():
        if name != "ratio":
            results.add(sc.key + name, value)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 patients, 100 slices, 1 round")
    ap.add_argument("--patients", type=int, default=None, help="RT patients (default 3; quick 2)")
    ap.add_argument("--slices", type=int, default=None, help="slices per image series (default 150; quick 100)")
    ap.add_argument("--rounds", type=int, default=None, help="harvest/bare pairs (default 2; quick 1)")
    ap.add_argument("--delay-ms", type=float, default=10.0,
                    help="one-way delay of the latency scenario (default 10; 0 leaves the scenario out)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", default=None, help="keeps the generated clinic between runs (default: temp)")
    ap.add_argument("--json", default=None, help="write the figures here (for run_all.py)")
    args = ap.parse_args()
    if args.delay_ms < 0:
        ap.error("--delay-ms must not be negative")
    patients = args.patients or (2 if args.quick else 3)
    slices = args.slices or (100 if args.quick else 150)
    rounds = args.rounds or (1 if args.quick else 2)
    results = Results("harvest_vs_wire")
    delay_label = f"{args.delay_ms:g} ms each way"
    print(f"== harvest vs wire: {patients} RT patients, 512x512, {slices} slices/series, {rounds} round(s); "
          f"loopback{' and ' + delay_label if args.delay_ms else ''} ==")
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

        scenarios = [Scenario("loopback", "", 0.0, ports[0])]
        if args.delay_ms:
            scenarios.append(Scenario(delay_label, "delayed_", args.delay_ms / 1000, free_port()))
        for r in range(rounds):
            for sc in scenarios:
                with sc.route(source.dicom_port, ports[0], ports[1]) as route:
                    base = workdir / sc.key.rstrip("_") if sc.key else workdir

                    def do_harvest(r: int = r, sc: Scenario = sc, route: Route = route, base: Path = base) -> None:
                        h, a = harvest_round(base, r, route, log, truth, deadline_s=1800)
                        sc.harvests.append(h)
                        sc.agains.append(a)
                        print(f"round {r + 1}, {sc.label}: harvest {h.seconds:6.2f} s ({h.finds} C-FIND, "
                              f"{h.moves} C-MOVE, {len(h.extra['moved_uids'])} instances moved); re-harvest "
                              f"{a.seconds:5.2f} s ({a.finds} C-FIND, {a.moves} C-MOVE, "
                              f"{a.extra['arrivals']} arrivals)", flush=True)

                    def do_bare(r: int = r, sc: Scenario = sc, route: Route = route, base: Path = base) -> None:
                        for c in (1, 2):
                            b = bare_round(base, r, route, log, truth, c)
                            sc.bares[c].append(b)
                            print(f"round {r + 1}, {sc.label}: bare, {c} at a time {b.seconds:6.2f} s "
                                  f"({b.moves} C-MOVE for {b.extra['series_moves']} series; "
                                  f"{b.extra['stats']['CountInstances']} stored)", flush=True)

                    for step in ((do_harvest, do_bare) if r % 2 == 0 else (do_bare, do_harvest)):
                        step()

        # -- figures ------------------------------------------------------------------------------
        loop_sc = scenarios[0]
        last = loop_sc.harvests[-1]
        moved = set(last.extra["moved_uids"])
        moved_bytes = sum(truth.objects[u].size for u in moved if u in truth.objects)
        duplicates = max(0, last.extra["arrivals"] - len(moved))
        moved_bytes_total = moved_bytes + duplicates * mean_size
        extra = moved - expected
        missing = expected - last.extra["stored"]
        forbidden = last.extra["stored"] & set(window.forbidden)
        stats = last.extra["stats"]
        again = loop_sc.agains[-1]
        again_bytes = sum(truth.objects[u].size for u in again.extra["moved_uids"] if u in truth.objects)
        again_bytes += max(0, again.extra["arrivals"] - len(again.extra["moved_uids"])) * mean_size
        bare_stored = loop_sc.bares[1][-1].extra["stats"]["CountInstances"]

        print("\n-- figures --")
        stored_mb = int(stats["TotalUncompressedSize"]) / 1e6
        print(f"  store after harvest: {stats['CountInstances']} instances, {stored_mb:.1f}"
              f" MB (Orthanc /statistics); ground truth expects {len(expected)}, {truth_bytes / 1e6:.1f} MB;"
              f" missing {len(missing)}, forbidden kept {len(forbidden)}")
        print(f"  moved: {len(moved)} distinct instances ({len(extra)} beyond the expected ones, "
              f"{sum(truth.objects[u].size for u in extra) / 1e6:.2f} MB), Arrivals={last.extra['arrivals']}"
              f" ({duplicates} duplicate C-STOREs)")
        print(f"  bare moves stored {bare_stored} instances (expected {len(expected)})")
        results.add("patients", n_patients)
        results.add("instances_expected", len(expected))
        results.add("bytes_expected", truth_bytes)
        results.add("rounds", rounds)
        results.add("delay_ms_each_way", args.delay_ms)
        figs = {sc.label: scenario_figures(sc, n_patients, window, results) for sc in scenarios}
        h_time = figs["loopback"]["harvest_s"]
        results.add("harvest_MBps", round(truth_bytes / 1e6 / h_time, 1))
        results.add("bare_MBps", round(truth_bytes / 1e6 / (h_time / figs["loopback"]["ratio"]), 1))
        results.add("reharvest_s", round(again.seconds, 3))
        results.add("reharvest_finds_per_patient", round(again.finds / n_patients, 1))
        results.add("reharvest_moves", again.moves)
        results.add("reharvest_bytes", int(again_bytes))

        print(f"\n  {'network':<18} {'harvest s':>9} {'bare s (1 | 2 at a time)':>25} {'harvest/bare':>12}"
              f" {'C-FIND/pt':>9} {'C-MOVE/pt':>9} {'bare C-MOVE/pt':>14}")
        for label, f in figs.items():
            print(f"  {label:<18} {f['harvest_s']:>9.2f} {f['bare_1_s']:>13.2f} | {f['bare_2_s']:<9.2f}"
                  f" {f['ratio']:>12.2f} {f['finds_per_patient']:>9.1f} {f['moves_per_patient']:>9.1f}"
                  f" {f['bare_moves_per_patient']:>14.1f}")
        print(f"  (median of {rounds} round(s); each ratio against the faster bare run of its own network)\n")
        for label, f in figs.items():
            print(f"  {'chain before the first image, ' + label:<46} {f['chain_s']:>6.2f} s: harvest / bare would be"
                  f" {f['chain_ratio']:.2f} if the chain were all the harvest added")
            results.goal(f"harvest time / bare time, {label}", f["ratio"], 1.3, "{:.2f}",
                         bound=f"chain latency alone {f['chain_ratio']:.2f}")
        results.goal("bytes moved / ground-truth bytes", moved_bytes_total / truth_bytes, 1.01, "{:.4f}",
                     bound="candidates retrieved only to inspect their references")
        for label, f in figs.items():
            print(f"  {'DIMSE per patient, ' + label:<46} {f['finds_per_patient']:>6.1f} C-FIND, "
                  f"{f['moves_per_patient']:.1f} C-MOVE   (bare: {f['bare_moves_per_patient']:.1f} C-MOVE)")
            if "associations_per_patient" in f:
                print(f"  {'associations to the source per patient':<46} {f['associations_per_patient']:>6.1f}"
                      f"   (bare: {f['bare_associations_per_patient']:.1f})")
        print(f"  {'DIMSE per patient (re-harvest, loopback)':<46} {again.finds / n_patients:>6.1f} C-FIND, "
              f"{again.moves / n_patients:.1f} C-MOVE")
        print(f"  {'re-harvest time / first harvest time':<46} {again.seconds / h_time:>12.3f}   "
              f"({again.seconds:.2f} s)")
        results.goal("re-harvest bytes moved", again_bytes, 0, "{:.0f}", bound="instances moved twice")
        for label, f in figs.items():
            if f["missing"] or f["forbidden"]:
                results.note(f"{label}: store differs from the ground truth: {f['missing']} missing, "
                             f"{f['forbidden']} forbidden")
        results.write(args.json)
    finally:
        if source is not None:
            source.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()

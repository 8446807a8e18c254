"""Store scale: Orthanc's SQLite index vs its PostgreSQL index under the harvester, side by side.

A benchmark that prints, not a test:

    .venv/bin/python benchmarks/store_scale.py [--quick] [--instances 200000] [--chunks 10] [--parallel 1] [--together]

Two harvesters (Orthanc + the rtharvest plugin, the same ``docker/orthanc.json`` through the same
launcher) run at once: one keeps its index in SQLite (Orthanc's default), the other in a PostgreSQL
cluster this script starts (initdb in a temporary directory, ``tests/servers.py``), with the settings
of docs/operations.md (EnableIndex, no PostgreSQL storage, Lock, one index connection). Image files stay
on the filesystem in both.

1. **Ingest**: the same small synthetic CT instances (16×16 pixels: the index dominates, not the disk) are
   sent with dcmtk ``storescu`` (``TCP_NODELAY=1``) in chunks, alternately into each store, so both see
   the same machine load; throughput is reported per chunk as the stores grow. ``--parallel N`` sends each
   chunk over N concurrent associations (N ``storescu`` processes, each with its share of the chunk);
   ``--together`` sends each chunk into both stores at the same time instead of one after the other
   (both then see exactly the same machine load, and the run takes about half as long).
2. **At size**: a harvest of the synthetic clinic from a source Orthanc into each full store (time), then
   the harvest's manifest, the whole-store manifest (``GET /rtharvest/manifest``) and the worker's
   per-instance store look-up (``/tools/find`` by SOPInstanceUID) are timed (medians), and the index size
   on disk is read (SQLite ``index`` file; ``pg_database_size``).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from _common import (
    DEFAULT_CONFIG,
    HARVEST_AET,
    LOCALHOST,
    OrthancProcess,
    RestClient,
    Results,
    free_port,
    machine,
    wait_until,
)
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from rtharvest.edge.postgres import parse_url
from rtharvest.synth.generator import SynthOptions, generate
from rtharvest.synth.loader import dicom_files, store_to_scp
from tests.servers import start_orthanc_source, start_postgres

SENDER_AET = "BENCHSCU"
PER_SERIES = 500
SERIES_PER_STUDY = 4


def _uid(kind: int, n: int) -> str:
    # Fixed length (44 characters), so that the template's UIDs can be replaced byte for byte.
    return f"2.25.{kind}{n:038d}"


def write_instances(folder: Path, start: int, count: int, parts: int = 1) -> None:
    """``count`` small CT instances (numbered from ``start``), 500 per series, 4 series per study/patient.

    The files go into ``parts`` subfolders ``part00``… of ``folder`` in contiguous runs (one association
    each, see :func:`send`). One file is made with pydicom; the others are that file with its UIDs and
    PatientID replaced byte for byte (all of fixed length), which is ~100 times faster than serialising each.
    """
    part_folders = [folder / f"part{k:02d}" for k in range(parts)]
    for part_folder in part_folders:
        part_folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, _uid(1, 0)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("template.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, _uid(1, 0)
    ds.PatientID, ds.PatientName = "BENCH00000000", "BENCH^PATIENT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = _uid(2, 0), _uid(3, 0), _uid(4, 0)
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20200101", "CT", 1, 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(range(256)) * 2  # 16×16, 16 bit
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    template = buffer.getvalue()
    for n in range(start, start + count):
        series_n, study_n = n // PER_SERIES, n // (PER_SERIES * SERIES_PER_STUDY)
        data = (template.replace(_uid(1, 0).encode(), _uid(1, n).encode())
                .replace(_uid(2, 0).encode(), _uid(2, study_n).encode())
                .replace(_uid(3, 0).encode(), _uid(3, series_n).encode())
                .replace(_uid(4, 0).encode(), _uid(4, study_n).encode())
                .replace(b"BENCH00000000", f"BENCH{study_n:08d}".encode()))
        part_folder = part_folders[(n - start) * parts // count]
        (part_folder / f"{_uid(1, n)}.dcm").write_bytes(data)


def chunk_files(folder: Path) -> list[Path]:
    """The instance files of one chunk folder (all its parts), sorted."""
    return sorted(folder.glob("part*/*.dcm"))


def send(server: OrthancProcess, folder: Path) -> float:
    """storescu a chunk folder, one association per ``part*`` subfolder, all at once; seconds."""
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-aet", SENDER_AET, "-aec", HARVEST_AET, "+sd", "-xs", LOCALHOST,
                                 str(server.dicom_port), str(part)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
               for part in sorted(folder.glob("part*"))]
    failures = []
    for sender in senders:
        _, stderr = sender.communicate()
        if sender.returncode != 0:
            failures.append(f"storescu failed ({sender.returncode}): {stderr.strip()[-800:]}")
    seconds = time.perf_counter() - t0
    if failures:
        raise RuntimeError("; ".join(failures))
    return seconds


def timed(fn: object, repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 instances in 4 chunks")
    ap.add_argument("--instances", type=int, default=None, help="instances per store (default 200,000)")
    ap.add_argument("--chunks", type=int, default=None, help="ingest chunks (default 10)")
    ap.add_argument("--parallel", type=int, default=1, help="concurrent storescu associations per chunk (default 1)")
    ap.add_argument("--together", action="store_true", help="ingest each chunk into both stores at once")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    count = args.instances or (20_000 if args.quick else 200_000)
    chunks = args.chunks or (4 if args.quick else 10)
    results = Results("store_scale")
    print(f"== store scale: SQLite vs PostgreSQL index, {count} instances each in {chunks} chunks, "
          f"{args.parallel} association(s) per chunk, {'both stores at once' if args.together else 'alternating'} ==")
    print(f"machine: {machine()}", flush=True)
    if shutil.which("storescu") is None:
        raise SystemExit("storescu not found: install Debian's dcmtk")
    tmp = tempfile.TemporaryDirectory(prefix="rth-bench-store-")
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = start_postgres()
    servers: dict[str, OrthancProcess] = {}
    source = None
    try:
        per_chunk = count // chunks
        folders = [workdir / "instances" / f"chunk{i:02d}" for i in range(chunks)]
        t0 = time.perf_counter()
        for i, folder in enumerate(folders):
            if len(list(folder.glob("part*"))) != args.parallel or len(chunk_files(folder)) != per_chunk:
                shutil.rmtree(folder, ignore_errors=True)
                write_instances(folder, i * per_chunk, per_chunk, args.parallel)
        print(f"{per_chunk * chunks} instances written in {time.perf_counter() - t0:.0f} s "
              f"({sum(f.stat().st_size for f in chunk_files(folders[0])) / per_chunk:.0f} bytes each)", flush=True)

        clinic = workdir / "clinic"
        if not (clinic / "ground_truth.json").exists():
            generate(clinic, SynthOptions(patients=6, seed=7), overwrite=True)
        harvest_port = free_port()
        source = start_orthanc_source(workdir / "source", harvest_port)
        store_to_scp(dicom_files(clinic), LOCALHOST, source.port, source.aet)

        sender = {"AET": SENDER_AET, "Host": LOCALHOST, "Port": 1, "AllowEcho": True, "AllowStore": True}
        modalities = {"BENCH": sender, source.name: source.modality_entry}
        overrides = {"RtHarvest.Sources": {source.name: {"Backend": "orthanc", "InstanceReturnKeys": True}}}
        pg_url = cluster.create_database("orthanc_bench")
        for name in ("sqlite", "postgresql"):
            run_dir = workdir / f"harvester-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            # Only one may listen on the DICOM port the source moves to: the other gets its own for ingest.
            servers[name] = OrthancProcess(
                run_dir, DEFAULT_CONFIG, aet=HARVEST_AET, modalities=modalities, overrides=overrides,
                dicom_port=None, postgres=parse_url(pg_url) if name == "postgresql" else None).start(120)
        apis = {name: RestClient(s.url, s.credentials) for name, s in servers.items()}
        for name, api in apis.items():
            index = api.get("/rtharvest/status")["StoreIndex"]
            if index.lower() != name:
                raise SystemExit(f"{name} harvester reports index {index}")

        rates: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        for i, folder in enumerate(folders):
            if args.together:
                with ThreadPoolExecutor(2) as pool:
                    seconds = dict(zip(rates, pool.map(lambda n: send(servers[n], folder), rates), strict=True))  # noqa: B023
                for name, took in seconds.items():
                    rates[name].append(per_chunk / took)
            else:
                order = ("sqlite", "postgresql") if i % 2 == 0 else ("postgresql", "sqlite")
                for name in order:
                    rates[name].append(per_chunk / send(servers[name], folder))
            print(f"chunk {i + 1}/{chunks} (store {(i + 1) * per_chunk}): SQLite {rates['sqlite'][-1]:6.0f} inst/s, "
                  f"PostgreSQL {rates['postgresql'][-1]:6.0f} inst/s", flush=True)
        for name, api in apis.items():
            stored = api.get("/statistics")["CountInstances"]
            if stored != per_chunk * chunks:
                raise SystemExit(f"{name}: {stored} of {per_chunk * chunks} stored")

        sizes = {"sqlite": (servers["sqlite"].run_dir / "storage" / "index").stat().st_size,
                 "postgresql": int(cluster.psql("orthanc_bench", "SELECT pg_database_size('orthanc_bench')"))}
        figures: dict[str, dict[str, float]] = {}
        probe = [p.stem for p in chunk_files(folders[-1])[:: max(1, per_chunk // 100)]]
        for name in ("sqlite", "postgresql"):
            server, api = servers[name], apis[name]
            # The source moves to HARVEST at harvest_port: give this harvester that port for its harvest.
            server.stop()
            servers[name] = OrthancProcess(server.run_dir, DEFAULT_CONFIG, aet=HARVEST_AET, modalities=modalities,
                                           overrides=overrides, dicom_port=harvest_port, http_port=server.http_port,
                                           postgres=parse_url(pg_url) if name == "postgresql" else None).start(300)
            t0 = time.perf_counter()
            harvest = api.post("/rtharvest/harvests", {"Source": source.name, "From": "19000101", "To": "21001231"})
            document = partial(api.get, f"/rtharvest/harvests/{harvest['ID']}")
            wait_until(lambda: document()["State"] == "Completed", 600,  # noqa: B023 - called before the loop moves on
                       interval=0.2, what=f"{name} harvest")
            harvest_s = time.perf_counter() - t0
            manifest_s = timed(partial(api.get, f"/rtharvest/harvests/{harvest['ID']}/manifest"), 5)
            store_manifest_s = timed(partial(api.get, "/rtharvest/manifest"), 5)
            lookups = []
            for sop in probe:
                t1 = time.perf_counter()
                found = api.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop}})
                lookups.append(time.perf_counter() - t1)
                if len(found) != 1:
                    raise SystemExit(f"{name}: look-up of {sop} found {found}")
            figures[name] = {
                "ingest_first_chunk": rates[name][0], "ingest_last_chunk": rates[name][-1],
                "ingest_median": statistics.median(rates[name]), "harvest_s": harvest_s, "manifest_s": manifest_s,
                "store_manifest_s": store_manifest_s, "lookup_ms": statistics.median(lookups) * 1000,
                "index_bytes_per_instance": sizes[name] / (per_chunk * chunks),
            }
            servers[name].stop()

        print("\n-- figures (median where repeated) --")
        rows = [("ingest, first chunk (inst/s)", "ingest_first_chunk", "{:.0f}"),
                ("ingest, last chunk (inst/s)", "ingest_last_chunk", "{:.0f}"),
                ("ingest, median of chunks (inst/s)", "ingest_median", "{:.0f}"),
                ("harvest of the synthetic clinic (s)", "harvest_s", "{:.1f}"),
                ("GET harvests/{id}/manifest (s)", "manifest_s", "{:.3f}"),
                ("GET /rtharvest/manifest, whole store (s)", "store_manifest_s", "{:.3f}"),
                ("/tools/find by SOPInstanceUID (ms)", "lookup_ms", "{:.1f}"),
                ("index on disk per instance (bytes)", "index_bytes_per_instance", "{:.0f}")]
        print(f"  {'':<44} {'SQLite':>10} {'PostgreSQL':>11}")
        for label, key, fmt in rows:
            lite, pg = fmt.format(figures["sqlite"][key]), fmt.format(figures["postgresql"][key])
            print(f"  {label:<44} {lite:>10} {pg:>11}")
            results.add(f"sqlite_{key}", round(figures["sqlite"][key], 4))
            results.add(f"postgresql_{key}", round(figures["postgresql"][key], 4))
        results.add("instances", per_chunk * chunks)
        results.add("associations_per_chunk", args.parallel)
        results.add("both_stores_at_once", args.together)
        results.note("ratios, not absolute rates, are what carries over: the machine is shared")
        results.write(args.json)
    finally:
        for server in servers.values():
            server.stop()
        if source is not None:
            source.stop()
        cluster.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()

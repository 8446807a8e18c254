"""The README's demo: a synthetic clinic, a source holding it, the harvester, and one harvest.

``./run.sh demo`` runs this. It generates a seeded synthetic radiotherapy clinic (every trap of a real
clinic included, with its ground truth), loads it into a plain Orthanc playing the record-and-verify
system "ARIA", starts the harvester from ``docker/orthanc.json`` through the same launcher users and
tests use, harvests every treatment record over REST, checks the store against the ground truth, prints
the Table-1 summary, exports the complete plans de-identified to a folder destination (``RESEARCH``; the
source ``ARIA`` is refused as a destination) and prints the export's verification, and keeps both servers
running for a look in the browser until Ctrl-C (``--exit`` stops right after the export).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..edge.launcher import DEFAULT_CONFIG, LaunchError, OrthancProcess
from ..synth.generator import SynthOptions, generate
from ..synth.groundtruth import GroundTruth, load
from ..synth.loader import dicom_files, store_to_scp

SOURCE_NAME = "ARIA"
EXPORT_FOLDER = "RESEARCH"


class _Api:
    def __init__(self, url: str, credentials: tuple[str, str] | None) -> None:
        self.url = url
        self.headers = {"Content-Type": "application/json"}
        if credentials:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from None


def _clinic(directory: Path, patients: int, seed: int) -> GroundTruth:
    if (directory / "ground_truth.json").is_file():
        truth = load(directory)
        if truth.generator.get("Options", {}).get("patients") == patients and truth.generator.get("Seed") == seed:
            return truth
    print(f"Generating a synthetic clinic of {patients} patients (seed {seed}) in {directory} ...", flush=True)
    return generate(directory, SynthOptions(patients=patients, seed=seed), overwrite=True)


def _start_source(run_dir: Path, harvest_dicom_port: int) -> OrthancProcess:
    config = {
        "Name": SOURCE_NAME,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "OverwriteInstances": True,
    }
    source = OrthancProcess(run_dir, config, aet=SOURCE_NAME, plugin=False,
                            modalities={"HARVEST": ["HARVEST", "127.0.0.1", harvest_dicom_port]})
    return source.start()


def _wait(api: _Api, harvest_id: str, deadline_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < deadline:
        doc: dict[str, Any] = api.call("GET", f"/rtharvest/harvests/{harvest_id}")
        p = doc["Progress"]
        line = (f"  {doc['State']}: {p['JobsDone']}/{p['JobsTotal']} jobs done, {p['JobsRunning']} running, "
                f"{p['JobsFailed']} failed; {doc['PlansCollected']}/{doc['PlansReferenced']} plans")
        if line != last:
            print(line, flush=True)
            last = line
        if doc["State"] == "Completed":
            return doc
        time.sleep(1.0)
    raise RuntimeError(f"the harvest did not complete within {deadline_s:.0f} s")


def _summary(manifest: dict[str, Any], truth: GroundTruth, stored: set[str]) -> None:
    s = manifest["Summary"]
    window = truth.window("all")
    print("\nTable 1 (this harvest)")
    for key in ("Patients", "PlansReferenced", "PlansCollected", "SuccessRate", "TreatmentRecords",
                "PlanningSeries", "ImageSeries", "Registrations", "PlansByIntent", "InvalidPlans"):
        print(f"  {key:<17} {s.get(key)}")
    expected = set(window.expected)
    print(f"\nStore vs ground truth: {len(stored & expected)}/{len(expected)} expected instances present, "
          f"{len(stored - expected)} unexpected")
    for plan in manifest["Plans"]:
        if plan["Status"] != "Complete":
            missing = plan.get("InvalidReason") or "; ".join(f"{m['What']} {m['Reason']}"
                                                             for m in plan.get("Missing", []))
            print(f"  plan {plan['PlanUID'][-12:]} of {plan['PatientID']}: {plan['Status']} {missing}")


def _export(api: _Api, harvest_id: str, folder: Path, deadline_s: float) -> dict[str, Any]:
    """Export the harvest's complete plans to the folder destination and print the outcome."""
    listed = api.call("GET", "/rtharvest/destinations")["Destinations"]
    print("\nDestinations an export may name:")
    for d in listed:
        print(f"  {d['Name']:<10} {d['Kind']:<9} " + ("allowed" if d["Allowed"] else f"refused: {d['Refused']}"))
    print(f"Exporting the complete plans, de-identified, to {EXPORT_FOLDER} ({folder}) ...", flush=True)
    export_id = api.call("POST", "/rtharvest/exports", {"Harvest": harvest_id, "Destination": EXPORT_FOLDER,
                                                        "Label": "demo export"})["ID"]
    deadline = time.monotonic() + deadline_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = api.call("GET", f"/rtharvest/exports/{export_id}")
        if doc["State"] != "Running":
            break
        time.sleep(1.0)
    else:
        raise RuntimeError(f"the export did not finish within {deadline_s:.0f} s")
    p, v, check = doc["Progress"], doc.get("Verification") or {}, doc["PreSendCheck"]
    print(f"  {doc['State']}: {p['PlansSelected']} plan(s), {p['InstancesSent']}/{p['InstancesTotal']} instances "
          f"sent, {p['InstancesVerified']} verified, {p['InstancesHeld']} held back")
    print(f"  checked before sending: {check['Cleaned']} value(s) cleaned in {check['InstancesCleaned']} "
          f"instance(s), {check['Held']} hold(s)")
    print(f"  verification: {'passed' if v.get('Passed') else 'FAILED'}; {v.get('PlansCompared')} plans compared, "
          f"{v.get('PhiHitCount')} PHI hit(s) among {v.get('PhiValuesChecked')} identifying values, "
          f"{len(v.get('ManifestDifferences') or [])} manifest difference(s)")
    print(f"  files: {folder / export_id}   (manifest.json beside them)")
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(prog="rtharvest demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("var/demo"), help="where the demo keeps its data")
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--http-port", type=int, default=8042)
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument("--exit", action="store_true", help="stop after printing the summary")
    parser.add_argument("--consortium", action="store_true",
                        help="two sites export to a consortium archive (rtharvest.central.demo)")
    args = parser.parse_args(argv)
    if args.consortium:
        from ..central.demo import run_consortium

        return run_consortium(args)

    run_dir = args.run_dir.resolve()
    truth = _clinic(run_dir / "clinic", args.patients, args.seed)
    source: OrthancProcess | None = None
    harvester: OrthancProcess | None = None
    exported: dict[str, Any] | None = None
    try:
        source = _start_source(run_dir / "source-aria", args.dicom_port)
        stored = store_to_scp(dicom_files(run_dir / "clinic"), "127.0.0.1", source.dicom_port, SOURCE_NAME)
        print(f"Source {SOURCE_NAME!r} (a plain Orthanc playing ARIA) holds {stored} objects: {source.url}/app/"
              "explorer.html", flush=True)
        harvester = OrthancProcess(
            run_dir / f"harvester-{int(time.time())}", DEFAULT_CONFIG, http_port=args.http_port,
            dicom_port=args.dicom_port,
            modalities={SOURCE_NAME: {"AET": SOURCE_NAME, "Host": "127.0.0.1", "Port": source.dicom_port,
                                      "AllowEcho": True, "AllowStore": True, "AllowFind": False,
                                      "AllowMove": False}},
            overrides={"RtHarvest.Sources": {SOURCE_NAME: {"InstanceReturnKeys": True, "MaxConcurrent": 4}},
                       "RtHarvest.Export": {"Site": "DEMO",
                                            "Folders": {EXPORT_FOLDER: str(run_dir / "exports")}}},
        ).start()
        api = _Api(harvester.url, harvester.credentials)
        window = truth.window("all")
        body = {"Source": SOURCE_NAME, "From": window.date_from, "To": window.date_to, "Label": "demo"}
        print(f"\nHarvesting every treatment record from {window.date_from} to {window.date_to} ...", flush=True)
        started = time.monotonic()
        harvest_id = api.call("POST", "/rtharvest/harvests", body)["ID"]
        _wait(api, harvest_id, deadline_s=900)
        print(f"  done in {time.monotonic() - started:.1f} s")
        manifest = api.call("GET", f"/rtharvest/harvests/{harvest_id}/manifest")
        found = api.call("POST", "/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        _summary(manifest, truth, {i["MainDicomTags"]["SOPInstanceUID"] for i in found})
        exported = _export(api, harvest_id, run_dir / "exports", deadline_s=900)
        creds = harvester.credentials
        print(f"\nHarvester: {harvester.url}/rtharvest/ui   (Orthanc Explorer: {harvester.url}/app/explorer.html)")
        if creds:
            print(f"  user {creds[0]!r}, password {creds[1]!r} (the first-run credential of docker/orthanc.json)")
        print(f"  manifest: {harvester.url}/rtharvest/harvests/{harvest_id}/manifest?format=csv")
        print(f"  export:   {harvester.url}/rtharvest/exports/{exported['ID']}")
        if not args.exit:
            run_until_stopped(harvester)
    except KeyboardInterrupt:
        pass
    except (LaunchError, RuntimeError, OSError) as exc:
        print(f"demo: {exc}")
        return 1
    finally:
        if harvester is not None:
            harvester.stop()
        if source is not None:
            source.stop()
    return 0 if exported is None or exported["State"] == "Completed" else 1


def run_until_stopped(process: OrthancProcess) -> None:
    """Wait until Ctrl-C (or SIGTERM, raised as KeyboardInterrupt) or until ``process`` ends."""
    print("Ctrl-C to stop.", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    while process.process is not None and process.process.poll() is None:
        time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())


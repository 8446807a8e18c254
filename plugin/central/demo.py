"""``./run.sh demo --consortium``: two sites and a consortium archive on this machine.

Each site is a synthetic clinic (different patients, many original UIDs in common), a plain Orthanc
playing its record-and-verify system, and a harvester; the archive is a third Orthanc running the same
plugin with ``RtHarvest.Central`` enabled. Both sites harvest, then export every plan de-identified: site
A by C-STORE, site B by STOW-RS. Each export announces its delivery to the archive, which checks it on
arrival. The demo prints what the archive knows per site and the pooled Table 1, then keeps everything
running for a look at the consortium page until Ctrl-C (``--exit`` stops at once).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..cli.demo import _Api, _clinic, _wait, run_until_stopped
from ..edge.launcher import DEFAULT_CONFIG, LaunchError, OrthancProcess, free_port
from ..synth.loader import dicom_files, store_to_scp

__all__ = ["run_consortium"]

USERS = {"rtharvest": "change-me-on-first-run", "sitea": "site-a-demo-password", "siteb": "site-b-demo-password"}
TOKEN_B = "site-b-demo-delivery-token"
HOST = "127.0.0.1"


def _source(run_dir: Path, name: str, harvester_aet: str, harvester_port: int) -> OrthancProcess:
    config = {"Name": name, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False, "OverwriteInstances": True}
    return OrthancProcess(run_dir, config, aet=name, plugin=False,
                          modalities={"HARVEST": [harvester_aet, HOST, harvester_port]}).start()


def _wait_export(api: _Api, export_id: str, deadline_s: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        doc: dict[str, Any] = api.call("GET", f"/rtharvest/exports/{export_id}")
        if doc["State"] != "Running":
            return doc
        time.sleep(1.0)
    raise RuntimeError(f"export {export_id} did not finish within {deadline_s:.0f} s")


def run_consortium(args: argparse.Namespace) -> int:
    """Run the consortium demo (``args``: run_dir, patients, seed, http_port, dicom_port, exit)."""
    run_dir = Path(args.run_dir).resolve() / "consortium"
    stamp = int(time.time())
    processes: list[OrthancProcess] = []
    try:
        site_ports = {"SITEA": free_port(), "SITEB": free_port()}
        central = OrthancProcess(
            run_dir / f"central-{stamp}", DEFAULT_CONFIG, http_port=args.http_port, dicom_port=args.dicom_port,
            aet="CENTRAL",
            modalities={"SITEA": {"AET": "SITEA_H", "Host": HOST, "Port": site_ports["SITEA"], "AllowEcho": True,
                                  "AllowGet": True, "AllowStore": True, "AllowFind": True, "AllowMove": False}},
            overrides={"RegisteredUsers": USERS, "OverwriteInstances": True, "DicomWeb.Enable": True,
                       "RtHarvest.Sources": {},
                       "RtHarvest.Central": {"Enabled": True, "Sites": {
                           "SITEA": {"AET": "SITEA_H", "Users": ["sitea"]}, "SITEB": {"Token": TOKEN_B}}}},
        ).start()
        processes.append(central)
        admin = _Api(central.url, ("rtharvest", USERS["rtharvest"]))
        print(f"Consortium archive: {central.url}/rtharvest/central/ui", flush=True)
        sites: dict[str, tuple[_Api, str, str]] = {}
        for offset, name in enumerate(("SITEA", "SITEB")):
            patients = max(2, args.patients // 4) + offset
            truth = _clinic(run_dir / f"clinic-{name}", patients, args.seed)
            aet = f"{name}_H"
            source = _source(run_dir / f"source-{name}-{stamp}", f"{name}_RV", aet, site_ports[name])
            processes.append(source)
            stored = store_to_scp(dicom_files(run_dir / f"clinic-{name}"), HOST, source.dicom_port, source.aet)
            user = name.lower()
            # The demo's archive listens on loopback over plain http.
            export: dict[str, Any] = {"Site": name, "ResearchArchives": ["CENTRAL", "CENTRALWEB"],
                                      "AllowCredentialsOverHttp": "loopback"}
            if name == "SITEA":
                destination = "CENTRAL"
                export["Central"] = {"CENTRAL": {"Url": central.url, "Username": user, "Password": USERS[user]}}
            else:
                destination = "CENTRALWEB"
                export["DicomWeb"] = {"CENTRALWEB": {"Url": central.url + "/dicom-web", "Username": user,
                                                     "Password": USERS[user]}}
                export["Central"] = {"CENTRALWEB": {"Url": central.url, "Username": user, "Password": USERS[user],
                                                    "Token": TOKEN_B}}
            harvester = OrthancProcess(
                run_dir / f"harvester-{name}-{stamp}", DEFAULT_CONFIG, dicom_port=site_ports[name], aet=aet,
                modalities={
                    source.aet: {"AET": source.aet, "Host": HOST, "Port": source.dicom_port, "AllowEcho": True,
                                 "AllowStore": True, "AllowFind": False, "AllowMove": False},
                    "CENTRAL": {"AET": "CENTRAL", "Host": HOST, "Port": central.dicom_port, "AllowEcho": True,
                                "AllowStore": True, "AllowFind": False, "AllowMove": False}},
                overrides={"RtHarvest.Sources": {source.aet: {"InstanceReturnKeys": True}},
                           "RtHarvest.Export": export},
            ).start()
            processes.append(harvester)
            api = _Api(harvester.url, harvester.credentials)
            window = truth.window("all")
            harvest_id = api.call("POST", "/rtharvest/harvests", {
                "Source": source.aet, "From": window.date_from, "To": window.date_to, "Label": f"{name} demo"})["ID"]
            print(f"{name}: {patients} patients, {stored} objects at {source.aet}; harvester {harvester.url}/"
                  f"rtharvest/ui harvesting ...", flush=True)
            sites[name] = (api, harvest_id, destination)
        exports = {}
        for name, (api, harvest_id, destination) in sites.items():
            _wait(api, harvest_id, deadline_s=900)
            exports[name] = api.call("POST", "/rtharvest/exports", {"Harvest": harvest_id, "Destination": destination,
                                                                    "Plans": "All"})["ID"]
            print(f"{name}: exporting every plan to {destination} ...", flush=True)
        for name, (api, _, _) in sites.items():
            doc = _wait_export(api, exports[name])
            print(f"{name}: export {doc['State']}, delivery {doc['Verification'].get('Central')}", flush=True)
        print("\nWhat the archive knows per site")
        for site in admin.call("GET", "/rtharvest/central/sites"):
            print(f"  {site['Site']}: {site['PlansDelivered']} plan(s) {site['PlansByHeldStatus']}, "
                  f"verification {site['Verification']}, last delivery {site['LastDelivery']}")
        pooled = admin.call("GET", "/rtharvest/central/summary")["Pooled"]
        print("\nTable 1 (pooled across sites)")
        for key in ("Patients", "PlansReferenced", "PlansCollected", "SuccessRate", "PlansByIntent", "ImageSeries",
                    "Registrations", "TreatmentRecords"):
            print(f"  {key:<17} {pooled.get(key)}")
        print(f"\nConsortium page: {central.url}/rtharvest/central/ui  (user 'rtharvest', password "
              f"{USERS['rtharvest']!r})\n  CSV: {central.url}/rtharvest/central/summary?format=csv")
        if not args.exit:
            run_until_stopped(central)
    except KeyboardInterrupt:
        pass
    except (LaunchError, RuntimeError, OSError) as exc:
        print(f"demo: {exc}")
        return 1
    finally:
        for process in reversed(processes):
            process.stop()
    return 0

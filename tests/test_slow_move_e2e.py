"""A move slower than its job's lease, end to end ("moves that outlive their welcome").

``MoveTimeout`` must be shorter than ``LeaseSeconds``, yet a move can still outlast the lease: with
``Backend: orthanc`` the move is Orthanc's synchronous ``POST /modalities/{name}/move``, whose DICOM
timeout applies per message (half of ``MoveTimeout``), so a source that keeps sending pending responses
keeps the move going past ``MoveTimeout`` until the harvester's HTTP deadline. The worker must extend the
lease meanwhile; otherwise another worker reclaims the job and moves the same series a second time.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rtharvest.synth.groundtruth import GroundTruth
from rtharvest.synth.loader import dicom_files, store_to_scp

from .conftest import Clinic
from .harvesting import assert_store_equals_truth, start_harvest, wait_completed
from .servers import LOCALHOST, start_pynetdicom_qrscp

LEASE_SECONDS = 6.0
#: Orthanc's per-message DICOM timeout is then 3 s, its HTTP deadline 15 s (MoveTimeout + 10 s margin).
MOVE_TIMEOUT = 5.0
#: Seconds before each C-STORE sub-operation: an 8-instance series takes ~8 s to move (> the lease),
#: each pending response well inside Orthanc's 3 s per-message timeout.
SUB_OPERATION_DELAY = 1.0


def test_a_move_slower_than_its_lease_keeps_its_job(clinic: Clinic, loaded: GroundTruth,
                                                    synthetic: tuple[Path, GroundTruth], tmp_path: Path) -> None:
    out, truth = synthetic
    window = truth.window("patient")
    [pid] = window.patient_ids or []
    files = [p for p in dicom_files(out) if p.parent.parent.name == pid]
    move_log = tmp_path / "moves.jsonl"
    source = start_pynetdicom_qrscp(tmp_path / "slow", clinic.harvester.dicom_port, name="SLOWQR", aet="SLOWQR",
                                    move_delay=SUB_OPERATION_DELAY, move_log=move_log)
    try:
        assert store_to_scp(files, LOCALHOST, source.port, source.aet) == len(files)
        clinic.restart_harvester(fresh=True, extra_sources={"SLOWQR": source}, overrides={
            "RtHarvest.LeaseSeconds": LEASE_SECONDS,
            "RtHarvest.SourceDefaults.MoveTimeout": MOVE_TIMEOUT,
            "RtHarvest.Sources.SLOWQR": {"Backend": "orthanc", "QueryModel": "relational", "MaxConcurrent": 4,
                                         "MoveTimeout": MOVE_TIMEOUT},
        })
        harvest_id = start_harvest(clinic.api, window, "SLOWQR")
        wait_completed(clinic.api, harvest_id, deadline_s=180)
        assert_store_equals_truth(clinic.api, window)

        moves = [json.loads(line) for line in move_log.read_text().splitlines()]
        # The premise, measured at the source: at least one move outlasted the lease it started with.
        slowest = max(m["Ended"] - m["Started"] for m in moves)
        assert slowest > LEASE_SECONDS, f"no move outlasted the {LEASE_SECONDS:g} s lease (slowest {slowest:.1f} s)"
        # Nobody took a running move's job over: the source received every move exactly once ...
        repeated = {key: n for key, n in Counter(
            (m["Level"], m["StudyInstanceUID"], m["SeriesInstanceUID"], m["SOPInstanceUID"]) for m in moves
        ).items() if n > 1}
        assert not repeated, f"moved more than once: {repeated}"
        # ... every job ran once, and no lease expired or was lost.
        jobs = clinic.api.get(f"/rtharvest/jobs?harvest={harvest_id}&limit=10000")
        assert jobs and all(j["State"] == "done" for j in jobs), [(j["Kind"], j["State"]) for j in jobs]
        assert [j for j in jobs if j["Attempts"] != 1] == []
        events = clinic.api.get(f"/rtharvest/log?harvest={harvest_id}&limit=10000")
        assert not [e["Message"] for e in events if "lease" in e["Message"].lower()]
    finally:
        source.stop()
        clinic.restart_harvester(fresh=True)

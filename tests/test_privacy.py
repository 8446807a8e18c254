"""What leaves the harvester besides the store: CSV cells that are never formulas; planner reasons and event
messages free of patient identifiers, names, birth dates and treatment dates (in-memory harvests; the
real-server scan is tests/security/test_access.py)."""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

from rtharvest.classify import HarvestWindow
from rtharvest.manifest import ManifestService, csv_cell
from rtharvest.strategies import SourceCapability
from tests.fakes import World
from tests.planner_fixtures import MiniClinic

STRICT = SourceCapability(relational=False, sequence_return_keys=False, instance_return_keys=False)


def test_csv_cells_that_would_start_a_formula_are_text(tmp_path: Path) -> None:
    clinic = MiniClinic()
    clinic.plan.RTPlanLabel = "=HYPERLINK(1)"
    for ds in clinic.datasets():
        if ds.get("PatientID") == "MINI1":
            ds.PatientID = "+MINI1"
    world = World(tmp_path / "q.sqlite", clinic.datasets())
    try:
        hid = world.start(HarvestWindow("20200101", "20201231", ("+MINI1",)))
        world.run()
        text = ManifestService(world.tracker, world.queue, world.store.read).build(hid).to_csv()
    finally:
        world.close()
    rows = list(csv.DictReader(io.StringIO(text)))
    row = next(r for r in rows if r["PlanUID"] == clinic.plan.SOPInstanceUID)
    assert row["PlanLabel"] == "'=HYPERLINK(1)" and row["PatientID"] == "'+MINI1"
    for r in rows:
        for value in r.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), r
    assert [csv_cell(v) for v in ("-1", "@x", "\tx", "a=b", 3, "2012-01-13")] == \
        ["'-1", "'@x", "'\tx", "a=b", 3, "2012-01-13"]


def _phi(clinic: MiniClinic) -> set[str]:
    values: set[str] = set()
    for ds in clinic.datasets():
        values.add(str(ds.get("PatientID") or ""))
        if ds.get("TreatmentDate"):
            values.add(str(ds.TreatmentDate))
    return {v for v in values if v}


def test_events_and_log_lines_of_a_harvest_name_no_patient_and_no_treatment_date(tmp_path: Path) -> None:
    """A strict source makes the harvester inspect and reject other patients' and out-of-window records,
    and the planner explain why: the explanations must not quote what they compare."""
    clinic = MiniClinic()
    phi = _phi(clinic)
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture(logging.DEBUG)
    logging.getLogger("rtharvest").addHandler(handler)
    world = World(tmp_path / "q.sqlite", clinic.datasets(), STRICT)
    try:
        hid = world.start(HarvestWindow("20200101", "20201231", ("MINI1", "QA_PHANTOM")))
        world.run()
        world.finish()
        events = world.events.query(limit=100_000)
        rejected = [e for e in events if "rejected" in e.message]
        assert rejected, "nothing was rejected: the test proves nothing"
        texts = [e.message for e in events] + lines
        texts += [f"{j.last_error} {j.note}" for j in world.queue.list_jobs(harvest_id=hid, limit=100_000)]
    finally:
        logging.getLogger("rtharvest").removeHandler(handler)
        world.close()
    leaked = {v for v in phi for t in texts if re.search(rf"(?<![\w.]){re.escape(v)}(?![\w.])", t)}
    assert not leaked, f"{sorted(leaked)} in {[t for t in texts if any(v in t for v in leaked)][:5]}"

"""What leaves the harvester besides the store: CSV cells that are never formulas; planner reasons and event
messages free of patient identifiers, names, birth dates and treatment dates (in-memory harvests; the
real-server scan is tests/security/test_access.py)."""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

import pytest

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.manifest import ManifestService, csv_cell
from rtharvest.core.strategies import SourceCapability
from rtharvest.store.eventlog import EventLogHandler, Level, PhiSafeFormatter
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


def test_exception_messages_quoting_a_patient_id_stay_out_of_job_errors_events_and_orthancs_log(
        tmp_path: Path) -> None:
    """A bug whose exception message quotes the dataset it choked on (a PatientID here) must not carry it
    into a job's error, an event or Orthanc's log: each shows the exception's type, and the traceback in
    Orthanc's log keeps its frames. Three paths: an internal error in a job, an ingest failure on arrival,
    and planning from the store failing after it."""
    clinic = MiniClinic()
    patient_id = clinic.plan.PatientID
    plan_uid = clinic.plan.SOPInstanceUID
    orthanc_log: list[str] = []

    class OrthancLog(logging.Handler):  # what sdk.OrthancLogHandler sends, with its formatter
        def emit(self, record: logging.LogRecord) -> None:
            orthanc_log.append(self.format(record))

    to_orthanc = OrthancLog(logging.DEBUG)
    to_orthanc.setFormatter(PhiSafeFormatter("rtharvest %(name)s: %(message)s"))
    world = World(tmp_path / "q.sqlite", clinic.datasets())
    to_events = EventLogHandler(world.events)
    to_events.setLevel(logging.WARNING)
    logger = logging.getLogger("rtharvest")
    logger.addHandler(to_orthanc)
    logger.addHandler(to_events)
    real_process, real_execute = world.ingest.process, world.harvester._execute
    crashed: list[int] = []

    def process(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if refs.sop_uid == plan_uid:
            raise ValueError(f"plan of patient {patient_id} does not compare")
        return real_process(refs, orthanc_id, expectations, moved)

    def execute(job, owner):  # type: ignore[no-untyped-def]
        if job.kind == "FindTreatmentRecords" and not crashed:
            crashed.append(job.id)
            raise KeyError(patient_id)
        return real_execute(job, owner)

    world.ingest.process = process  # type: ignore[method-assign]
    world.harvester._execute = execute  # type: ignore[method-assign]
    try:
        hid = world.start(HarvestWindow("20200101", "20201231", (patient_id,)))
        world.run()
        assert to_events.wait_flushed(10.0)
        events = world.events.query(limit=100_000)
        jobs = world.queue.list_jobs(harvest_id=hid, limit=100_000)
    finally:
        logger.removeHandler(to_orthanc)
        logger.removeHandler(to_events)
        to_events.close()
        world.close()
    errors = {j.id: j.last_error or "" for j in jobs}
    # Each path ran (the test proves nothing otherwise) and says what kind of failure it was. The crashed job
    # succeeded on its next attempt, which clears its LastError: its failure stays in the event log.
    assert crashed and any("internal error: KeyError" in e.message for e in events if e.job_id == crashed[0])
    assert world.ingest.failures >= 1
    assert any("from the store failed: ValueError" in e for e in errors.values())
    assert any("ingest of stored instance" in line and "ValueError" in line for line in orthanc_log)
    tracebacks = [line for line in orthanc_log if "Traceback (most recent call last)" in line]
    assert tracebacks and all('File "' in t for t in tracebacks)  # frames kept
    texts = [e.message for e in events] + orthanc_log + [f"{j.last_error} {j.note}" for j in jobs]
    leaked = [t for t in texts if re.search(rf"(?<![\w.]){re.escape(patient_id)}(?![\w.])", t)]
    assert not leaked, leaked[:3]


def test_a_mim_session_error_quoting_the_patient_stays_out_of_the_event(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The MIM path uses the same summary as the rest: an unpacking error whose message quotes the
    session's patient shows its type only."""
    from rtharvest.converters.mim import MimSessionError
    from rtharvest.harvest import mimsessions
    from tests import test_mimsessions as mim

    def unpack(data: bytes) -> None:
        raise MimSessionError(f"session of {mim.P} TEST^MIM has a bad item", damaged=True)

    monkeypatch.setattr(mimsessions, "unpack_bytes", unpack)
    world = World(tmp_path / "q.sqlite", [])
    try:
        mim.store_session(world, mim.session())
        hid = mim.start_unpack(world)
        world.run()
        [warning] = [e for e in mim.events(world, hid) if e.level is Level.WARNING]
    finally:
        world.close()
    assert "cannot be unpacked (MimSessionError (message withheld" in warning.message
    assert mim.P not in warning.message and "TEST^MIM" not in warning.message


def test_stored_problems_are_summaries_not_messages(tmp_path: Path) -> None:
    """``rth_objects.problems`` keeps each problem's code and attribute: a message quoting a value typed by
    hand (a PlanIntent holding a surname here) is not stored."""
    clinic = MiniClinic()
    clinic.plan.PlanIntent = "DOE_JOHN"
    world = World(tmp_path / "q.sqlite", clinic.datasets())
    try:
        hid = world.start(HarvestWindow("20200101", "20201231", ("MINI1",)))
        world.run()
        [plan] = [o for o in world.tracker.objects(hid) if o.sop_uid == clinic.plan.SOPInstanceUID]
        stored = world.db.query("SELECT problems FROM rth_objects WHERE sop_uid = ?", (plan.sop_uid,))
    finally:
        world.close()
    assert "NONSTANDARD_VALUE PlanIntent" in plan.problems
    assert not any("DOE_JOHN" in p for p in plan.problems) and "DOE_JOHN" not in str(stored)

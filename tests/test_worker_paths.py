"""Worker, ingest and tracker paths with in-memory edges (tests/fakes.py): each test injects one fault or
shape of source behaviour and checks the decision, the job's state and the log it leaves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from rtharvest.classify import HarvestWindow
from rtharvest.eventlog import Level
from rtharvest.jobqueue import JobState
from rtharvest.tracking import Decision
from tests.fakes import World
from tests.planner_fixtures import MiniClinic

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))


@pytest.fixture
def clinic() -> MiniClinic:
    return MiniClinic()


@pytest.fixture
def world(tmp_path: Path, clinic: MiniClinic) -> Iterator[World]:
    w = World(tmp_path / "q.sqlite", clinic.datasets())
    yield w
    w.close()


def kept(world: World, harvest_id: str) -> set[str]:
    return {o.sop_uid for o in world.tracker.objects(harvest_id, Decision.KEPT)}


def test_fault_free_harvest_keeps_the_closure(world: World, clinic: MiniClinic) -> None:
    """The baseline the fault tests compare with: the fakes give the hand-derived closure."""
    hid = world.start(WINDOW_2020)
    world.run()
    assert kept(world, hid) == clinic.expected_2020() - {clinic.qa_plan.SOPInstanceUID, clinic.qa_record.SOPInstanceUID}
    assert world.queue.counts(hid).get(JobState.FAILED, 0) == 1  # the plan no source holds


def test_ingest_failure_in_on_stored_is_planned_from_the_store(world: World, clinic: MiniClinic) -> None:
    """A decision that cannot be recorded on arrival (SQLite busy) no longer ends the chain: the job that
    moved the plan plans it from the store, the chain reaches the images, and the failure is logged with the
    harvest and job."""
    plan_uid = clinic.plan.SOPInstanceUID
    real = world.ingest.process
    failed: list[str] = []

    def flaky(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if refs.sop_uid == plan_uid and moved and not failed:
            failed.append(refs.sop_uid)
            raise apsw.BusyError("database is locked")
        return real(refs, orthanc_id, expectations, moved)

    world.ingest.process = flaky  # type: ignore[method-assign]
    handler_events: list[tuple[int, str, dict]] = []
    import logging

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handler_events.append((record.levelno, record.getMessage(), dict(record.__dict__)))

    cap = Capture()
    logging.getLogger("rtharvest").addHandler(cap)
    try:
        hid = world.start(WINDOW_2020)
        world.run()
    finally:
        logging.getLogger("rtharvest").removeHandler(cap)
    assert failed == [plan_uid]
    decisions = {o.sop_uid: o for o in world.tracker.objects(hid)}
    assert decisions[plan_uid].decision is Decision.KEPT and decisions[plan_uid].moved
    # The chain went on from the plan: structure set, planning CT, doses.
    assert {clinic.ss.SOPInstanceUID, clinic.dose.SOPInstanceUID, *(i.SOPInstanceUID for i in clinic.ct_sim)} \
        <= kept(world, hid)
    assert kept(world, hid) == clinic.expected_2020() - {clinic.qa_plan.SOPInstanceUID, clinic.qa_record.SOPInstanceUID}
    # Logged (Orthanc's log and, through its handler, the event log) with harvest and job, no PHI.
    errors = [(m, extra) for level, m, extra in handler_events if level >= logging.ERROR]
    assert len(errors) == 1 and "ingest of stored instance" in errors[0][0]
    assert errors[0][1]["harvest_id"] == hid and errors[0][1]["sop_uid"] == plan_uid
    plan_job = world.queue.get_job(errors[0][1]["job_id"])
    assert plan_job.state is JobState.DONE and plan_job.payload["sop_uid"] == plan_uid
    warnings = [e for e in world.events.query(harvest_id=hid, min_level=Level.WARNING) if e.job_id == plan_job.id]
    assert any("no decision after the move" in e.message for e in warnings)
    assert world.ingest.failures == 1


def test_ingest_failure_that_persists_fails_the_job_visibly(world: World, clinic: MiniClinic) -> None:
    """When planning from the store fails as well, the job fails with the reason (and is retried), rather
    than completing with an instance nobody decided on."""
    plan_uid = clinic.plan.SOPInstanceUID
    real = world.ingest.process

    def broken(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if refs.sop_uid == plan_uid:
            raise apsw.BusyError("database is locked")
        return real(refs, orthanc_id, expectations, moved)

    world.ingest.process = broken  # type: ignore[method-assign]
    hid = world.start(WINDOW_2020)
    world.run()
    failed = world.queue.list_jobs(harvest_id=hid, state="failed")
    plan_jobs = [j for j in failed if j.payload.get("sop_uid") == plan_uid]
    assert len(plan_jobs) == 1
    job = plan_jobs[0]
    assert job.attempts == 3  # retried up to the cap (MaxAttempts 3 in World)
    # The first attempt found it undecided after the move; later ones find it stored and plan from there.
    assert "from the store failed: BusyError" in (job.last_error or "")
    first_failure = [e for e in world.events.query(harvest_id=hid, job_id=job.id) if "failed (attempt 1)" in e.message]
    assert len(first_failure) == 1
    assert "ingest failed for 1 stored instance(s) after the move" in first_failure[0].message
    assert not world.tracker.has_object(hid, plan_uid)
    assert clinic.ss.SOPInstanceUID not in kept(world, hid)

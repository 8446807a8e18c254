"""Worker, ingest and tracker paths with in-memory edges (tests/fakes.py): each test injects one fault or
shape of source behaviour and checks the decision, the job's state and the log it leaves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import apsw
import pytest
from pydicom.dataset import Dataset

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import CriterionKind, FindReferencing, Hop, ReferenceCriterion, RetrieveSeries, Role
from rtharvest.core.strategies import QueryLevel
from rtharvest.edge.config import load_config
from rtharvest.harvest.harvests import HarvestService
from rtharvest.harvest.ingest import _PRIORITY_BY_HOP, job_for, job_priority
from rtharvest.store.eventlog import EventLogHandler, Level
from rtharvest.store.jobqueue import JobState
from rtharvest.store.tracking import Decision, Expectation
from tests.fakes import World, dicom_bytes
from tests.planner_fixtures import MiniClinic, image_series

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))


@pytest.fixture
def logged_events(fake_world: World) -> Iterator[EventLogHandler]:
    """Log records into the event log, as the plugin wires them (``app.py``: WARNING and up)."""
    handler = EventLogHandler(fake_world.events)
    handler.setLevel(logging.WARNING)
    logging.getLogger("rtharvest").addHandler(handler)
    yield handler
    logging.getLogger("rtharvest").removeHandler(handler)
    handler.close()


def harvest_document(fake_world: World, harvest_id: str) -> dict[str, Any]:
    """What ``GET /rtharvest/harvests/{id}`` answers, from the real service on the world's database."""
    config = load_config({"DicomModalities": {"SRC": ["SRC", "127.0.0.1", 11112]},
                          "StorageDirectory": str(Path(fake_world.db.path).parent)})
    service = HarvestService(config, fake_world.queue, fake_world.tracker, fake_world.events)
    return service.document(fake_world.queue.get_harvest(harvest_id))


def kept(fake_world: World, harvest_id: str) -> set[str]:
    return {o.sop_uid for o in fake_world.tracker.objects(harvest_id, Decision.KEPT)}


def test_fault_free_harvest_keeps_the_closure(fake_world: World, mini_clinic: MiniClinic) -> None:
    """The baseline the fault tests compare with: the fakes give the hand-derived closure."""
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    assert kept(fake_world, hid) == (
        mini_clinic.expected_2020() - {mini_clinic.qa_plan.SOPInstanceUID, mini_clinic.qa_record.SOPInstanceUID})
    assert fake_world.queue.counts(hid).get(JobState.FAILED, 0) == 1  # the plan no source holds


def fail_first_ingest_of(fake_world: World, sop_uid: str) -> list[str]:
    """Make the ingest of the first moved arrival of ``sop_uid`` fail as SQLite busy would; the returned list
    holds the UID once that happened."""
    real = fake_world.ingest.process
    failed: list[str] = []

    def flaky(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if refs.sop_uid == sop_uid and moved and not failed:
            failed.append(refs.sop_uid)
            raise apsw.BusyError("database is locked")
        return real(refs, orthanc_id, expectations, moved)

    fake_world.ingest.process = flaky  # type: ignore[method-assign]
    return failed


def test_ingest_failure_in_on_stored_is_planned_from_the_store(fake_world: World, mini_clinic: MiniClinic) -> None:
    """A decision that cannot be recorded on arrival (SQLite busy) no longer ends the chain: the job that
    moved the plan plans it from the store, the chain reaches the images, and the failure is logged with the
    harvest and job."""
    plan_uid = mini_clinic.plan.SOPInstanceUID
    failed = fail_first_ingest_of(fake_world, plan_uid)
    handler_events: list[tuple[int, str, dict]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handler_events.append((record.levelno, record.getMessage(), dict(record.__dict__)))

    cap = Capture()
    logging.getLogger("rtharvest").addHandler(cap)
    try:
        hid = fake_world.start(WINDOW_2020)
        fake_world.run()
    finally:
        logging.getLogger("rtharvest").removeHandler(cap)
    assert failed == [plan_uid]
    decisions = {o.sop_uid: o for o in fake_world.tracker.objects(hid)}
    assert decisions[plan_uid].decision is Decision.KEPT and decisions[plan_uid].moved
    # The chain went on from the plan: structure set, planning CT, doses.
    assert {mini_clinic.ss.SOPInstanceUID, mini_clinic.dose.SOPInstanceUID,
            *(i.SOPInstanceUID for i in mini_clinic.ct_sim)} <= kept(fake_world, hid)
    assert kept(fake_world, hid) == (
        mini_clinic.expected_2020() - {mini_clinic.qa_plan.SOPInstanceUID, mini_clinic.qa_record.SOPInstanceUID})
    # Logged (Orthanc's log and, through its handler, the event log) with harvest and job, no PHI.
    errors = [(m, extra) for level, m, extra in handler_events if level >= logging.ERROR]
    assert len(errors) == 1 and "ingest of stored instance" in errors[0][0]
    assert errors[0][1]["harvest_id"] == hid and errors[0][1]["sop_uid"] == plan_uid
    plan_job = fake_world.queue.get_job(errors[0][1]["job_id"])
    assert plan_job.state is JobState.DONE and plan_job.payload["sop_uid"] == plan_uid
    assert "1 planned from the store after their ingest failed" in (plan_job.note or "")
    warnings = [e for e in fake_world.events.query(harvest_id=hid, min_level=Level.WARNING) if e.job_id == plan_job.id]
    assert any("no decision after the move" in e.message for e in warnings)
    assert fake_world.ingest.failures == 1


def test_ingest_failure_that_persists_fails_the_job_visibly(fake_world: World, mini_clinic: MiniClinic) -> None:
    """When planning from the store fails as well, the job fails with the reason (and is retried), rather
    than completing with an instance nobody decided on."""
    plan_uid = mini_clinic.plan.SOPInstanceUID
    real = fake_world.ingest.process

    def broken(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if refs.sop_uid == plan_uid:
            raise apsw.BusyError("database is locked")
        return real(refs, orthanc_id, expectations, moved)

    fake_world.ingest.process = broken  # type: ignore[method-assign]
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    failed = fake_world.queue.list_jobs(harvest_id=hid, state="failed")
    plan_jobs = [j for j in failed if j.payload.get("sop_uid") == plan_uid]
    assert len(plan_jobs) == 1
    job = plan_jobs[0]
    assert job.attempts == 3  # retried up to the cap (MaxAttempts 3 in World)
    # The first attempt found it undecided after the move; later ones find it stored and plan from there.
    assert "from the store failed: BusyError" in (job.last_error or "")
    first_failure = [e for e in fake_world.events.query(harvest_id=hid, job_id=job.id)
                     if "failed (attempt 1)" in e.message]
    assert len(first_failure) == 1
    assert "ingest failed for 1 stored instance(s) after the move" in first_failure[0].message
    assert not fake_world.tracker.has_object(hid, plan_uid)
    assert mini_clinic.ss.SOPInstanceUID not in kept(fake_world, hid)


def test_an_ingest_failure_is_counted_in_the_harvest_document(fake_world: World, mini_clinic: MiniClinic,
                                                               logged_events: EventLogHandler) -> None:
    """The chain goes on (planned from the store), yet the harvest document says an ingest failed, so a
    harvest whose jobs all completed still tells its reader to look at the log; a harvest without one says 0."""
    plan_uid = mini_clinic.plan.SOPInstanceUID
    failed = fail_first_ingest_of(fake_world, plan_uid)
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    again = fake_world.start(WINDOW_2020)  # planned from the store: no arrival, no failure
    fake_world.run()
    assert logged_events.wait_flushed(10.0) and logged_events.dropped == 0
    assert failed == [plan_uid]
    assert kept(fake_world, hid) == (
        mini_clinic.expected_2020() - {mini_clinic.qa_plan.SOPInstanceUID, mini_clinic.qa_record.SOPInstanceUID})
    assert harvest_document(fake_world, hid)["IngestFailures"] == 1
    assert harvest_document(fake_world, again)["IngestFailures"] == 0


def test_a_failed_expectation_look_up_on_arrival_is_counted_and_planned_from_the_store(
        fake_world: World, mini_clinic: MiniClinic, logged_events: EventLogHandler) -> None:
    """OnStoredInstance cannot even learn who expects the instance (the look-up raises): it neither raises
    into Orthanc nor drops the instance silently. The failure is counted and logged with the SOP UID only
    (no harvest is known), and the job that moved the plan finds it undecided in the store and plans it."""
    plan_uid = mini_clinic.plan.SOPInstanceUID
    real = fake_world.tracker.expectations_for
    raised: list[str] = []

    def failing_look_up(sop_uid: str):  # type: ignore[no-untyped-def]
        if sop_uid == plan_uid and not raised:
            raised.append(sop_uid)
            raise apsw.BusyError("database is locked")
        return real(sop_uid)

    fake_world.tracker.expectations_for = failing_look_up  # type: ignore[method-assign]
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    assert logged_events.wait_flushed(10.0) and logged_events.dropped == 0
    assert raised == [plan_uid]
    assert fake_world.ingest.failures == 1
    decisions = {o.sop_uid: o for o in fake_world.tracker.objects(hid)}
    assert decisions[plan_uid].decision is Decision.KEPT and decisions[plan_uid].moved
    assert kept(fake_world, hid) == (
        mini_clinic.expected_2020() - {mini_clinic.qa_plan.SOPInstanceUID, mini_clinic.qa_record.SOPInstanceUID})
    plan_job = next(j for j in fake_world.queue.list_jobs(harvest_id=hid) if j.payload.get("sop_uid") == plan_uid)
    assert plan_job.state is JobState.DONE
    assert "1 planned from the store after their ingest failed" in (plan_job.note or "")
    logged = [e for e in fake_world.events.query(min_level=Level.ERROR) if e.component == "ingest"]
    assert len(logged) == 1
    assert logged[0].sop_uid == plan_uid and logged[0].harvest_id is None and logged[0].job_id is None
    assert "BusyError: database is locked" in logged[0].message


# -- signal, not noise -------------------------------------------------------------------------------


def test_a_fault_free_harvest_warns_about_nothing(fake_world: World, mini_clinic: MiniClinic) -> None:
    """The slices a contour image's series brings as candidates, the candidates a search inspects and the
    re-planning of stored copies are expected: no WARNING. The one ERROR is the plan no source holds."""
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    # The whole-series path ran: slices other than the contour image were moved as candidates first.
    ct_series = mini_clinic.ct_sim[0].SeriesInstanceUID
    slices = {o.sop_uid: o for o in fake_world.tracker.objects(hid) if o.series_uid == ct_series}
    assert len(slices) == len(mini_clinic.ct_sim) and all(o.decision is Decision.KEPT for o in slices.values())
    assert any(len(uids) == len(mini_clinic.ct_sim) for _, uids in fake_world.backend.moves)
    loud = fake_world.events.query(harvest_id=hid, min_level=Level.WARNING)
    assert [(e.level, e.component) for e in loud] == [(Level.ERROR, "harvester")], loud
    assert mini_clinic.missing_plan_uid in loud[0].message and "failed for good" in loud[0].message


def test_a_re_harvest_writes_one_summary_event(fake_world: World, mini_clinic: MiniClinic) -> None:
    first = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    again = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    assert kept(fake_world, again) == kept(fake_world, first)
    events = fake_world.events.query(harvest_id=again, limit=10_000)
    per_instance = [e for e in events if e.sop_uid is not None]
    assert per_instance == [], per_instance[:3]
    summaries = [e for e in events if e.message.startswith("harvest finished:")]
    assert len(summaries) == 1
    n = len(kept(fake_world, again))
    assert f"{n} instance(s) kept (0 moved, {n} already in the store)" in summaries[0].message
    # Nothing of the re-harvest needs a person except the plan that is still missing.
    assert [e.level for e in events if e.level >= Level.WARNING] == [Level.ERROR]


# -- moves: partial warnings, in-flight instances ------------------------------------------------------


def series_job(fake_world: World, harvest_id: str, series: Sequence[Dataset]) -> None:
    first = series[0]
    op = RetrieveSeries(first.PatientID, first.StudyInstanceUID, first.SeriesInstanceUID, Role.PLANNING_SERIES,
                        Hop.STRUCTURE_SET_SERIES)
    fake_world.queue.enqueue_many([job_for(fake_world.routes[harvest_id], op)])


def test_a_warning_status_is_checked_by_arrival_and_only_the_rest_moves_again(fake_world: World,
                                                                              mini_clinic: MiniClinic) -> None:
    hid = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY",)))  # a harvest with no records
    fake_world.run()
    series_job(fake_world, hid, mini_clinic.ct_sim)
    withheld = mini_clinic.ct_sim[2].SOPInstanceUID
    fake_world.backend.move_status, fake_world.backend.withhold = 0xB000, {withheld}
    job = fake_world.queue.claim("t:1:w0", 60.0)
    assert job is not None and job.kind == "RetrieveSeries"
    fake_world.harvester.run(job, "t:1:w0")
    after = fake_world.queue.get_job(job.id)
    assert after.state is JobState.WAITING and after.dimse_status == 0xB000
    assert "1 of 4 instance(s) did not arrive" in (after.last_error or "") and withheld in (after.last_error or "")
    fake_world.backend.move_status, fake_world.backend.withhold = None, set()
    fake_world.run()
    done = fake_world.queue.get_job(job.id)
    assert done.state is JobState.DONE and done.attempts == 2
    # The retry moved only the missing slice, by instance (the other moves are the FoR series' follow-ups).
    ct_uids = {i.SOPInstanceUID for i in mini_clinic.ct_sim}
    later = [m for m in fake_world.backend.moves[1:] if set(m[1]) & ct_uids]
    assert later == [(QueryLevel.IMAGE, (withheld,))]
    assert {i.SOPInstanceUID for i in mini_clinic.ct_sim} <= kept(fake_world, hid)


def test_a_warning_status_with_everything_delivered_completes(fake_world: World, mini_clinic: MiniClinic) -> None:
    hid = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY",)))
    fake_world.run()
    series_job(fake_world, hid, mini_clinic.ct_sim)
    fake_world.backend.move_status = 0xB007
    fake_world.run()
    jobs = fake_world.queue.list_jobs(harvest_id=hid)
    mine = [j for j in jobs if j.payload.get("series_uid") == mini_clinic.ct_sim[0].SeriesInstanceUID]
    assert [(j.state, j.attempts) for j in mine] == [(JobState.DONE, 1)]
    assert all(j.state is JobState.DONE for j in jobs)  # the follow-ups' moves answered 0xB007 too


def test_the_window_s_records_move_in_one_call(fake_world: World, mini_clinic: MiniClinic) -> None:
    """Each treatment record is its own study and series: the window's records of a patient still move in
    one call (one association: its set-up and release are paid once, not once per record)."""
    hid = fake_world.start(WINDOW_2020)
    job = fake_world.queue.claim("t:1:w0", 60.0)
    assert job is not None and job.kind == "FindTreatmentRecords"
    fake_world.harvester.run(job, "t:1:w0")
    in_2020 = {r.SOPInstanceUID for r in mini_clinic.records[:3]} | {mini_clinic.orphan_record.SOPInstanceUID}
    assert len({r.SeriesInstanceUID for r in mini_clinic.records[:3]}) == 3
    assert [(lvl, set(uids)) for lvl, uids in fake_world.backend.moves] == [(QueryLevel.IMAGE, in_2020)]
    done = fake_world.queue.get_job(job.id)
    assert done.state is JobState.DONE and "4 instance(s) moved" in (done.note or "")
    assert "earlier searches), 4 C-MOVE" in (done.note or "")  # one request per record, as the source counts them
    assert in_2020 <= kept(fake_world, hid)


def test_a_plans_record_search_leaves_the_records_its_harvest_kept_alone(fake_world: World,
                                                                         mini_clinic: MiniClinic) -> None:
    """Each plan's record search offers the records the window's search kept already: they are neither looked
    up in the store nor read again (the search plans no hop, and a kept decision never changes), and the
    harvest still keeps the whole closure."""
    found: list[str] = []  # look-ups that found the instance stored (the window's search looks first, in vain)
    read: list[str] = []
    store = fake_world.store
    lookup, read_file = store.lookup, store.read

    def counted_lookup(sop_uid: str) -> str | None:
        oid = lookup(sop_uid)
        if oid is not None:
            found.append(sop_uid)
        return oid

    def counted_read(orthanc_id: str) -> bytes:
        read.append(orthanc_id)
        return read_file(orthanc_id)

    store.lookup = counted_lookup  # type: ignore[method-assign]
    store.read = counted_read  # type: ignore[method-assign]
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    records = {r.SOPInstanceUID for r in mini_clinic.records[:3]}
    assert records <= kept(fake_world, hid)
    record_ids = {store.by_sop[uid] for uid in records}
    assert not records & set(found) and not record_ids & set(read)
    plan_searches = [j for j in fake_world.queue.list_jobs(hid) if j.kind == "FindReferencing"
                     and j.payload.get("role") == Role.PLAN_RECORD.value]
    assert plan_searches and all(j.state is JobState.DONE for j in plan_searches)


def test_a_record_missing_from_a_shared_move_fails_the_job_and_only_it_moves_again(fake_world: World,
                                                                                   mini_clinic: MiniClinic) -> None:
    hid = fake_world.start(WINDOW_2020)
    withheld = mini_clinic.records[1].SOPInstanceUID
    fake_world.backend.withhold = {withheld}
    job = fake_world.queue.claim("t:1:w0", 60.0)
    assert job is not None and job.kind == "FindTreatmentRecords"
    fake_world.harvester.run(job, "t:1:w0")
    after = fake_world.queue.get_job(job.id)
    assert after.state is JobState.WAITING
    assert "1 of 4 instance(s) did not arrive" in (after.last_error or "") and withheld in (after.last_error or "")
    delivered = {mini_clinic.records[0].SOPInstanceUID, mini_clinic.records[2].SOPInstanceUID}
    assert delivered <= kept(fake_world, hid)  # what arrived was decided, not lost with the failed attempt
    fake_world.backend.withhold = set()
    before = len(fake_world.backend.moves)
    retry = fake_world.queue.claim("t:1:w0", 60.0)  # due at once: this world retries without backoff
    assert retry is not None and retry.id == job.id
    fake_world.harvester.run(retry, "t:1:w0")
    assert fake_world.backend.moves[before:] == [(QueryLevel.IMAGE, (withheld,))]
    assert fake_world.queue.get_job(job.id).state is JobState.DONE


@pytest.mark.parametrize("hidden", ["pet_sim", "extra"])
def test_a_series_that_lists_no_instances_does_not_stop_the_others_of_its_search(tmp_path: Path,
                                                                               mini_clinic: MiniClinic,
                                                                               hidden: str) -> None:
    """A FoR search finds two more series; the source lists no instances for one of them (a series index
    ahead of its images): the other still moves, whichever the source answered first."""
    frame = mini_clinic.ct_sim[0].FrameOfReferenceUID
    extra = image_series("extra-mr", mini_clinic.patient, mini_clinic.plan_study, frame, "MR", 2)
    fake_world = World(tmp_path / "q.sqlite", [*mini_clinic.datasets(), *extra])
    try:
        hidden_series = mini_clinic.pet_sim if hidden == "pet_sim" else extra
        gone = hidden_series[0].SeriesInstanceUID
        real_find = fake_world.backend.find

        def find(level, keys, *, timeout=None):  # type: ignore[no-untyped-def]
            answers = real_find(level, keys, timeout=timeout)
            if level is QueryLevel.IMAGE and keys.get("SeriesInstanceUID") == gone:
                return []
            return answers

        fake_world.backend.find = find  # type: ignore[method-assign]
        hid = fake_world.start(WINDOW_2020)
        fake_world.run()
        shown = extra if hidden == "pet_sim" else mini_clinic.pet_sim
        assert {ds.SOPInstanceUID for ds in shown} <= kept(fake_world, hid)
        assert not {ds.SOPInstanceUID for ds in hidden_series} & kept(fake_world, hid)
    finally:
        fake_world.close()


def test_provenance_waits_for_arrivals_to_pause_at_most_the_lag(fake_world: World, mini_clinic: MiniClinic) -> None:
    """Provenance is written when arrivals pause, while they keep coming once it has waited the lag, and at
    once for a harvest whose jobs are all done."""
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    h = fake_world.harvester
    last = fake_world.ingest.last_arrival
    assert last > 0 and fake_world.tracker.pending_provenance_of(hid)
    h.provenance.clock = lambda: last + 0.1  # instances still streaming in
    assert not h.provenance.due(harvest_finishing=False)
    assert h.provenance.due(harvest_finishing=True)
    h.provenance.clock = lambda: last + h.provenance.PROVENANCE_QUIET_S + 0.001  # (last+0.3)-last may round below 0.3
    assert h.provenance.due(harvest_finishing=False)
    while h.provenance.write():
        pass
    assert not fake_world.tracker.pending_provenance_of(hid)
    # Arrivals go on: deferred from the first look, due once that is the lag ago although they still come.
    h.provenance.PROVENANCE_MAX_LAG_S = 0.05
    fake_world.on_stored("late-copy", dicom_bytes(mini_clinic.unrelated[0]), "SRC")
    first_look = fake_world.ingest.last_arrival + 0.01
    h.provenance.clock = lambda: first_look
    assert not h.provenance.due(harvest_finishing=False)
    fake_world.on_stored("late-copy-2", dicom_bytes(mini_clinic.unrelated[1]), "SRC")
    now = max(fake_world.ingest.last_arrival, first_look) + 0.051  # the lag ago (float rounding aside)
    h.provenance.clock = lambda: now
    assert now - fake_world.ingest.last_arrival < h.provenance.PROVENANCE_QUIET_S  # still streaming
    assert h.provenance.due(harvest_finishing=False)
    assert not h.provenance.write()  # nothing left to write: caught up
    h.provenance.PROVENANCE_MAX_LAG_S = 10.0
    assert not h.provenance.due(harvest_finishing=False)  # caught up: the lag starts again


def test_instances_another_job_is_moving_are_awaited_not_moved_twice(fake_world: World,
        mini_clinic: MiniClinic) -> None:
    """Two harvests want the same series at once: the second is given back to the queue while the first one
    moves it (holding no job slot of the source), then plans the arrived copies from the store; the source
    sends the series once."""
    h1 = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY",)))
    h2 = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY2",)))
    fake_world.run()
    series_job(fake_world, h1, mini_clinic.ct_sim)
    series_job(fake_world, h2, mini_clinic.ct_sim)
    fake_world.harvester.RECHECK_IN_FLIGHT_S = 0.0  # due again at once, for fake_world.run() below
    waiting = threading.Event()
    real_in_flight = fake_world.tracker.in_flight

    def in_flight(uids, exclude_job):  # type: ignore[no-untyped-def]
        busy = real_in_flight(uids, exclude_job)
        if busy:
            waiting.set()  # the second job found the first one's instances in flight
        return busy

    fake_world.tracker.in_flight = in_flight  # type: ignore[method-assign]
    real_move = fake_world.backend.move

    def slow_move(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert waiting.wait(60), "the second job never looked for in-flight instances"
        return real_move(*args, **kwargs)

    fake_world.backend.move = slow_move  # type: ignore[method-assign]
    first = fake_world.queue.claim("t:1:w0", 60.0)
    second = fake_world.queue.claim("t:1:w1", 60.0)
    assert first is not None and second is not None and first.harvest_id == h1
    mover = threading.Thread(target=fake_world.harvester.run, args=(first, "t:1:w0"))
    mover.start()
    fake_world.harvester.run(second, "t:1:w1")
    mover.join(60)
    assert not mover.is_alive()
    # Whichever recorded its expectations first moved; the other went back to the queue, attempt not counted.
    after = sorted((fake_world.queue.get_job(j.id) for j in (first, second)), key=lambda j: j.state.value)
    assert [j.state for j in after] == [JobState.DONE, JobState.PENDING]
    assert after[1].attempts == 0 and after[1].last_error is None  # not a retry: it reuses the harvest's C-FINDs
    finds = len(fake_world.backend.finds)
    again = fake_world.queue.claim("t:1:w1", 60.0)  # the series request outranks the follow-ups the move planned
    assert again is not None and again.id == after[1].id
    fake_world.harvester.run(again, "t:1:w1")
    assert [lvl for lvl, _ in fake_world.backend.moves] == [QueryLevel.SERIES]
    assert len(fake_world.backend.finds) == finds  # its series listing came from the harvest's C-FIND answers
    ended = [fake_world.queue.get_job(j.id) for j in (first, second)]
    notes = sorted((j.state, j.note or "") for j in ended)
    assert all(state is JobState.DONE for state, _ in notes)
    assert sorted("4 instance(s) moved, 0 already stored" in n for _, n in notes) == [False, True]
    assert sum("0 instance(s) moved, 4 already stored" in n for _, n in notes) == 1, notes
    expected = {i.SOPInstanceUID for i in mini_clinic.ct_sim}
    assert expected <= kept(fake_world, h1) and expected <= kept(fake_world, h2)


def test_a_job_stops_waiting_for_a_move_that_never_ends_and_moves_itself(fake_world: World,
                                                                        mini_clinic: MiniClinic) -> None:
    """Another job holds the series' expectations but never delivers (its worker hangs): the job waiting for
    it is given back each time it looks, for at most the source's move timeout; then it moves the series."""
    h1 = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY",)))
    h2 = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY2",)))
    fake_world.run()
    series_job(fake_world, h1, mini_clinic.ct_sim)
    series_job(fake_world, h2, mini_clinic.ct_sim)
    hung = fake_world.queue.claim("t:1:w0", 600.0)
    assert hung is not None and hung.harvest_id == h1
    fake_world.tracker.expect([Expectation(h1, ds.SOPInstanceUID, hung.id, "SRC", Role.PLANNING_SERIES.value,
                                      Hop.STRUCTURE_SET_SERIES, False, hung.payload) for ds in mini_clinic.ct_sim])
    fake_world.harvester.RECHECK_IN_FLIGHT_S = 0.0
    waiter = fake_world.queue.claim("t:1:w1", 60.0)
    assert waiter is not None and waiter.harvest_id == h2
    fake_world.harvester.run(waiter, "t:1:w1")
    job = fake_world.queue.get_job(waiter.id)
    assert (job.state, job.attempts) == (JobState.PENDING, 0) and fake_world.backend.moves == []
    # The move timeout (5 s in the fakes) has passed since it first found the series in flight.
    fake_world.harvester._waiting_since[waiter.id] -= 10.0
    again = fake_world.queue.claim("t:1:w1", 60.0)
    assert again is not None and again.id == waiter.id
    fake_world.harvester.run(again, "t:1:w1")
    assert fake_world.queue.get_job(waiter.id).state is JobState.DONE
    assert [lvl for lvl, _ in fake_world.backend.moves] == [QueryLevel.SERIES]
    assert {i.SOPInstanceUID for i in mini_clinic.ct_sim} <= kept(fake_world, h2)
    assert waiter.id not in fake_world.harvester._waiting_since


def test_a_series_kept_under_one_role_still_plans_the_hops_of_another(fake_world: World,
        mini_clinic: MiniClinic) -> None:
    """A CT series can be one plan's planning series and another plan's registered series (a REG between the
    two planning CTs). Whichever role's job stores it first, the other role's job still plans its own hops
    from the stored copies: a planning series asks for the REGs and series of its FoR, a registered series
    does not. (Skipping series already kept lost a REG and the MR it registers, intermittently.)"""
    hid = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY",)))  # a harvest with no records
    fake_world.run()
    first = mini_clinic.ct_sim[0]
    registered = RetrieveSeries(first.PatientID, first.StudyInstanceUID, first.SeriesInstanceUID,
                                Role.REGISTERED_SERIES, Hop.REG_SERIES, ("2.25.1",))
    fake_world.queue.enqueue_many([job_for(fake_world.routes[hid], registered)])
    fake_world.run()
    assert {i.SOPInstanceUID for i in mini_clinic.ct_sim} <= kept(fake_world, hid)

    def reg_searches() -> list[str]:
        return [j.payload.get("hop", "") for state in ("pending", "done", "failed")
                for j in fake_world.queue.list_jobs(harvest_id=hid, state=state) if j.kind == "FindReferencing"]

    assert reg_searches() == []  # a registered series does not look for REGs
    moves = len(fake_world.backend.moves)
    series_job(fake_world, hid, mini_clinic.ct_sim)  # the same series as a planning series
    fake_world.run()
    ct_uids = {first.SeriesInstanceUID, *(i.SOPInstanceUID for i in mini_clinic.ct_sim)}
    assert not [m for m in fake_world.backend.moves[moves:] if ct_uids & set(m[1])]  # the CT is not moved again
    assert Hop.FOR_REG in reg_searches()


def test_jobs_are_ordered_critical_path_first_and_every_hop_has_its_rank(fake_world: World,
        mini_clinic: MiniClinic) -> None:
    """Records, plans, structure sets and registrations (the searches that reveal more work) run before the
    bulk image series they reveal, and a plan's later records and doses (leaves) last; every hop the
    planner produces on a whole harvest has its own rank (none falls back to the default)."""
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    jobs = fake_world.queue.list_jobs(harvest_id=hid)
    hops = {j.payload.get("hop") for j in jobs}
    assert {Hop.WINDOW_RECORD, Hop.RECORD_PLAN, Hop.PLAN_STRUCTURE_SET, Hop.STRUCTURE_SET_SERIES, Hop.FOR_REG,
            Hop.REG_SERIES, Hop.SERIES_FOR, Hop.PLAN_DOSE, Hop.PLAN_RECORD} <= hops
    assert hops <= set(_PRIORITY_BY_HOP), hops - set(_PRIORITY_BY_HOP)
    assert all(j.priority == _PRIORITY_BY_HOP[j.payload["hop"]] for j in jobs
               if j.kind != "UnpackMimSession" and j.payload.get("plan_has_structure_set", True))
    rank = _PRIORITY_BY_HOP
    assert (rank[Hop.WINDOW_RECORD] > rank[Hop.RECORD_PLAN] > rank[Hop.PLAN_STRUCTURE_SET]
            > rank[Hop.STRUCTURE_SET_SERIES] > rank[Hop.FOR_REG] > rank[Hop.REG_SERIES] > rank[Hop.PLAN_DOSE]
            > rank[Hop.PLAN_RECORD])
    assert rank[Hop.SERIES_FOR] > rank[Hop.PLAN_DOSE]
    op = RetrieveSeries("P", "1.2", "1.2.3", Role.PLANNING_SERIES, Hop.STRUCTURE_SET_SERIES)
    assert job_for(fake_world.routes[hid], op).priority == job_priority(op) == rank[Hop.STRUCTURE_SET_SERIES]
    # A TomoTherapy plan names no structure set: its dose search is how the structure set is found.
    criterion = ReferenceCriterion(CriterionKind.PLAN, ("1.2.9",))
    tomo = FindReferencing("RTDOSE", "P", None, criterion, Role.DOSE, Hop.PLAN_DOSE, plan_has_structure_set=False)
    usual = FindReferencing("RTDOSE", "P", None, criterion, Role.DOSE, Hop.PLAN_DOSE)
    assert job_priority(tomo) == rank[Hop.PLAN_STRUCTURE_SET] > job_priority(usual) == rank[Hop.PLAN_DOSE]


def test_an_idle_worker_sleeps_long_and_new_work_still_starts_at_once(fake_world: World,
        mini_clinic: MiniClinic) -> None:
    """No pending job: the worker waits IDLE_WAIT_S instead of polling every poll_interval; a pending job
    (even one not yet due) brings the short poll back; a new harvest wakes a sleeping worker at once."""
    assert fake_world.harvester.idle_wait() == fake_world.harvester.IDLE_WAIT_S > fake_world.harvester.poll_interval
    hid = fake_world.start(WINDOW_2020)
    assert fake_world.queue.has_pending()
    assert fake_world.harvester.idle_wait() == fake_world.harvester.poll_interval
    fake_world.run()
    assert fake_world.queue.is_harvest_finished(hid) and not fake_world.queue.has_pending()
    assert fake_world.harvester.idle_wait() == fake_world.harvester.IDLE_WAIT_S

    fake_world.harvester.IDLE_WAIT_S = 600.0  # a worker that only polled would not see the next job for 10 min
    fake_world.harvester.worker_count = 1
    sleeping = threading.Event()
    real_idle_wait = fake_world.harvester.idle_wait

    def idle_wait() -> float:
        seconds = real_idle_wait()
        if seconds >= 600.0:
            sleeping.set()
        return seconds

    fake_world.harvester.idle_wait = idle_wait  # type: ignore[method-assign]
    fake_world.harvester.start()
    try:
        done = threading.Event()
        real_run = fake_world.harvester.run

        def run(job, owner):  # type: ignore[no-untyped-def]
            real_run(job, owner)  # returns once the job's outcome is committed
            done.set()

        fake_world.harvester.run = run  # type: ignore[method-assign]
        assert sleeping.wait(30), "the idle worker never went to sleep"
        h2 = fake_world.start(HarvestWindow("20990101", "20990102", ("NOBODY",)))
        fake_world.harvester.wake()  # what HarvestService.on_enqueue does in the plugin (app.py)
        assert done.wait(30), "the sleeping worker did not start the new harvest's job"
        assert fake_world.queue.is_harvest_finished(h2)
    finally:
        fake_world.harvester.stop()


def test_a_harvest_is_cleaned_up_as_soon_as_its_last_job_ends(fake_world: World, mini_clinic: MiniClinic) -> None:
    """The maintenance thread (provenance, end-of-harvest clean-up) is woken by a harvest's last job instead
    of finding it at its next look: with a look every 10 minutes the harvest still shows Completed at once."""
    fake_world.harvester.MAINTENANCE_INTERVAL_S = 600.0
    fake_world.harvester.worker_count = 1
    fake_world.harvester.start()
    try:
        hid = fake_world.start(WINDOW_2020)
        fake_world.harvester.wake()
        deadline = time.monotonic() + 60
        while not fake_world.completed(hid):
            assert time.monotonic() < deadline, "the harvest was not cleaned up after its last job"
            time.sleep(0.05)
        assert not fake_world.tracker.pending_provenance(10)
    finally:
        fake_world.harvester.stop()

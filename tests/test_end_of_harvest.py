"""End of a harvest: clean-up of inspected candidates, what ``Completed`` waits for, creation with seeding.

Harvests run through the real worker/ingest/tracker path over an in-memory strict hierarchical source
(tests/fakes.py), which forces the harvester to move candidates only to inspect them (doses of the trial
plan, REGs of other frames of reference, records outside the window).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import CriterionKind, FindReferencing, Hop, ReferenceCriterion, Role
from rtharvest.core.strategies import SourceCapability
from rtharvest.harvest.ingest import job_for
from rtharvest.store.db import Database
from rtharvest.store.jobqueue import EnqueueItem, JobQueue
from rtharvest.store.tracking import Decision, ObjectRecord
from tests.fakes import World, dicom_bytes
from tests.planner_fixtures import MiniClinic, dose, uid

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))
STRICT = SourceCapability(relational=False, sequence_return_keys=False, instance_return_keys=False)
#: How often the concurrent clean-up test repeats (RTHARVEST_RACE_RUNS raises it for a soak).
RACE_RUNS = int(os.environ.get("RTHARVEST_RACE_RUNS", "10"))


@pytest.fixture
def fake_capability() -> SourceCapability:
    """A strict hierarchical source: the harvester moves candidates only to inspect them."""
    return STRICT


def test_completed_harvest_deletes_its_candidates(fake_world: World) -> None:
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    before = fake_world.candidates_in_store(hid)
    assert before, "the strict source moved no candidate: the test proves nothing"
    assert not fake_world.completed(hid)
    fake_world.finish()
    assert fake_world.completed(hid) and fake_world.candidates_in_store(hid) == set()


def test_a_candidate_planned_from_the_store_before_its_arrival_was_decided_is_still_cleaned_up(
        fake_world: World) -> None:
    """One job moves a candidate in; before the ingest thread decided its arrival, another job of the harvest
    finds the stored copy and rejects it as found, not moved. The arrival's decision (moved) comes second:
    the copy is still this harvest's to clean up, not left in the store."""
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    with fake_world.tracker.db.transaction():
        found = ObjectRecord(hid, "1.2.3.9", "orthanc-9", Decision.REJECTED, "not referenced", "DOSE",
                             Hop.PLAN_DOSE, "SRC", 2, moved=False)
        assert fake_world.tracker.record(found)
    assert fake_world.tracker.rejected_unclaimed(hid) == []  # found in the store: not the harvest's to delete
    with fake_world.tracker.db.transaction():
        arrived = dataclasses.replace(found, job_id=1, moved=True)
        assert not fake_world.tracker.record(arrived)  # the first decision stays ...
    assert fake_world.tracker.rejected_unclaimed(hid) == [("1.2.3.9", "orthanc-9")]  # ... but it was moved in
    assert hid in fake_world.tracker.harvests_to_clean()  # and the clean-up runs again


def test_cancelled_harvest_is_cleaned_like_a_completed_one(fake_world: World) -> None:
    hid = fake_world.start(WINDOW_2020)
    for _ in range(12):  # part of the harvest, candidates included
        job = fake_world.queue.claim("t:1:w0", 60.0)
        assert job is not None
        fake_world.harvester.run(job, "t:1:w0")
    assert fake_world.candidates_in_store(hid)
    # A job still running when the harvest is cancelled: the clean-up waits for it.
    running = fake_world.queue.claim("t:1:w0", 60.0)
    assert running is not None
    fake_world.queue.cancel(hid)
    fake_world.finish()
    assert not fake_world.tracker.cleanup_done(hid)
    fake_world.harvester.run(running, "t:1:w0")
    fake_world.finish()
    assert fake_world.tracker.cleanup_done(hid)
    assert fake_world.candidates_in_store(hid) == set()
    assert fake_world.queue.get_harvest(hid).state.value == "Cancelled"


def test_completed_waits_for_its_own_provenance_only(tmp_path: Path, mini_clinic: MiniClinic) -> None:
    fake_world = World(tmp_path / "q.sqlite", mini_clinic.datasets(), STRICT)
    try:
        a = fake_world.start(WINDOW_2020)
        fake_world.run()
        b = fake_world.start(HarvestWindow("20230101", "20231231", ("MINI1",)))
        fake_world.run()
        # B's provenance cannot be written yet (its instances' metadata writes fail); A's can.
        from rtharvest.store.tracking import Decision

        a_ids = {o.orthanc_id for o in fake_world.tracker.objects(a, Decision.KEPT)}
        b_ids = {o.orthanc_id for o in fake_world.tracker.objects(b, Decision.KEPT)} - a_ids
        assert b_ids
        b_series = {fake_world.store.series_of(oid).orthanc_id for oid in b_ids if oid}
        real, real_series = fake_world.store.set_metadata, fake_world.store.set_series_metadata

        def refuse_b(orthanc_id: str, name: str, value: str) -> None:
            if orthanc_id in b_ids:
                raise OSError("metadata write refused")
            real(orthanc_id, name, value)

        def refuse_b_series(series_id: str, name: str, value: str) -> None:
            if series_id in b_series:
                raise OSError("metadata write refused")
            real_series(series_id, name, value)

        fake_world.store.set_metadata = refuse_b  # type: ignore[method-assign]
        fake_world.store.set_series_metadata = refuse_b_series  # type: ignore[method-assign]
        fake_world.harvester.provenance.write()
        assert fake_world.tracker.pending_provenance_of(b) and not fake_world.tracker.pending_provenance_of(a)
        fake_world.harvester.cleanup.finish()
        assert fake_world.completed(a) and not fake_world.completed(b)
        fake_world.store.set_metadata = real  # type: ignore[method-assign]
        fake_world.store.set_series_metadata = real_series  # type: ignore[method-assign]
        fake_world.finish()
        assert fake_world.completed(b)
    finally:
        fake_world.close()


def test_clean_up_reaches_every_harvest_beyond_a_thousand(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "q.sqlite"))
    world_q = JobQueue(db)
    from rtharvest.store.tracking import Tracker

    tracker = Tracker(db)
    ids = [world_q.create_harvest("SRC").id for _ in range(1_205)]
    for hid in ids:
        world_q.update_completion(hid)
    assert set(tracker.harvests_to_clean()) == set(ids)
    db.close()


def test_creating_and_seeding_a_harvest_is_one_transaction(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "q.sqlite"))
    q = JobQueue(db)

    def seed_then_crash(harvest_id: str) -> list[EnqueueItem]:
        raise RuntimeError("killed between creating and seeding")

    with pytest.raises(RuntimeError):
        q.create_harvest("SRC", seed=seed_then_crash)
    assert q.list_harvests() == [] and db.scalar("SELECT count(*) FROM jobs") == 0
    h = q.create_harvest("SRC", seed=lambda hid: [EnqueueItem(hid, "FindTreatmentRecords", "SRC", {"n": 1})])
    assert q.get_harvest(h.id).state.value == "Running" and q.counts(h.id)
    db.close()


def late_candidate_search(fake_world: World, harvest_id: str, mini_clinic: MiniClinic, n: int = 0) -> EnqueueItem:
    """A dose search of a plan no dose names, after a new dose (of another plan) reached the source: at a
    strict source every dose of the study is a candidate, the new one is moved in and rejected."""
    fake_world.source.add(dose(f"late-dose-{n}", mini_clinic.patient, mini_clinic.plan_study, uid("other-plan", n)))
    op = FindReferencing("RTDOSE", mini_clinic.patient, mini_clinic.plan_study,
                         ReferenceCriterion(CriterionKind.PLAN, (uid("no-such-plan", n),)), Role.DOSE, Hop.PLAN_DOSE)
    return job_for(fake_world.routes[harvest_id], op)


def test_candidate_arriving_after_clean_up_started_is_never_left_once_completed(fake_world: World,
                                                                                  mini_clinic: MiniClinic) -> None:
    """While the clean-up deletes the first candidate, the harvest reopens and a job moves new candidates
    in (a retried or late job): the clean-up must not mark the harvest clean; the next pass removes them."""
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    while fake_world.harvester.provenance.write():
        pass
    injected: list[set[str]] = []
    before = fake_world.candidates_in_store(hid)

    def arrive_meanwhile(_: str) -> None:
        if injected:
            return
        fake_world.store.before_delete = None
        fake_world.queue.enqueue_many([late_candidate_search(fake_world, hid, mini_clinic)])
        fake_world.run()  # another worker thread would do this concurrently
        injected.append(fake_world.candidates_in_store(hid) - before)

    fake_world.store.before_delete = arrive_meanwhile
    fake_world.harvester.cleanup.finish()
    assert injected and injected[0], "the late search moved no candidate"
    assert not fake_world.completed(hid), "marked clean with a candidate that arrived during the clean-up"
    assert fake_world.candidates_in_store(hid) & injected[0]
    fake_world.harvester.cleanup.finish()
    assert fake_world.completed(hid) and fake_world.candidates_in_store(hid) == set()


def race_once(fake_world: World, mini_clinic: MiniClinic, late: int = 2) -> tuple[int, list[set[str]]]:
    """Run a harvest with a worker thread and a maintenance thread; each time it shows Completed, reopen
    it with a late search (``late`` times). Returns (late searches made, violations seen): a violation is a
    moment at which the harvest showed Completed (the same clean-up mark before and after the look) while
    an inspected candidate was in the store."""
    hid = fake_world.start(WINDOW_2020)
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while not stop.is_set():
                job = fake_world.queue.claim("t:1:w0", 60.0)
                if job is None:
                    stop.wait(0.001)
                    continue
                fake_world.harvester.run(job, "t:1:w0")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def maintenance() -> None:
        try:
            while not stop.is_set():
                fake_world.harvester.provenance.write()
                fake_world.harvester.cleanup.finish()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker), threading.Thread(target=maintenance)]
    for t in threads:
        t.start()
    violations: list[set[str]] = []
    late_searches = 0
    deadline = time.monotonic() + 60
    mark = "SELECT done_at FROM rth_cleanup WHERE harvest_id = ?"
    try:
        while time.monotonic() < deadline and not errors:
            done_at = fake_world.db.scalar(mark, (hid,))
            state = fake_world.queue.get_harvest(hid).state.value
            stored = fake_world.candidates_in_store(hid)
            still = fake_world.db.scalar(mark, (hid,))
            if done_at is not None and done_at == still and state == "Completed" and stored:
                violations.append(stored)
            if done_at is not None and still is not None and state == "Completed":
                if late_searches == late:
                    break
                # Reopen it with a search that brings candidates, right as it looks finished.
                fake_world.queue.enqueue_many([late_candidate_search(fake_world, hid, mini_clinic, late_searches)])
                late_searches += 1
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert fake_world.candidates_in_store(hid) == set() or late_searches < late
    return late_searches, violations


def test_completed_never_shows_with_a_candidate_in_the_store_under_concurrency(tmp_path: Path,
                                                                                mini_clinic: MiniClinic) -> None:
    """A worker thread, the maintenance thread and late searches race; whenever the harvest shows
    Completed, no inspected candidate is in the store. Repeated RACE_RUNS times."""
    for run in range(RACE_RUNS):
        fake_world = World(tmp_path / f"q{run}.sqlite", mini_clinic.datasets(), STRICT)
        try:
            late_searches, violations = race_once(fake_world, mini_clinic)
        finally:
            fake_world.close()
        assert late_searches == 2, f"run {run}: the harvest did not complete in time"
        assert violations == [], f"run {run}: Completed with candidates in the store: {violations}"


# -- late arrivals: the source still sending after the job's move ended ------------------------------


def send_late(fake_world: World, sop_uid: str) -> str:
    """The source delivers ``sop_uid`` now, outside any move (as after a C-MOVE timeout); its Orthanc ID."""
    inst = fake_world.source.instances[sop_uid]
    data = dicom_bytes(inst.ds)
    oid = fake_world.store.put(sop_uid, inst.series_uid, data)
    fake_world.on_stored(oid, data, "SRC")
    return oid


def harvest_with_a_candidate_that_never_arrived(fake_world: World, mini_clinic: MiniClinic) -> tuple[str, str]:
    """A completed and cleaned harvest whose dose search never received one of its candidates (a dose of
    another plan in the plan's study, which the source lists but does not deliver): that job failed."""
    late = dose("late-dose", mini_clinic.patient, mini_clinic.plan_study, uid("other-plan"))
    fake_world.source.add(late)
    fake_world.backend.withhold = {late.SOPInstanceUID}
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    assert fake_world.completed(hid) and not fake_world.store.holds(late.SOPInstanceUID)
    failed = fake_world.queue.list_jobs(harvest_id=hid, state="failed")
    assert any(late.SOPInstanceUID in (j.last_error or "") for j in failed), "the candidate's job did not fail"
    return hid, late.SOPInstanceUID


def test_a_candidate_arriving_after_its_job_ended_is_rejected_and_cleaned_up(fake_world: World,
                                                                             mini_clinic: MiniClinic) -> None:
    """The source sends the candidate after the job gave up on it, and the harvest already shows
    Completed: the arrival is the harvest's (a late, rejected candidate), so the harvest is not Completed
    until its clean-up removed it. The same for a candidate it had inspected and removed already, sent
    again."""
    hid, late_uid = harvest_with_a_candidate_that_never_arrived(fake_world, mini_clinic)
    removed_before = {o.sop_uid for o in fake_world.tracker.objects(hid, Decision.REJECTED)
                      if o.moved and o.orthanc_id is None}
    assert removed_before, "the harvest removed no inspected candidate: the second half proves nothing"
    send_late(fake_world, late_uid)
    again = sorted(removed_before)[0]
    send_late(fake_world, again)
    decisions = {o.sop_uid: o for o in fake_world.tracker.objects(hid)}
    assert decisions[late_uid].decision is Decision.REJECTED and decisions[late_uid].moved
    assert decisions[late_uid].reason.startswith("arrived after job ")
    assert fake_world.ingest.unsolicited == 0
    assert not fake_world.completed(hid), "Completed with a late arrival in the store"
    assert {late_uid, again} <= fake_world.candidates_in_store(hid)
    fake_world.finish()
    assert fake_world.completed(hid) and fake_world.candidates_in_store(hid) == set()
    assert not fake_world.store.holds(late_uid) and not fake_world.store.holds(again)


def test_after_the_grace_period_a_late_arrival_is_not_part_of_the_harvest(fake_world: World,
                                                                          mini_clinic: MiniClinic) -> None:
    """Ended jobs' expectations are forgotten after ``HarvestCleanup.LATE_ARRIVAL_GRACE_S``: an arrival then is
    unsolicited (stored, counted, part of no harvest) and the harvest stays Completed."""
    hid, late_uid = harvest_with_a_candidate_that_never_arrived(fake_world, mini_clinic)
    with fake_world.db.transaction():
        assert fake_world.tracker.purge_ended_expectations(time.time() + 1) > 0
    send_late(fake_world, late_uid)
    assert fake_world.ingest.unsolicited == 1
    assert not fake_world.tracker.has_object(hid, late_uid)
    assert fake_world.completed(hid) and fake_world.store.holds(late_uid)


def test_an_instance_arriving_between_attempts_is_kept_by_the_retry(fake_world: World, mini_clinic: MiniClinic) -> None:
    """The plan's retrieve fails (the source did not deliver it in time) and the plan arrives before the
    retry runs: recorded as a late arrival meanwhile, it is what the retry finds in the store and keeps, so
    the chain goes on and nothing moves twice."""
    plan_uid = mini_clinic.plan.SOPInstanceUID
    fake_world.backend.withhold = {plan_uid}
    hid = fake_world.start(WINDOW_2020)
    while True:  # up to the plan's first (failed) attempt
        job = fake_world.queue.claim("t:1:w0", 60.0)
        assert job is not None, "no job retrieved the plan"
        fake_world.harvester.run(job, "t:1:w0")
        if job.payload.get("sop_uid") == plan_uid:
            break
    retry = fake_world.queue.get_job(job.id)
    assert retry.state.value in ("pending", "waiting") and retry.attempts == 1
    fake_world.backend.withhold = set()
    send_late(fake_world, plan_uid)
    assert fake_world.tracker.objects(hid, Decision.REJECTED)[-1].sop_uid == plan_uid
    moves = len(fake_world.backend.moves)
    fake_world.run()
    fake_world.finish()
    decisions = {o.sop_uid: o for o in fake_world.tracker.objects(hid)}
    assert decisions[plan_uid].decision is Decision.KEPT and decisions[plan_uid].moved
    ss_uid = mini_clinic.ss.SOPInstanceUID
    assert ss_uid in decisions and decisions[ss_uid].decision is Decision.KEPT
    assert fake_world.queue.get_job(job.id).state.value == "done"
    assert all(plan_uid not in uids for _, uids in fake_world.backend.moves[moves:]), "the plan moved again"
    assert fake_world.completed(hid) and fake_world.store.holds(plan_uid)


def test_a_later_harvest_asking_for_the_instance_does_not_reopen_the_earlier_one(fake_world: World,
                                                                                 mini_clinic: MiniClinic) -> None:
    """Harvest A gave up on a candidate; harvest B (same window, within the grace period) asks for it and
    receives it: B's running job decides it, and A (finished) records nothing and stays Completed."""
    first, late_uid = harvest_with_a_candidate_that_never_arrived(fake_world, mini_clinic)
    fake_world.backend.withhold = set()
    second = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    assert fake_world.tracker.has_object(second, late_uid), "the later harvest did not receive the candidate"
    assert not fake_world.tracker.has_object(first, late_uid), "the earlier harvest recorded the later one's arrival"
    assert fake_world.completed(first) and fake_world.completed(second)

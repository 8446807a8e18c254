"""Start-up reconciliation (rtharvest.harvest.reconcile) with the in-memory edges of tests/fakes.py: which of what
the queue believes missing is planned from the store, with which ``moved`` flag, and what is left alone.

The end-to-end case (a real Orthanc with its PostgreSQL index, a queue restored from an older backup) is
tests/test_postgres.py::test_queue_older_than_the_store_is_reconciled_on_start.
"""

from __future__ import annotations

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import OperationKind, RetrieveInstance, Role, operation_from_dict
from rtharvest.harvest.reconcile import reconcile
from rtharvest.store.jobqueue import Job, JobState
from rtharvest.store.tracking import Decision, Expectation
from tests.fakes import World, dicom_bytes
from tests.planner_fixtures import MiniClinic

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))


def run_until_plan_is_wanted(fake_world: World, plan_uid: str) -> tuple[str, Job]:
    """Start a harvest and run jobs until the retrieve of the plan is pending; the harvest and that job."""
    hid = fake_world.start(WINDOW_2020)
    for _ in range(50):
        retrieves = fake_world.queue.list_jobs(hid, JobState.PENDING, kind=OperationKind.RETRIEVE_INSTANCE.value)
        pending = [j for j in retrieves if j.payload.get("sop_uid") == plan_uid]
        if pending:
            return hid, pending[0]
        job = fake_world.queue.claim("test:1:w0", 60.0)
        assert job is not None, "the plan was never asked for"
        fake_world.harvester.run(job, "test:1:w0")
    raise AssertionError("the plan was never asked for")


def store_copy(fake_world: World, mini_clinic: MiniClinic, sop_uid: str) -> str:
    """Put the source's instance into the store directly (a previous run moved it; no decision kept)."""
    inst = fake_world.source.instances[sop_uid]
    return fake_world.store.put(sop_uid, inst.series_uid, dicom_bytes(inst.ds))


def test_a_pending_named_retrieve_the_store_holds_is_planned_without_a_move(fake_world: World,
        mini_clinic: MiniClinic) -> None:
    plan_uid = mini_clinic.plan.SOPInstanceUID
    hid, _ = run_until_plan_is_wanted(fake_world, plan_uid)
    store_copy(fake_world, mini_clinic, plan_uid)
    moves_before = len(fake_world.backend.moves)

    result = reconcile(fake_world.harvester)

    assert result.done and result.error is None
    assert result.planned_from_store == 1 and result.harvests[hid].planned_from_store == 1
    assert result.checked >= 1
    plan = next(o for o in fake_world.tracker.objects(hid) if o.sop_uid == plan_uid)
    assert plan.decision is Decision.KEPT and not plan.moved  # it was already stored when this run looked
    # Its follow-ups are queued (the structure set, doses) and one summary event names the harvest.
    kinds = {operation_from_dict(j.payload).kind for j in fake_world.queue.list_jobs(hid, JobState.PENDING, limit=1000)}
    assert OperationKind.FIND_REFERENCING in kinds
    summaries = [e for e in fake_world.events.query(harvest_id=hid) if e.message.startswith("start-up reconciliation:")]
    assert len(summaries) == 1 and "1 held there" in summaries[0].message
    assert len(fake_world.backend.moves) == moves_before  # reconciling contacts no source

    fake_world.run()
    fake_world.finish()
    assert fake_world.completed(hid)
    assert not any(plan_uid in uids for _, uids in fake_world.backend.moves[moves_before:]), "the plan was moved again"
    kept = {o.sop_uid for o in fake_world.tracker.objects(hid, Decision.KEPT)}
    assert kept == (
        mini_clinic.expected_2020() - {mini_clinic.qa_plan.SOPInstanceUID, mini_clinic.qa_record.SOPInstanceUID})


def test_a_dead_runs_move_is_planned_as_moved_and_a_live_runs_is_left_alone(fake_world: World,
                                                                              mini_clinic: MiniClinic) -> None:
    plan_uid = mini_clinic.plan.SOPInstanceUID
    hid, pending = run_until_plan_is_wanted(fake_world, plan_uid)
    # A run claims the retrieve, announces the plan and dies while it is being stored.
    job = fake_world.queue.claim("deadhost:1:w0", 60.0)
    assert job is not None and job.id == pending.id
    op = operation_from_dict(job.payload)
    assert isinstance(op, RetrieveInstance) and op.role is Role.PLAN
    fake_world.tracker.expect([Expectation(hid, plan_uid, job.id, "SRC", op.role.value, op.hop, False, op.to_dict())])
    store_copy(fake_world, mini_clinic, plan_uid)

    # While its lease is held (another live process), the reconciliation leaves the job's move to it.
    live = reconcile(fake_world.harvester)
    assert live.planned_from_store == 0, live
    assert not fake_world.tracker.has_object(hid, plan_uid)

    assert fake_world.queue.recover_stale_leases(owner_prefix="") == 1  # what a start does for a dead run's leases
    result = reconcile(fake_world.harvester)
    assert result.planned_from_store == 1, result
    plan = next(o for o in fake_world.tracker.objects(hid) if o.sop_uid == plan_uid)
    assert plan.decision is Decision.KEPT and plan.moved and plan.job_id == job.id  # that run's move brought it


def test_missing_objects_and_finished_harvests_are_not_planned(fake_world: World, mini_clinic: MiniClinic) -> None:
    plan_uid = mini_clinic.plan.SOPInstanceUID
    hid, _ = run_until_plan_is_wanted(fake_world, plan_uid)

    result = reconcile(fake_world.harvester)  # the store does not hold the plan: its job moves it
    assert result.checked >= 1 and result.planned_from_store == 0 and result.failed == 0
    assert not fake_world.tracker.has_object(hid, plan_uid)

    store_copy(fake_world, mini_clinic, plan_uid)
    fake_world.queue.cancel(hid)
    assert reconcile(fake_world.harvester).checked == 0  # a finished harvest is not planned any further

"""Ingest off the C-STORE path: the SOPInstanceUID peek, the ingest thread, settle, the backlog.

In-memory edges (tests/fakes.py): the fake backend calls ``on_stored`` before its move returns, as Orthanc
does, so a worker that checks decisions right after the move races the ingest thread exactly as in the
plugin; ``Harvester`` calls ``Ingest.settle`` for that.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import apsw
import pydicom
from pydicom.dataset import Dataset

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.references import extract_from_bytes, peek_sop_instance_uid
from rtharvest.harvest.ingest import Ingest
from rtharvest.store.eventlog import Level
from rtharvest.store.tracking import Decision
from tests.fakes import World, dicom_bytes
from tests.planner_fixtures import MiniClinic, image_series, uid

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))


def kept(fake_world: World, harvest_id: str) -> set[str]:
    return {o.sop_uid for o in fake_world.tracker.objects(harvest_id, Decision.KEPT)}


def closure(mini_clinic: MiniClinic) -> set[str]:
    return mini_clinic.expected_2020() - {mini_clinic.qa_plan.SOPInstanceUID, mini_clinic.qa_record.SOPInstanceUID}


def wait_for(predicate, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


# -- the peek ------------------------------------------------------------------------------------------


def test_peek_reads_the_same_sop_uid_as_the_whole_header(mini_clinic: MiniClinic) -> None:
    for ds in mini_clinic.datasets():
        data = dicom_bytes(ds)
        assert peek_sop_instance_uid(data) == extract_from_bytes(data).sop_uid == ds.SOPInstanceUID


def test_peek_reads_implicit_vr_datasets(mini_clinic: MiniClinic) -> None:
    """Orthanc stores what the sender negotiated: the transfer syntax comes from the file meta."""
    import copy

    from pydicom.uid import ImplicitVRLittleEndian

    for syntax in (ImplicitVRLittleEndian,):
        ds = copy.deepcopy(mini_clinic.ct_sim[0])
        data = dicom_bytes(ds)
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        ds.save_as(buf, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
        assert peek_sop_instance_uid(buf.getvalue()) == mini_clinic.ct_sim[0].SOPInstanceUID, syntax.name


def test_peek_reads_the_dataset_not_the_file_meta(mini_clinic: MiniClinic) -> None:
    """Orthanc indexes the dataset's SOPInstanceUID; the file meta may disagree in a bad file."""
    data = dicom_bytes(mini_clinic.plan)
    meta_uid = mini_clinic.plan.SOPInstanceUID.encode()
    other = ("9" * len(meta_uid)).encode()
    first = data.index(meta_uid)  # (0002,0003) comes first
    changed = data[:first] + other + data[first + len(meta_uid):]
    assert peek_sop_instance_uid(changed) == mini_clinic.plan.SOPInstanceUID


def test_peek_gives_none_when_only_the_whole_header_can_tell(mini_clinic: MiniClinic) -> None:
    data = dicom_bytes(mini_clinic.plan)
    sop = mini_clinic.plan.SOPInstanceUID.encode()
    invalid = data.replace(sop, b"1.02.x" + b" " * (len(sop) - 6))  # same length: the file stays parsable
    bare = Dataset()  # no preamble, no file meta (pydicom's own rtstruct.dcm is such a file)
    bare.SOPClassUID = mini_clinic.plan.SOPClassUID
    bare.SOPInstanceUID = mini_clinic.plan.SOPInstanceUID
    buf = io.BytesIO()
    bare.save_as(buf, implicit_vr=True, little_endian=True)
    cases = {
        "empty": b"",
        "random bytes": bytes(range(256)) * 4,
        "preamble only": data[:132],
        "cut before SOPInstanceUID": data[: data.index(mini_clinic.plan.SOPInstanceUID.encode(), 200) - 8],
        "invalid UID": invalid,
        "bare dataset": buf.getvalue(),
    }
    for name, case in cases.items():
        assert peek_sop_instance_uid(case) is None, name


# -- the ingest thread ----------------------------------------------------------------------------------


def test_a_harvest_decided_on_the_ingest_thread_keeps_the_closure(fake_world: World, mini_clinic: MiniClinic) -> None:
    """Every expected arrival is decided on the ingest thread, and each worker sees the decisions of what
    its move delivered (no "no decision after the move" warnings, no instance planned twice)."""
    threads: set[str] = set()
    real = fake_world.ingest.process

    def spy(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if moved and orthanc_id is not None:
            threads.add(threading.current_thread().name)
        return real(refs, orthanc_id, expectations, moved)

    fake_world.ingest.process = spy  # type: ignore[method-assign]
    fake_world.ingest.start()
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    assert kept(fake_world, hid) == closure(mini_clinic)
    assert threads == {"rtharvest-ingest"}
    loud = fake_world.events.query(harvest_id=hid, min_level=Level.WARNING)
    assert [(e.level, e.component) for e in loud] == [(Level.ERROR, "harvester")], loud
    assert fake_world.ingest.failures == 0 and fake_world.ingest.arrivals > 0
    assert fake_world.completed(hid)


def test_a_failure_on_the_ingest_thread_is_planned_from_the_store(fake_world: World, mini_clinic: MiniClinic) -> None:
    plan_uid = mini_clinic.plan.SOPInstanceUID
    real = fake_world.ingest.process
    failed: list[str] = []

    def flaky(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if refs.sop_uid == plan_uid and moved and not failed:
            failed.append(threading.current_thread().name)
            raise apsw.BusyError("database is locked")
        return real(refs, orthanc_id, expectations, moved)

    fake_world.ingest.process = flaky  # type: ignore[method-assign]
    fake_world.ingest.start()
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    assert failed == ["rtharvest-ingest"]
    assert fake_world.ingest.failures == 1
    assert kept(fake_world, hid) == closure(mini_clinic)
    warnings = fake_world.events.query(harvest_id=hid, min_level=Level.WARNING)
    assert any("no decision after the move" in e.message and e.sop_uid == plan_uid for e in warnings)


def test_an_unexpected_arrival_is_inspected_once_arrivals_pause(fake_world: World, mini_clinic: MiniClinic) -> None:
    """Not parsed on the C-STORE path, yet a bad header is still reported with the instance's ID."""
    fake_world.ingest.start()
    good = image_series("push-good", "OTHER", uid("push-study"), uid("push-for"), count=2)
    bad = image_series("push-bad", "OTHER", uid("push-study"), None, count=1)  # images need a FoR
    for i, ds in enumerate([*good, *bad]):
        fake_world.ingest.on_stored(f"push-{i}", dicom_bytes(ds), "PUSHER")
    assert (fake_world.ingest.arrivals, fake_world.ingest.unsolicited) == (3, 3)
    assert wait_for(lambda: any("push-2" in e.message for e in fake_world.events.query(min_level=Level.WARNING)))
    fake_world.ingest.report_unsolicited()
    messages = [e.message for e in fake_world.events.query(component="ingest")]
    bad_msgs = [m for m in messages if "push-2" in m]
    assert len(bad_msgs) == 1 and "no harvest expects" in bad_msgs[0] and "FrameOfReferenceUID" in bad_msgs[0]
    assert not any("push-0" in m or "push-1" in m for m in messages)
    assert any(m.startswith("3 instance(s) arrived that no harvest expected") for m in messages)


def test_a_full_backlog_decides_inline_and_counts_what_it_did_not_inspect(fake_world: World,
        mini_clinic: MiniClinic) -> None:
    fake_world.ingest.MAX_BACKLOG_BYTES = 0  # every arrival overflows
    fake_world.ingest.start()
    inline: list[str] = []
    real = fake_world.ingest.process

    def spy(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        if moved and orthanc_id is not None:
            inline.append(threading.current_thread().name)
        return real(refs, orthanc_id, expectations, moved)

    fake_world.ingest.process = spy  # type: ignore[method-assign]
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    assert kept(fake_world, hid) == closure(mini_clinic)
    assert inline and "rtharvest-ingest" not in inline
    fake_world.ingest.on_stored("push-x", dicom_bytes(image_series("push-x", "OTHER", uid("s"), None, count=1)[0]), "")
    assert fake_world.ingest.uninspected == 1
    fake_world.ingest.report_unsolicited()
    assert any("1 instance(s) that no harvest expected were not checked" in e.message
               for e in fake_world.events.query(component="ingest", min_level=Level.WARNING))


def test_settle_waits_for_what_was_queued_and_stop_decides_it(tmp_path: Path, mini_clinic: MiniClinic) -> None:
    """settle() returns only once the arrivals queued before it are decided; stop() decides the rest."""
    w = World(tmp_path / "q.sqlite", mini_clinic.datasets())
    try:
        ingest: Ingest = w.ingest
        gate = threading.Event()
        decided: list[str] = []

        def slow(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
            gate.wait(10)
            decided.append(refs.sop_uid)
            return []

        ingest.process = slow  # type: ignore[method-assign]
        hid = w.start(WINDOW_2020)
        from rtharvest.store.tracking import Expectation
        ds = mini_clinic.plan
        w.tracker.expect([Expectation(hid, ds.SOPInstanceUID, 1, "SRC", "PLAN", "test", False, {})])
        ingest.start()
        ingest.on_stored("oid-plan", dicom_bytes(ds), "SRC")
        assert ingest.settle(0.2) is False and decided == []
        gate.set()
        assert ingest.settle(10) is True and decided == [ds.SOPInstanceUID]
        gate.clear()
        ingest.on_stored("oid-plan", dicom_bytes(ds), "SRC")
        threading.Timer(0.2, gate.set).start()
        ingest.stop(10)
        assert decided == [ds.SOPInstanceUID] * 2 and not ingest.running
    finally:
        w.ingest.stop()
        w.close()


def test_idle_workers_are_woken_only_for_new_jobs(fake_world: World, mini_clinic: MiniClinic) -> None:
    """An arrival wakes the idle workers only when its decision enqueued a job that did not exist yet: the
    2nd..Nth slice of a series (and every object whose follow-ups are already queued) wakes nobody."""
    wakes: list[int] = []
    creating = 0
    kept_arrivals = 0
    real_enqueue, real_process = fake_world.queue.enqueue_many, fake_world.ingest.process

    def enqueue_spy(items):  # type: ignore[no-untyped-def]
        nonlocal creating
        result = real_enqueue(items)
        creating += any(new for _, new in result)
        return result

    def process_spy(refs, orthanc_id, expectations, moved):  # type: ignore[no-untyped-def]
        nonlocal kept_arrivals
        result = real_process(refs, orthanc_id, expectations, moved)
        kept_arrivals += any(k for _, k in result)
        return result

    fake_world.queue.enqueue_many = enqueue_spy  # type: ignore[method-assign]
    fake_world.ingest.process = process_spy  # type: ignore[method-assign]
    fake_world.ingest.on_enqueue = lambda: wakes.append(1)
    hid = fake_world.start(WINDOW_2020)
    fake_world.run()
    fake_world.finish()
    assert kept(fake_world, hid) == closure(mini_clinic)
    assert 0 < len(wakes) <= creating, (len(wakes), creating)
    assert len(wakes) < kept_arrivals, "every kept arrival woke the workers"

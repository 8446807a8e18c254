"""``SessionUnpacker.run`` (RtHarvest.UnpackMimSessions) through a worker, with in-memory edges (tests/fakes.py).

The harvest holds one :class:`UnpackMimSession` job, as the planner makes when a MIM session (a Raw Data
object) arrives for a search; the session is already in the harvester's store. The job runs on the real
harvester, tracker, ingest and queue; the store is :class:`~tests.fakes.FakeStore`, whose ``upload`` calls
the ingest's OnStoredInstance as Orthanc's ``POST /instances`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.operations import (
    CriterionKind,
    FindReferencing,
    Hop,
    Operation,
    ReferenceCriterion,
    RetrieveInstance,
    Role,
    UnpackMimSession,
)
from rtharvest.edge.loopback import LoopbackError
from rtharvest.harvest.ingest import HarvestRouting, job_for
from rtharvest.harvest.mimsessions import SESSION_METADATA
from rtharvest.store.eventlog import Event, Level
from rtharvest.store.jobqueue import JobState
from rtharvest.store.tracking import Decision
from rtharvest.synth.mimsession import MIM_PRIVATE_CREATOR, SessionEncoding, build_session, encode_session

from .fakes import FakeStore, World, dicom_bytes
from .planner_fixtures import image_series, registration, structure_set, uid

WINDOW = HarvestWindow("20200101", "20201231")
P, STUDY, FOR = "P1", uid("mim-study"), uid("mim-for")
RAW_UID = uid("mim-raw")
CT = image_series("mim-ct", P, STUDY, FOR)
#: The structure set the plan names, which exists only inside the session.
SS = structure_set("mim-ss", P, STUDY, [CT])
#: What the session stands in for: the plan's structure set, asked by UID and found at no source.
WANTED_SS = RetrieveInstance(SS.SOPInstanceUID, P, None, None, "RTSTRUCT", Role.STRUCTURE_SET, Hop.PLAN_STRUCTURE_SET)


def _parent() -> Dataset:
    """The patient and study the session belongs to (the unpacker copies them into its objects)."""
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = P, "TEST^MIM", "19600101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = STUDY, "20200315", "101500"
    return ds


def session(embedded: list[Dataset] | None = None) -> Dataset:
    """A MIM session carrying ``embedded`` (default: the structure set)."""
    return build_session(RAW_UID, _parent(), embedded if embedded is not None else [SS], SessionEncoding.EXPLICIT_SQ)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "q.sqlite", CT)  # the source holds the images the structure set contours
    yield w
    w.close()


def store_session(world: World, raw: Dataset) -> None:
    world.store.put(str(raw.SOPInstanceUID), str(raw.SeriesInstanceUID), encode_session(raw))


def start_unpack(world: World, inner: Operation = WANTED_SS) -> str:
    """A harvest whose one job unpacks the stored session for ``inner``; returns its id."""
    op = UnpackMimSession(RAW_UID, P, json.dumps(inner.to_dict(), sort_keys=True), "RAW-search|test", inner.role)

    def seed(harvest_id: str) -> list:
        world.routes[harvest_id] = routing = HarvestRouting(harvest_id, WINDOW, "SRC", ("SRC",))
        return [job_for(routing, op)]

    return world.queue.create_harvest("SRC", "", {"LookupSources": ["SRC"], "Window": WINDOW.to_dict()},
                                      seed=seed).id


def unpack_job(world: World, harvest_id: str) -> tuple[JobState, str]:
    [job] = world.queue.list_jobs(harvest_id=harvest_id, kind="UnpackMimSession")
    return job.state, job.note or ""


def events(world: World, harvest_id: str) -> list[Event]:
    return world.events.query(harvest_id=harvest_id, component="mimsessions", limit=50)


def test_a_session_object_is_stored_planned_and_names_its_session(world: World) -> None:
    store_session(world, session())
    hid = start_unpack(world)
    world.run()
    assert world.store.uploads == [SS.SOPInstanceUID]
    [kept] = [o for o in world.tracker.objects(hid, Decision.KEPT) if o.sop_uid == SS.SOPInstanceUID]
    assert kept.hop == "RAW->RTSTRUCT" and kept.role == Role.STRUCTURE_SET.value and kept.source == "SRC"
    assert world.store.metadata(world.store.by_sop[SS.SOPInstanceUID])[SESSION_METADATA] == RAW_UID
    # Planned like any structure set: the series it contours was retrieved from the source.
    assert all(world.store.holds(i.SOPInstanceUID) for i in CT)
    state, note = unpack_job(world, hid)
    assert state is JobState.DONE and note.startswith("1 target(s), 1 instance(s) moved, 0 already stored")
    assert "1 object(s) unpacked (1 stored, 0 already stored), 1 kept" in events(world, hid)[0].message


def test_a_damaged_session_is_a_warning_and_its_job_ends_with_nothing_planned(world: World) -> None:
    raw = session()
    tag = raw.private_block(0x0013, MIM_PRIVATE_CREATOR).get_tag(0x50)
    raw[tag] = DataElement(tag, "UN", b"\x01\x02" * 10)  # the session sequence is noise
    store_session(world, raw)
    hid = start_unpack(world)
    world.run()
    [warning] = [e for e in events(world, hid) if e.level is Level.WARNING]
    assert f"Raw Data object {RAW_UID} is a MIM session that cannot be unpacked" in warning.message
    assert warning.sop_uid == RAW_UID and warning.job_id is not None
    # The harvest goes on: the job is done (not failed, nothing to retry), with nothing stored or planned.
    state, note = unpack_job(world, hid)
    assert state is JobState.DONE and note.startswith("0 target(s), 0 instance(s) moved, 0 already stored")
    assert world.store.uploads == [] and world.tracker.objects(hid) == []
    assert world.queue.get_harvest(hid).state.value == "Completed"


def test_another_vendors_raw_data_is_info_and_nothing_is_stored(world: World) -> None:
    picture = Dataset()  # another vendor's block: a whole object, but no RT dataset
    picture.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    picture.SOPInstanceUID, picture.SeriesInstanceUID = uid("sc"), uid("scs")
    raw = session([picture])
    raw[0x00130020].value = "ACME RAW STORAGE"  # no MIM creator, and nothing that makes a session
    store_session(world, raw)
    hid = start_unpack(world)
    world.run()
    [info] = events(world, hid)
    assert info.level is Level.INFO and f"Raw Data object {RAW_UID} is not a MIM session" in info.message
    assert world.store.uploads == [] and world.tracker.objects(hid) == []
    assert unpack_job(world, hid)[0] is JobState.DONE


def test_a_session_under_another_creator_text_is_unpacked_with_a_warning_naming_it(world: World) -> None:
    """The same rule as ``rtharvest-convert mim``: complete RT datasets in a group-0013 block are a session."""
    raw = session()
    raw[0x00130020].value = "ACME SESSION META"
    store_session(world, raw)
    hid = start_unpack(world)
    world.run()
    [warning] = [e for e in events(world, hid) if e.level is Level.WARNING]
    assert "'ACME SESSION META'" in warning.message and warning.sop_uid == RAW_UID
    [kept] = [o for o in world.tracker.objects(hid, Decision.KEPT) if o.sop_uid == SS.SOPInstanceUID]
    assert kept.hop == "RAW->RTSTRUCT"


def test_an_object_already_stored_is_planned_from_the_stored_copy_not_stored_again(world: World) -> None:
    # The structure set came earlier (another session, another harvest, a source push), not for this harvest.
    world.store.put(SS.SOPInstanceUID, SS.SeriesInstanceUID, dicom_bytes(SS))
    store_session(world, session())
    hid = start_unpack(world)
    world.run()
    assert world.store.uploads == []
    [kept] = [o for o in world.tracker.objects(hid, Decision.KEPT) if o.sop_uid == SS.SOPInstanceUID]
    assert kept.moved is False and kept.hop == "RAW->RTSTRUCT"
    assert kept.orthanc_id == world.store.by_sop[SS.SOPInstanceUID]
    assert all(world.store.holds(i.SOPInstanceUID) for i in CT)  # planned: its series was retrieved
    assert unpack_job(world, hid)[1].startswith("1 target(s), 0 instance(s) moved, 1 already stored")
    assert "(0 stored, 1 already stored), 1 kept" in events(world, hid)[0].message


def test_a_registration_kept_for_one_planning_for_still_brings_the_series_of_another(tmp_path: Path) -> None:
    # One session carries a REG between a CT (FoR A) and an MR (FoR B), unpacked first for B's REG search (the
    # REG is kept, the CT is its registered series), then for A's: the kept REG is planned again under A's
    # search, whose registered series is the MR.
    mr = image_series("mim-mr", P, uid("mim-mr-study"), uid("mim-for-b"), "MR")
    reg = registration("mim-reg", P, STUDY, CT, mr)
    world = World(tmp_path / "q.sqlite", [*CT, *mr])
    try:
        store_session(world, session([reg]))

        def reg_search(for_uid: str) -> FindReferencing:
            return FindReferencing("REG", P, None, ReferenceCriterion(CriterionKind.FRAME_OF_REFERENCE, (for_uid,)),
                                   Role.REGISTRATION, Hop.FOR_REG)

        unpacks = [UnpackMimSession(RAW_UID, P, json.dumps(reg_search(f).to_dict(), sort_keys=True),
                                    f"RAW-search|{f}", Role.REGISTRATION) for f in (mr[0].FrameOfReferenceUID, FOR)]

        def seed(harvest_id: str) -> list:
            world.routes[harvest_id] = routing = HarvestRouting(harvest_id, WINDOW, "SRC", ("SRC",))
            return [job_for(routing, op) for op in unpacks]  # B's first (equal priority: oldest first)

        hid = world.queue.create_harvest("SRC", "", {"LookupSources": ["SRC"], "Window": WINDOW.to_dict()},
                                         seed=seed).id
        world.run()
        assert reg.SOPInstanceUID in {o.sop_uid for o in world.tracker.objects(hid, Decision.KEPT)}
        assert all(world.store.holds(i.SOPInstanceUID) for i in CT)  # B's registered series
        assert all(world.store.holds(i.SOPInstanceUID) for i in mr)  # A's: only if the kept REG is planned again
    finally:
        world.close()


class StoreWithoutSessionMetadata(FakeStore):
    """An Orthanc whose UserMetadata does not declare HarvestMimSession: writing it is refused."""

    def set_metadata(self, orthanc_id: str, name: str, value: str) -> None:
        if name == SESSION_METADATA:
            raise LoopbackError(400, "Parameter out of range", method="PUT",
                                path=f"/instances/{orthanc_id}/metadata/{name}")
        super().set_metadata(orthanc_id, name, value)


def test_undeclared_session_metadata_is_one_warning_and_the_objects_are_still_kept(tmp_path: Path) -> None:
    store = StoreWithoutSessionMetadata()
    world = World(tmp_path / "q.sqlite", CT, store=store)
    other_ss = structure_set("mim-ss-2", P, STUDY, [CT])
    store_session(world, session([SS, other_ss]))
    hid = start_unpack(world, WANTED_SS)
    second = start_unpack(world, RetrieveInstance(other_ss.SOPInstanceUID, P, None, None, "RTSTRUCT",
                                                   Role.STRUCTURE_SET, Hop.PLAN_STRUCTURE_SET))
    world.run()
    warnings = world.events.query(component="mimsessions", min_level=Level.WARNING)
    # Once per process, naming the setting to fix, not once per object.
    assert len(warnings) == 1
    assert f"cannot write {SESSION_METADATA} metadata (declare it in UserMetadata)" in warnings[0].message
    assert SS.SOPInstanceUID in {o.sop_uid for o in world.tracker.objects(hid, Decision.KEPT)}
    assert other_ss.SOPInstanceUID in {o.sop_uid for o in world.tracker.objects(second, Decision.KEPT)}
    assert all(SESSION_METADATA not in store.meta[oid] for oid in store.meta)
    world.close()

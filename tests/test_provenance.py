"""Provenance written where it is uniform (series, or instance where a series came by several jobs or hops)
and read back instance → series.

The rules are checked on their own (``plan_series``, ``resolve``), then through the real worker, ingest,
tracker and outbox path of tests/fakes.py: a harvest, a re-harvest and an instance that arrives later in an
already stamped series.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.provenance import NAMES, plan_series, resolve
from rtharvest.store.tracking import Decision, ProvenanceItem
from tests.fakes import World
from tests.planner_fixtures import MiniClinic, uid

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))


def item(oid: str, job: int = 1, hop: str = "RTSTRUCT->SERIES", harvest: str = "h1", moved: bool = True,
         at: str = "2026-01-01T00:00:00Z") -> ProvenanceItem:
    return ProvenanceItem(oid, harvest, f"sop-{oid}", "SRC", job, hop, at, 0, "series-1", moved)


def stamp(harvest: str = "h1", job: str = "1", hop: str = "RTSTRUCT->SERIES") -> dict[str, str]:
    return {"HarvestId": harvest, "HarvestSource": "SRC", "HarvestJob": job, "HarvestHop": hop,
            "HarvestedAt": "2025-01-01T00:00:00Z"}


def test_a_series_moved_whole_is_stamped_once_on_the_series() -> None:
    items = [item("a", at="2026-01-01T00:00:02Z"), item("b", at="2026-01-01T00:00:01Z"), item("c")]
    plan = plan_series(items, {}, {"a", "b", "c"})
    assert plan.series is not None and tuple(plan.series) == NAMES  # HarvestId written last
    assert plan.series["HarvestId"] == "h1" and plan.series["HarvestJob"] == "1"
    assert plan.series["HarvestedAt"] == "2026-01-01T00:00:00Z"  # the earliest decision of the series
    assert plan.instances == () and set(plan.covered) == set(items)


def test_instances_of_one_series_by_different_jobs_or_hops_get_their_own_values() -> None:
    items = [item("a"), item("b"), item("c", job=2), item("d", hop="SERIES->FOR")]
    plan = plan_series(items, {}, {"a", "b", "c", "d"})
    assert plan.series is not None and plan.series["HarvestJob"] == "1"  # the largest group
    assert {i.orthanc_id for i in plan.instances} == {"c", "d"}


def test_a_series_holding_an_instance_no_pending_item_covers_is_not_stamped() -> None:
    # "x" came by no harvest (or its decision is not recorded yet): the series values would claim it.
    plan = plan_series([item("a"), item("b")], {}, {"a", "b", "x"})
    assert plan.series is None and {i.orthanc_id for i in plan.instances} == {"a", "b"}


def test_a_stamped_series_keeps_its_values() -> None:
    same, found = item("a"), item("b", harvest="h2", job=9, moved=False)
    later = item("c", harvest="h2", job=9)
    plan = plan_series([same, found, later], stamp(), {"a", "b", "c"})
    assert plan.series is None
    assert set(plan.covered) == {same, found}  # the same job; a re-harvest that found it stored
    assert plan.instances == (later,)  # moved into the series later by another job: its own values


def test_an_instance_resolves_to_its_own_values_first_then_its_series() -> None:
    own = stamp("h2", "7", "REG->SERIES")
    assert resolve(own, stamp()) == own
    assert resolve({}, stamp()) == stamp()
    assert resolve({"Other": "x"}, {}) == {}


@dataclass
class Harvested:
    world: World
    clinic: MiniClinic
    harvest_id: str


@pytest.fixture
def harvested(tmp_path: Path) -> Iterator[Harvested]:
    clinic = MiniClinic()
    world = World(tmp_path / "q.sqlite", clinic.datasets())
    try:
        harvest_id = world.start(WINDOW_2020)
        world.run()
        world.finish()
        yield Harvested(world, clinic, harvest_id)
    finally:
        world.close()


def kept_ids(world: World, harvest_id: str) -> dict[str, str]:
    return {o.sop_uid: str(o.orthanc_id) for o in world.tracker.objects(harvest_id, Decision.KEPT) if o.orthanc_id}


def test_a_harvest_writes_series_provenance_and_every_instance_resolves_to_it(harvested: Harvested) -> None:
    world, hid = harvested.world, harvested.harvest_id
    kept = kept_ids(world, hid)
    assert len(kept) > len(world.store.series_meta) > 0
    for sop_uid, oid in kept.items():
        values = world.store.provenance(oid)
        assert values["HarvestId"] == hid and values["HarvestSource"] == "SRC", sop_uid
        assert "->" in values["HarvestHop"] and values["HarvestedAt"].endswith("Z")
    # The multi-slice series moved whole carry nothing of their own: one stamp per series.
    ct = [kept[ds.SOPInstanceUID] for ds in harvested.clinic.ct_sim]
    assert all(not world.store.meta[oid] for oid in ct)
    assert world.store.series_meta[world.store.series_of(ct[0]).orthanc_id]["HarvestHop"] == "RTSTRUCT->SERIES"
    assert not world.tracker.pending_provenance(10)


def test_a_re_harvest_keeps_the_first_provenance_and_writes_nothing(harvested: Harvested) -> None:
    world = harvested.world
    before = copy.deepcopy((world.store.meta, world.store.series_meta))
    again = world.start(WINDOW_2020)
    world.run()
    world.finish()
    assert world.completed(again)
    assert kept_ids(world, again) == kept_ids(world, harvested.harvest_id)
    assert (world.store.meta, world.store.series_meta) == before
    assert all(world.store.provenance(oid)["HarvestId"] == harvested.harvest_id
               for oid in kept_ids(world, again).values())


def test_an_instance_arriving_later_in_a_stamped_series_gets_its_own_values(harvested: Harvested) -> None:
    world, clinic, first = harvested.world, harvested.clinic, harvested.harvest_id
    extra = copy.deepcopy(clinic.mr[0])  # a slice added at the source to a registered MR series
    extra.SOPInstanceUID = uid("mr-extra")
    extra.InstanceNumber = 99
    world.source.add(extra)
    later = world.start(WINDOW_2020)
    world.run()
    world.finish()
    new_oid = world.store.by_sop[extra.SOPInstanceUID]
    own = world.store.meta[new_oid]
    assert own["HarvestId"] == later and own["HarvestHop"] == "REG->SERIES"
    assert world.store.provenance(new_oid) == resolve(own, {})
    old = [world.store.by_sop[ds.SOPInstanceUID] for ds in clinic.mr]
    assert world.store.series_of(new_oid).orthanc_id == world.store.series_of(old[0]).orthanc_id
    assert all(world.store.provenance(oid)["HarvestId"] == first and not world.store.meta[oid] for oid in old)

"""Validation checks every image a plan's structure set and registrations promise, not only their series.

Harvests run through the real worker/ingest/planner path over an in-memory source (tests/fakes.py) that
holds only part of what the objects reference, as partly archived series and real exports do; the
manifest must then say ``Incomplete`` and name what is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.manifest import DANGLING, MAX_IMAGES_NAMED, ManifestService
from rtharvest.core.planner import promised_images
from rtharvest.core.references import extract
from tests.fakes import World
from tests.planner_fixtures import MiniClinic, image_series, plan, record, structure_set, uid

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))


def manifest_row(fake_world: World, harvest_id: str, plan_uid: str) -> dict[str, Any]:
    service = ManifestService(fake_world.tracker, fake_world.queue, fake_world.store.read)
    doc = service.build(harvest_id).to_json()
    return next(p for p in doc["Plans"] if p["PlanUID"] == plan_uid)


def harvest(tmp_path: Path, datasets: list[Dataset],
            window: HarvestWindow = WINDOW_2020) -> Iterator[tuple[World, str]]:
    fake_world = World(tmp_path / "q.sqlite", datasets)
    hid = fake_world.start(window)
    fake_world.run()
    yield fake_world, hid
    fake_world.close()


def test_complete_when_the_source_holds_everything(tmp_path: Path, mini_clinic: MiniClinic) -> None:
    for fake_world, hid in harvest(tmp_path, mini_clinic.datasets()):
        row = manifest_row(fake_world, hid, mini_clinic.plan.SOPInstanceUID)
        assert row["Status"] == "Complete" and row["Missing"] == []


def test_contour_images_partly_at_the_source(tmp_path: Path, mini_clinic: MiniClinic) -> None:
    """Two of the four planning CT slices the structure set contours are not at the source: the series
    arrives with two slices and the plan is Incomplete, each absent slice named."""
    absent = {mini_clinic.ct_sim[0].SOPInstanceUID, mini_clinic.ct_sim[2].SOPInstanceUID}
    datasets = [d for d in mini_clinic.datasets() if d.SOPInstanceUID not in absent]
    for fake_world, hid in harvest(tmp_path, datasets):
        assert {i.SOPInstanceUID for i in mini_clinic.ct_sim} - absent <= {u for u in fake_world.store.by_sop}
        row = manifest_row(fake_world, hid, mini_clinic.plan.SOPInstanceUID)
        assert row["Status"] == "Incomplete"
        assert row["PlanningSeriesUIDs"] == [mini_clinic.ct_sim[0].SeriesInstanceUID]
        missing = {(m["What"], m["UID"]): m["Reason"] for m in row["Missing"]}
        assert missing == {("IMAGE", uid_): DANGLING for uid_ in absent}


def test_many_absent_contour_images_are_counted_per_series(tmp_path: Path) -> None:
    """A structure set naming 12 slices of which the source holds one: one entry for the series with the
    count and the first UIDs, instead of eleven lines."""
    p, study, f = "BIG1", uid("big-study"), uid("big-for")
    ct = image_series("big-ct", p, study, f, "CT", 12)
    ss = structure_set("big-ss", p, study, [ct])
    pl = plan("big-plan", p, study, ss.SOPInstanceUID)
    rec = record("big-rec", p, pl.SOPInstanceUID, "20200505")
    kept_slice = ct[1]  # the first contour's image (planner_fixtures contours slice 2 first)
    window = HarvestWindow("20200101", "20201231", (p,))
    for fake_world, hid in harvest(tmp_path, [kept_slice, ss, pl, rec], window):
        row = manifest_row(fake_world, hid, pl.SOPInstanceUID)
        assert row["Status"] == "Incomplete"
        assert len(row["Missing"]) == 1
        entry = row["Missing"][0]
        assert entry["What"] == "IMAGES" and entry["UID"] == ct[0].SeriesInstanceUID
        assert entry["Reason"].startswith("11 of 12 referenced image(s) not stored (first: ")
        absent = [d.SOPInstanceUID for d in ct if d is not kept_slice]
        assert ", ".join(absent[:MAX_IMAGES_NAMED]) in entry["Reason"]
        assert entry["Reason"].endswith(DANGLING)


def test_registration_images_partly_at_the_source(tmp_path: Path, mini_clinic: MiniClinic) -> None:
    """An MR slice the CT-MR registration references is not at the source: Incomplete, slice named."""
    gone = mini_clinic.mr[1].SOPInstanceUID
    datasets = [d for d in mini_clinic.datasets() if d.SOPInstanceUID != gone]
    for fake_world, hid in harvest(tmp_path, datasets):
        row = manifest_row(fake_world, hid, mini_clinic.plan.SOPInstanceUID)
        assert row["Status"] == "Incomplete"
        assert mini_clinic.reg_mr.SOPInstanceUID in row["RegistrationUIDs"]
        assert [(m["What"], m["UID"]) for m in row["Missing"]] == [("IMAGE", gone)]


def test_a_dose_the_plan_names_must_be_stored(tmp_path: Path, mini_clinic: MiniClinic) -> None:
    """ReferencedDoseSequence of the plan names a dose no source holds: Incomplete, the dose named."""
    from tests.planner_fixtures import _refs

    ghost = uid("ghost-dose")
    mini_clinic.plan.ReferencedDoseSequence = _refs([ghost], "1.2.840.10008.5.1.4.1.1.481.2")
    for fake_world, hid in harvest(tmp_path, mini_clinic.datasets()):
        row = manifest_row(fake_world, hid, mini_clinic.plan.SOPInstanceUID)
        assert row["Status"] == "Incomplete"
        assert row["Missing"] == [{"What": "RTDOSE", "UID": ghost, "Reason": DANGLING}]


def test_promised_images_of_a_structure_set_and_a_registration(mini_clinic: MiniClinic) -> None:
    ss = extract(mini_clinic.ss).structure_set
    assert ss is not None
    promised = promised_images(ss)
    assert set(promised) == {i.SOPInstanceUID for i in mini_clinic.ct_sim}
    assert set(promised.values()) == {mini_clinic.ct_sim[0].SeriesInstanceUID}
    reg = extract(mini_clinic.reg_mr).registration
    assert reg is not None
    assert set(promised_images(reg)) == {i.SOPInstanceUID for i in (*mini_clinic.ct_sim, *mini_clinic.mr)}

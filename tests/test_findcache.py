"""Round trips: the per-harvest C-FIND answers (rtharvest.store.findcache) alone and inside the real harvester.

The harvester tests run the real Harvester, Ingest, Tracker and JobQueue against the in-memory source of
tests/fakes.py, counting every C-FIND that reaches the source: a question the harvest already asked must
not reach it again, a later harvest must ask again, and the collected set must not change.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from rtharvest.core.classify import HarvestWindow
from rtharvest.core.strategies import QueryLevel, SourceCapability
from rtharvest.store.findcache import FindCache, find_key
from rtharvest.store.tracking import Decision
from tests.fakes import World
from tests.planner_fixtures import MiniClinic

WINDOW_2020 = HarvestWindow("20200101", "20201231", ("MINI1",))


# -- the cache alone -------------------------------------------------------------------------------


def _key(harvest: str = "h1", series: str = "1.2.3") -> Any:
    return find_key(harvest, "SRC", "IMAGE", {"SeriesInstanceUID": series, "SOPInstanceUID": ""})


def test_same_question_is_asked_once_per_harvest() -> None:
    cache, asked = FindCache(), []

    def ask() -> list[dict[str, str]]:
        asked.append("x")
        return [{"SOPInstanceUID": "1"}]

    assert cache.answers(_key(), ask) == ([{"SOPInstanceUID": "1"}], False)
    assert cache.answers(_key(), ask) == ([{"SOPInstanceUID": "1"}], True)
    # Key order of the identifier does not make another question.
    reordered = find_key("h1", "SRC", "IMAGE", {"SOPInstanceUID": "", "SeriesInstanceUID": "1.2.3"})
    assert cache.answers(reordered, ask)[1] is True
    assert len(asked) == 1
    # Another harvest, another source or another series: asked.
    cache.answers(_key(harvest="h2"), ask)
    cache.answers(find_key("h1", "OTHER", "IMAGE", {"SeriesInstanceUID": "1.2.3", "SOPInstanceUID": ""}), ask)
    cache.answers(_key(series="9"), ask)
    assert len(asked) == 4


def test_failed_questions_are_not_remembered_and_fresh_asks_again() -> None:
    cache, calls = FindCache(), []

    def failing() -> list[dict[str, str]]:
        calls.append("fail")
        raise TimeoutError("source did not answer")

    with pytest.raises(TimeoutError):
        cache.answers(_key(), failing)
    answers, reused = cache.answers(_key(), lambda: [{"SOPInstanceUID": "2"}])
    assert (answers, reused) == ([{"SOPInstanceUID": "2"}], False)
    # A retried job asks the source again, and its fresher answer is what later jobs get.
    assert cache.answers(_key(), lambda: [{"SOPInstanceUID": "3"}], fresh=True) == ([{"SOPInstanceUID": "3"}], False)
    assert cache.answers(_key(), failing) == ([{"SOPInstanceUID": "3"}], True)
    assert calls == ["fail"]


def test_forget_drops_the_harvest_only() -> None:
    cache = FindCache()
    cache.answers(_key("h1"), lambda: [])
    cache.answers(_key("h2"), lambda: [])
    cache.note_frames_of_reference("h1", "SRC", [{"SeriesInstanceUID": "s", "FrameOfReferenceUID": "f"}])
    assert cache.frame_of_reference("h1", "SRC", "s") == "f"
    cache.forget("h1")
    assert len(cache) == 1
    assert cache.frame_of_reference("h1", "SRC", "s") is None
    assert cache.answers(_key("h2"), lambda: [{"x": "y"}])[1] is True


def test_size_is_bounded_oldest_first() -> None:
    cache = FindCache(max_answers=5)
    for i in range(4):
        cache.answers(_key(series=str(i)), lambda: [{"a": "1"}, {"a": "2"}])
    assert len(cache) == 2  # 2 answers each: only the two newest fit
    assert cache.answers(_key(series="3"), lambda: [])[1] is True
    assert cache.answers(_key(series="0"), lambda: [])[1] is False


def test_concurrent_identical_questions_send_one_find() -> None:
    cache, asked = FindCache(), []
    release = threading.Event()

    def slow() -> list[dict[str, str]]:
        asked.append("x")
        release.wait(10)
        return [{"SOPInstanceUID": "1"}]

    results: list[tuple[list[Mapping[str, Any]], bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.answers(_key(), slow))) for _ in range(3)]
    for t in threads:
        t.start()
    # Wait (with a deadline) until the first asker is inside the source call, then let it answer.
    for _ in range(1000):
        if asked:
            break
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert len(asked) == 1
    assert sorted(r[1] for r in results) == [False, True, True]


# -- inside the harvester --------------------------------------------------------------------------


class CountingWorld:
    """A World whose source logs every C-FIND it answers as (level, canonical identifier)."""

    def __init__(self, path: Path, capability: SourceCapability | None = None) -> None:
        self.clinic = MiniClinic()
        self.world = World(path, self.clinic.datasets(), capability)
        self.finds: list[tuple[str, str]] = []
        real = self.world.backend.find

        def find(level: QueryLevel, keys: Mapping[str, Any], *, timeout: float | None = None) -> Any:
            self.finds.append((level.value, json.dumps(dict(keys), sort_keys=True)))
            return real(level, keys, timeout=timeout)

        self.world.backend.find = find  # type: ignore[method-assign]

    def harvest(self) -> tuple[str, list[tuple[str, str]]]:
        before = len(self.finds)
        hid = self.world.start(WINDOW_2020)
        self.world.run()
        self.world.finish()
        return hid, self.finds[before:]


@pytest.fixture(params=[SourceCapability(True, False, True),
                        SourceCapability(True, False, True, upper_level_keys=True),
                        SourceCapability(False, False, True)],
                ids=lambda c: c.label())
def counting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CountingWorld]:
    w = CountingWorld(tmp_path / "q.sqlite", request.param)
    yield w
    w.world.close()


def test_a_harvest_never_asks_the_same_question_twice(counting: CountingWorld) -> None:
    hid, finds = counting.harvest()
    kept = {o.sop_uid for o in counting.world.tracker.objects(hid, Decision.KEPT)}
    clinic = counting.clinic
    assert kept == clinic.expected_2020() - {clinic.qa_plan.SOPInstanceUID, clinic.qa_record.SOPInstanceUID}
    repeated = sorted({f for f in finds if finds.count(f) > 1})
    assert not repeated, repeated
    # The clinic does ask some questions twice (several FoR and REG searches of one patient, a contour image
    # and its series): the jobs' notes count them as answered by earlier searches.
    notes = [j.note or "" for j in counting.world.queue.list_jobs(harvest_id=hid, limit=1000)]
    reused = sum(int(n.split(" more answered")[0].rsplit("(", 1)[1]) for n in notes if " more answered" in n)
    assert reused > 0, notes


def test_a_later_harvest_asks_the_source_again(counting: CountingWorld) -> None:
    _, first = counting.harvest()
    second_id, second = counting.harvest()
    # Every question of the first harvest that the second one needs reaches the source again (the records
    # search, at least: a new record may have arrived since).
    assert first[0] in second
    assert len(second) > 0
    assert counting.world.completed(second_id)


def test_frame_of_reference_from_series_answers_needs_no_image_listing(tmp_path: Path) -> None:
    """A source that fills FrameOfReferenceUID in SERIES-level answers: no IMAGE-level FoR question is sent."""
    w = CountingWorld(tmp_path / "q.sqlite", SourceCapability(True, False, True))
    try:
        _, finds = w.harvest()
        series_with_for = [f for f in finds if f[0] == "SERIES" and '"FrameOfReferenceUID": ""' in f[1]]
        image_for = [f for f in finds if f[0] == "IMAGE" and '"FrameOfReferenceUID": ""' in f[1]]
        assert series_with_for, finds
        assert not image_for, image_for
    finally:
        w.world.close()

"""The one background-loop class every service thread of the plugin runs on (rtharvest.background)."""

from __future__ import annotations

import logging
import threading

import pytest

from rtharvest.background import BackgroundLoop


def test_a_wake_starts_the_next_pass_at_once_and_stop_joins() -> None:
    """With an hour between idle passes, a wake still makes the loop pass again; stop ends and joins it."""
    passes: list[int] = []
    passed = threading.Event()

    def step() -> bool:
        passes.append(len(passes))
        passed.set()
        return False

    loop = BackgroundLoop("test-loop", step, 3600.0)
    loop.start()
    try:
        assert passed.wait(10)
        passed.clear()
        assert loop.alive and loop.name == "test-loop"
        loop.wake()
        assert passed.wait(10), "the woken loop did not pass again"
        assert len(passes) == 2
    finally:
        assert loop.stop(10)
    assert not loop.alive and loop.stopping


def test_a_failing_pass_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    survived = threading.Event()

    def step() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        survived.set()
        return False

    loop = BackgroundLoop("flaky", step, 3600.0, error_wait=0.01)
    with caplog.at_level(logging.ERROR, logger="rtharvest.background"):
        loop.start()
        try:
            assert survived.wait(10), "the loop died with its failing pass"
        finally:
            loop.stop(10)
    assert any("flaky: a pass failed" in r.getMessage() for r in caplog.records)


def test_a_busy_pass_is_followed_at_once_and_a_once_loop_ends_by_itself() -> None:
    todo = [3]
    done = threading.Event()

    def step() -> bool:  # three pieces of work without waiting the hour between them
        todo[0] -= 1
        if todo[0] == 0:
            done.set()
        return todo[0] > 0

    loop = BackgroundLoop("busy", step, 3600.0)
    loop.start()
    assert done.wait(10)
    loop.stop(10)
    ran = threading.Event()

    def run_once() -> bool:
        ran.set()
        return True  # "more to do", yet a once loop ends after its pass

    once = BackgroundLoop("once", run_once, 3600.0, once=True)
    once.start()
    assert ran.wait(10)
    assert once.stop(10) and not once.alive


def test_stop_runs_on_stop_so_a_step_blocked_on_its_own_condition_ends() -> None:
    cond = threading.Condition()
    ended = [False]

    def step() -> bool:
        with cond:
            while not ended[0]:
                cond.wait()
        return False

    def end() -> None:
        with cond:
            ended[0] = True
            cond.notify_all()

    loop = BackgroundLoop("blocked", step, on_stop=end)
    loop.start()
    assert loop.alive
    assert loop.stop(10), "the blocked step was not released by on_stop"

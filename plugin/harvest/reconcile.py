"""Start-up reconciliation of the harvester's queue against its store.

The queue and the tracker live in local SQLite; the store's index may be elsewhere (PostgreSQL) and may
be newer than the queue: after a crash (instances stored after the last committed decision), or after a
restore whose queue backup is older than the index and files (docs/operations.md takes them in that
order). Before any worker claims a job, what the queue still believes missing is looked up in the store:

* **undecided expectations** — instances a previous run was moving for a job that is no longer running
  (no decision recorded): planned from the stored copy as arrivals of that job's move (``moved``), so a
  candidate it brought in only to inspect is still removed by the end-of-harvest clean-up;
* **pending retrieves of one named instance** (``RetrieveInstance``) without a decision — planned from
  the stored copy exactly as the worker would on its first look (nothing moved); the job then finds the
  decision made.

Both go through :meth:`rtharvest.harvest.harvester.Harvester.plan_stored`, the one place where the store stands
in for a move. Nothing here contacts a source. Each harvest with anything checked gets one summary event
(counts only, no patient data).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core.operations import OperationKind
from ..store.eventlog import Level, exception_summary
from ..store.jobqueue import HarvestState, JobState
from ..store.tracking import Expectation
from .harvester import Harvester, JobFailure

log = logging.getLogger("rtharvest.reconcile")

#: Jobs read per page while listing pending retrieves.
_PAGE = 1000


@dataclass
class HarvestReconciliation:
    """What the reconciliation did for one harvest."""

    checked: int = 0
    planned_from_store: int = 0
    failed: int = 0


@dataclass
class Reconciliation:
    """The start-up reconciliation's outcome (``StartupReconciliation`` of ``GET /rtharvest/status``)."""

    done: bool = False
    checked: int = 0
    planned_from_store: int = 0
    failed: int = 0
    seconds: float = 0.0
    error: str | None = None
    harvests: dict[str, HarvestReconciliation] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        """The status route's view."""
        doc: dict[str, Any] = {"Done": self.done, "Checked": self.checked, "PlannedFromStore": self.planned_from_store,
                               "Failed": self.failed, "Seconds": round(self.seconds, 3)}
        if self.error:
            doc["Error"] = self.error
        return doc


def _unfinished(state: HarvestState) -> bool:
    return state in (HarvestState.RUNNING, HarvestState.PAUSED)


def _pending_retrieves(harvester: Harvester) -> Iterator[Expectation]:
    """Expectations of the pending (or waiting) ``RetrieveInstance`` jobs of unfinished harvests."""
    queue = harvester.queue
    for harvest in queue.list_harvests(limit=1_000_000):
        if not _unfinished(harvest.state):
            continue
        for state in (JobState.PENDING, JobState.WAITING):
            offset = 0
            while True:
                jobs = queue.list_jobs(harvest.id, state, limit=_PAGE, offset=offset,
                                       kind=OperationKind.RETRIEVE_INSTANCE.value)
                for job in jobs:
                    expectation = harvester.local_expectation(job)
                    if expectation is not None and not harvester.tracker.has_object(harvest.id, expectation.sop_uid):
                        yield expectation
                if len(jobs) < _PAGE:
                    break
                offset += _PAGE


def reconcile(harvester: Harvester, stop: threading.Event | None = None,
              result: Reconciliation | None = None) -> Reconciliation:
    """Plan from the store what the queue believes missing and the store holds; never raises.

    Call after the leases of dead runs were reclaimed and before the workers start. ``result`` (filled in
    as it goes, ``done`` last) lets the status route show the progress of a long reconciliation.
    """
    started = time.monotonic()
    result = result if result is not None else Reconciliation()
    try:
        _reconcile(harvester, result, stop)
    except Exception as exc:  # the workers still find stored objects on their own; say why this failed
        log.exception("start-up reconciliation failed")
        result.error = exception_summary(exc)  # planning reads datasets: no message that may quote one
        harvester.events.write(Level.ERROR, "reconcile", f"start-up reconciliation against the store failed: "
                               f"{result.error}; the workers still look every object up in the store first")
    result.seconds = time.monotonic() - started
    result.done = True
    return result


def _reconcile(harvester: Harvester, result: Reconciliation, stop: threading.Event | None) -> None:
    # Moving jobs first (their arrivals were this harvest's moves), then named retrieves; one entry per
    # (harvest, instance, job): the same instance may be expected by several jobs of a harvest.
    moving = harvester.tracker.undecided_expectations()
    retrieving = list(_pending_retrieves(harvester))
    stored = harvester.store.lookup_many([e.sop_uid for e in moving + retrieving])
    seen: set[tuple[str, str]] = set()
    planned: set[tuple[str, str]] = set()
    for expectations, moved in ((moving, True), (retrieving, False)):
        for expectation in expectations:
            if stop is not None and stop.is_set():
                return
            key = (expectation.harvest_id, expectation.sop_uid)
            counts = result.harvests.setdefault(expectation.harvest_id, HarvestReconciliation())
            if key not in seen:
                seen.add(key)
                counts.checked += 1
                result.checked += 1
            orthanc_id = stored.get(expectation.sop_uid)
            if orthanc_id is None:
                continue  # missing indeed: its job moves it
            if not moved and harvester.tracker.has_object(*key):
                continue  # a previous run's move of it was planned above: the retrieve finds it decided
            try:
                harvester.plan_stored([(expectation, orthanc_id)], moved=moved)
            except JobFailure as exc:
                # Its job plans it again (and fails with the reason if it still cannot).
                counts.failed += 1
                result.failed += 1
                log.warning("start-up reconciliation: %s", exc.message)
                continue
            if key not in planned:  # counted once per object (several jobs may have been moving it)
                planned.add(key)
                counts.planned_from_store += 1
                result.planned_from_store += 1
    for harvest_id, counts in result.harvests.items():
        harvester.events.write(
            Level.INFO, "reconcile",
            f"start-up reconciliation: {counts.checked} object(s) the queue believed missing checked against the "
            f"store, {counts.planned_from_store} held there and planned from the stored copy (not moved again)"
            + (f", {counts.failed} could not be planned (their jobs retry)" if counts.failed else ""),
            harvest_id=harvest_id)

"""The provenance writer: drains the tracker's provenance outbox into the local store's metadata.

Each provenance value is an index transaction that holds the GIL (``orthanc.RestApiPut``) and makes
Orthanc hand an ``UpdatedMetadata`` change to the plugin's OnChange callback, which takes the GIL again.
Written while instances stream in, they compete with the C-STORE callbacks and the ingest thread; written
when arrivals pause they do not (see benchmarks/README.md). :meth:`ProvenanceWriter.due` says when; the
harvester's maintenance loop calls it and :meth:`ProvenanceWriter.write`. What is written where (series,
else instance) is the pure :func:`rtharvest.core.provenance.plan_series`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..core.provenance import StoredSeries, plan_series
from ..store.eventlog import EventLog, Level
from ..store.tracking import ProvenanceItem, Tracker

if TYPE_CHECKING:
    from .harvester import LocalStore


class ProvenanceWriter:
    """Writes pending provenance, series by series, when arrivals pause (one job: the outbox)."""

    #: Provenance is written once arrivals have paused this long, ...
    PROVENANCE_QUIET_S = 0.3
    #: ... or once it has waited this long while they keep coming, or at once for a harvest whose jobs are
    #: all done (it shows Completed only when its provenance is written).
    PROVENANCE_MAX_LAG_S = 10.0

    def __init__(self, store: LocalStore, tracker: Tracker, events: EventLog,
                 last_arrival: Callable[[], float], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.tracker = tracker
        self.events = events
        #: Monotonic time of the latest arrival (the ingest's).
        self.last_arrival = last_arrival
        #: Monotonic clock of the rule in :meth:`due` (tests give a fake one).
        self.clock = clock
        self._deferred_since: float | None = None

    def due(self, harvest_finishing: bool) -> bool:
        """Whether provenance is written now: after a pause of :data:`PROVENANCE_QUIET_S` in arrivals, at
        most :data:`PROVENANCE_MAX_LAG_S` behind, and at once for a harvest whose jobs are all done."""
        now = self.clock()
        since = self._deferred_since
        if harvest_finishing or now - self.last_arrival() >= self.PROVENANCE_QUIET_S \
                or (since is not None and now - since >= self.PROVENANCE_MAX_LAG_S):
            return True
        if since is None:
            self._deferred_since = now
        return False

    def write(self, batch: int = 200) -> bool:
        """Write pending provenance metadata, series by series; returns True if there was work."""
        groups = self.tracker.pending_provenance_by_series(batch)
        if not groups:
            self._deferred_since = None  # caught up: the lag counts from the next deferral
            return False
        for items in groups:
            done = self._write_series(items)
            if done:
                self.tracker.provenance_done(done)
        return True

    def _write_series(self, items: Sequence[ProvenanceItem]) -> list[ProvenanceItem]:
        """Write the provenance of one series' pending items; returns the items that are done."""
        series: StoredSeries | None = None
        gone: list[ProvenanceItem] = []
        for item in items:
            try:
                series = self.store.series_of(item.orthanc_id)
                break
            except LookupError:
                gone.append(item)  # deleted meanwhile: nothing to stamp
            except Exception as exc:
                return gone + self._failed(items, exc)
        if series is None:
            return gone
        gone_set = set(gone)
        live = [i for i in items if i not in gone_set]
        try:
            stamp = self.store.series_metadata(series.orthanc_id)
            plan = plan_series(live, stamp, series.instances)
            if plan.series is not None:
                for name, value in plan.series.items():
                    self.store.set_series_metadata(series.orthanc_id, name, value)
        except Exception as exc:
            return gone + self._failed(live, exc)
        covered, own = set(plan.covered), set(plan.instances)
        done = gone + [i for i in live if i in covered]
        for item in live:
            if item not in own:
                continue
            try:
                if not self.store.metadata(item.orthanc_id).get("HarvestId"):  # else its first provenance stays
                    for name, value in item.metadata().items():
                        self.store.set_metadata(item.orthanc_id, name, value)
            except LookupError:
                pass  # deleted meanwhile
            except Exception as exc:
                self._failed([item], exc)
                continue
            done.append(item)
        return done

    def _failed(self, items: Sequence[ProvenanceItem], exc: Exception) -> list[ProvenanceItem]:
        """Count a failed write for each item; returns none (failed items stay in the outbox, or are dropped
        by the tracker once hopeless)."""
        for item in items:
            if self.tracker.provenance_failed(item):
                self.events.write(Level.ERROR, "provenance", f"gave up writing provenance: {exc}",
                                  harvest_id=item.harvest_id, sop_uid=item.sop_uid)
        return []

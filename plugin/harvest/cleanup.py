"""End of a harvest: remove the candidates nobody claimed, mark it clean, forget its searches.

The harvester's maintenance loop calls :meth:`HarvestCleanup.finish` after the provenance writer; a
harvest shows ``Completed`` only once it is marked clean here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..store.eventlog import EventLog, Level
from ..store.findcache import FindCache
from ..store.tracking import Tracker

if TYPE_CHECKING:
    from .harvester import LocalStore


class HarvestCleanup:
    """Finishes harvests whose jobs have all ended, and forgets ended jobs' expectations in time."""

    #: How long an ended job's expectations attribute late arrivals to its harvest (``Expectation.late``):
    #: a source still sending after a C-MOVE timeout finishes within minutes; later, an arrival is
    #: unsolicited ("not part of any harvest").
    LATE_ARRIVAL_GRACE_S = 3600.0

    def __init__(self, store: LocalStore, tracker: Tracker, events: EventLog, finds: FindCache, *,
                 delete_rejected: bool = True) -> None:
        self.store = store
        self.tracker = tracker
        self.events = events
        self.finds = finds
        self.delete_rejected = delete_rejected
        self._last_expectation_purge = 0.0

    def finish(self, finished: Sequence[str] | None = None) -> None:
        """After a harvest's last job (Completed, or Cancelled once its running jobs ended): delete (or
        keep, per policy) the candidates nobody claimed, then mark it clean (it shows ``Completed`` only
        then).

        A late candidate cannot slip past this by design: an arrival is attributed to a harvest only
        through an expectation of one of its jobs (running, or ended within ``LATE_ARRIVAL_GRACE_S``: then
        it is a rejected candidate), expectations end in the same transaction as the job's completion or
        failure, and every new decision un-marks the harvest in its own transaction. The mark
        is written only in a transaction that finds the harvest finished, with no unclaimed candidate and
        no provenance of its own left; otherwise the next pass tries again. ``finished``: the harvests to
        look at, when the caller has just asked :meth:`Tracker.harvests_to_clean`.
        """
        for harvest_id in self.tracker.harvests_to_clean() if finished is None else finished:
            self.finds.forget(harvest_id)  # finished: a job reopening it must see the sources as they are now
            if self.tracker.pending_provenance_of(harvest_id):
                continue  # this harvest's own provenance first; other harvests' backlog does not matter
            removed = 0
            if self.delete_rejected:
                for sop_uid, orthanc_id in self.tracker.rejected_unclaimed(harvest_id):
                    try:
                        self.store.delete(orthanc_id)
                        removed += 1
                    except LookupError:
                        pass
                    self.tracker.forget_orthanc_id(harvest_id, sop_uid)
            with self.tracker.db.transaction():
                if harvest_id not in self.tracker.harvests_to_clean():
                    continue  # reopened meanwhile
                if self.delete_rejected and self.tracker.rejected_unclaimed(harvest_id):
                    continue  # decided meanwhile: the next pass removes it
                if self.tracker.pending_provenance_of(harvest_id):
                    continue
                self.tracker.mark_cleanup(harvest_id)
                counts = self.tracker.decision_counts(harvest_id)
            self.finds.forget(harvest_id)
            # One summary instead of an event per instance (a re-harvest plans everything from the store).
            self.events.write(Level.INFO, "harvester", f"harvest finished: {counts.kept} instance(s) kept "
                              f"({counts.moved} moved, {counts.kept - counts.moved} already in the store), "
                              f"{counts.rejected} candidate(s) inspected and rejected, {removed} removed from "
                              "the store", harvest_id=harvest_id)

    def purge_ended_expectations(self, every: float = 60.0) -> int:
        """Forget ended jobs' expectations past the late-arrival grace period (at most once per ``every``
        seconds); returns how many."""
        now = time.monotonic()
        if now - self._last_expectation_purge < every:
            return 0
        self._last_expectation_purge = now
        with self.tracker.db.transaction():
            return self.tracker.purge_ended_expectations(time.time() - self.LATE_ARRIVAL_GRACE_S)

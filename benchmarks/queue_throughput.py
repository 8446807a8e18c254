"""Durable transitions per second of the job queue, and event-log inserts per second.

A benchmark that prints, not a test. Every number is for committed (durable) transactions on a fresh
SQLite file in WAL mode:

    .venv/bin/python benchmarks/queue_throughput.py [--jobs 20000] [--dir /tmp] [--full]

"transition" = one job state change committed on its own (enqueue, claim, complete); enqueue_many
batches many enqueues in one transaction. Target on a 2-core machine: >= 2,000 transitions/s for
enqueue + claim + complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from rtharvest.store.db import Database
from rtharvest.store.eventlog import EventLog, EventLogHandler, NewEvent
from rtharvest.store.jobqueue import EnqueueItem, JobQueue, SourceLimits


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f}/s  ({n:,} in {seconds:.2f} s)"


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def open_queue(path: str, synchronous: Literal["NORMAL", "FULL"]) -> tuple[Database, JobQueue]:
    db = Database(path, synchronous=synchronous)
    return db, JobQueue(db, default_limits=SourceLimits(max_concurrent=1000))


def bench_queue(workdir: str, n_jobs: int, synchronous: Literal["NORMAL", "FULL"]) -> None:
    print(f"\n== job queue, synchronous={synchronous}, {n_jobs:,} jobs ==")
    db, q = open_queue(os.path.join(workdir, f"queue-{synchronous}.db"), synchronous)
    h = q.create_harvest("ARIA", "bench")

    # 1. enqueue one job per transaction (the harvester's typical discovery path).
    n_single = n_jobs // 4

    def enqueue_single() -> int:
        for i in range(n_single):
            q.enqueue(h.id, "move", "ARIA", {"uid": f"1.2.{i}"}, f"s{i}")
        return n_single

    n, t_enq1 = timed(enqueue_single)
    print(f"enqueue, 1 per transaction      {rate(n, t_enq1)}")

    # 2. enqueue_many: 500 per transaction.
    def enqueue_batched() -> int:
        items = [EnqueueItem(h.id, "move", "ARIA", {"uid": f"1.3.{i}"}, f"b{i}") for i in range(n_jobs)]
        for k in range(0, len(items), 500):
            q.enqueue_many(items[k : k + 500])
        return len(items)

    n, t_enqm = timed(enqueue_batched)
    print(f"enqueue_many, 500 per tx        {rate(n, t_enqm)}")
    total_jobs = n_single + n_jobs

    # 3. claim + complete, one thread; each is its own durable transaction.
    n_cycle = n_jobs // 2
    t_claim = t_complete = 0.0
    for _ in range(n_cycle):
        t0 = time.perf_counter()
        job = q.claim("bench:0", 60)
        t1 = time.perf_counter()
        assert job is not None
        q.complete(job.id, "bench:0")
        t_complete += time.perf_counter() - t1
        t_claim += t1 - t0
    print(f"claim (1 thread)                {rate(n_cycle, t_claim)}")
    print(f"complete (1 thread)             {rate(n_cycle, t_complete)}")
    per_job = t_enq1 / n_single + t_claim / n_cycle + t_complete / n_cycle
    print(f"enqueue+claim+complete, 1 tx each: {3 / per_job:>8,.0f} transitions/s"
          f"  ({1 / per_job:,.0f} jobs/s end to end)")

    # 4. four worker threads drain the rest concurrently (claim + complete).
    remaining = total_jobs - n_cycle
    done = [0] * 4

    def worker(k: int) -> None:
        owner = f"bench:{k + 1}"
        while True:
            job = q.claim(owner, 60)
            if job is None:
                return
            q.complete(job.id, owner)
            done[k] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_mt = time.perf_counter() - t0
    assert sum(done) == remaining, (sum(done), remaining)
    print(f"claim+complete, 4 threads       {rate(2 * remaining, t_mt)}  transitions "
          f"(per thread: {', '.join(f'{d:,}' for d in done)})")
    db.close()


def bench_log(workdir: str, n_events: int) -> None:
    print(f"\n== event log, {n_events:,} events ==")
    db = Database(os.path.join(workdir, "log.db"))
    log = EventLog(db)

    n_single = n_events // 10

    def single() -> int:
        for i in range(n_single):
            log.write("info", "bench", "stored instance", harvest_id="h1", job_id=i, source="ARIA",
                      sop_uid=f"1.2.{i}")
        return n_single

    n, t = timed(single)
    print(f"write, 1 per transaction        {rate(n, t)}")

    def batched() -> int:
        batch = [NewEvent("info", "bench", "stored instance", harvest_id=f"h{i % 7}", job_id=i,
                          source="ARIA", sop_uid=f"1.2.{i}") for i in range(n_events)]
        for k in range(0, len(batch), 1000):
            log.write_many(batch[k : k + 1000])
        return len(batch)

    n, t = timed(batched)
    print(f"write_many, 1000 per tx         {rate(n, t)}")

    handler = EventLogHandler(log, max_queue=n_events + 1)
    logger = logging.getLogger("rtharvest.bench")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    n_handler = n_events // 2

    def via_handler() -> int:
        for i in range(n_handler):
            logger.warning("C-MOVE failed", extra={"harvest_id": "h9", "job_id": i, "dimse_status": 0xA702})
        handler.wait_flushed(120)
        return n_handler

    n, t = timed(via_handler)
    print(f"logging handler (queued+stored) {rate(n, t)}  dropped={handler.dropped}")
    logger.removeHandler(handler)
    handler.close()

    total = log.count()
    queries: tuple[tuple[str, dict[str, Any]], ...] = (
        ("newest 100", {}),
        ("harvest=h3", {"harvest_id": "h3"}),
        ("min_level=warning", {"min_level": "warning"}),
        ("min_level=error (none)", {"min_level": "error"}),
        ("harvest=nope (none)", {"harvest_id": "nope"}),
        ("since=10 s ago", {"since": time.time() - 10}),
        ("harvest=h3, 5th page", {"harvest_id": "h3", "before_id": total // 2}),
    )
    for label, kwargs in queries:
        t0 = time.perf_counter()
        for _ in range(20):
            log.query(limit=100, **kwargs)
        print(f"query {label:<24} {(time.perf_counter() - t0) / 20 * 1000:8.2f} ms  (table: {total:,} rows)")
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--dir", default=None, help="where to create the files (default: a temp dir)")
    ap.add_argument("--full", action="store_true", help="also measure synchronous=FULL")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        print(f"files in {workdir} ({os.cpu_count()} CPUs)")
        bench_queue(workdir, args.jobs, "NORMAL")
        if args.full:
            bench_queue(workdir, max(1000, args.jobs // 10), "FULL")
        bench_log(workdir, args.events)


if __name__ == "__main__":
    main()

"""Worker process for the queue's multi-process and SIGKILL tests (run as a script, not collected).

Opens the queue file, reclaims the leases of its dead predecessors, and runs ``--threads`` workers that
claim jobs, "work" for a few milliseconds, then complete them. Jobs of kind ``parent`` discover
``--children`` follow-up jobs, enqueued atomically with the parent's completion. Every step is appended
to an append-only text log (one ``write()`` of a whole line on an O_APPEND file, so lines from several
threads and processes never interleave; a SIGKILL can at most leave the last line unterminated):

    claim <job> <attempt> <owner>
    work <job> <attempt> <owner>
    done <job> <attempt> <owner>      (written only after complete() returned)

Exits 0 when every harvest is finished, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from rtharvest.store.db import Database
from rtharvest.store.jobqueue import EnqueueItem, JobQueue, RetryPolicy, SourceLimits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--node", default="child", help="owner prefix; leases of this prefix are reclaimed")
    ap.add_argument("--recover", action="store_true", help="reclaim all leases of --node at startup")
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--work-ms", type=float, default=2.0)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--lease", type=float, default=30.0)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    args = ap.parse_args(argv)

    db = Database(args.db)
    queue = JobQueue(
        db,
        RetryPolicy(max_attempts=50, base_delay=0.0, max_delay=0.0, jitter=0.0),
        default_limits=SourceLimits(max_concurrent=64),
    )
    pid = os.getpid()
    if args.recover:
        queue.recover_stale_leases(owner_prefix=f"{args.node}:")
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    deadline = time.monotonic() + args.max_seconds
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        owner = f"{args.node}:{pid}:{n}"
        try:
            while time.monotonic() < deadline:
                job = queue.claim(owner, args.lease)
                if job is None:
                    if all(queue.is_harvest_finished(h.id) for h in queue.list_harvests()):
                        return
                    time.sleep(0.005)
                    continue
                record(f"claim {job.id} {job.attempts} {owner}")
                time.sleep(args.work_ms / 1000.0)
                record(f"work {job.id} {job.attempts} {owner}")
                follow = []
                if job.kind == "parent":
                    follow = [
                        EnqueueItem(job.harvest_id, "child", job.source, {"parent": job.id, "n": i},
                                    f"child:{job.id}:{i}")
                        for i in range(args.children)
                    ]
                queue.complete(job.id, owner, note=owner, follow_ups=follow)
                record(f"done {job.id} {job.attempts} {owner}")
        except BaseException as exc:  # report and fail the process: the test reads the exit code
            errors.append(exc)
            raise

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd)
    db.close()
    if errors:
        print(f"worker errors: {errors!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

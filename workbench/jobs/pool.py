"""Running a spec's parts on local worker processes (``workbench run SPEC --workers N``).

The driver queues every part that is not already stored (:meth:`JobQueue.submit`, idempotent
by run id), starts ``N`` ``workbench worker --exit-when-idle`` processes, and follows the job
table with one progress bar until every part is done, failed or cancelled. Workers that die
are replaced while work remains; their jobs come back to the queue once the heartbeat lapses.
A killed driver leaves its jobs queued: running the spec again serves what was stored, finds
the rest already queued, and starts workers for them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from workbench.errors import WorkbenchError
from workbench.jobs.queue import JobQueue
from workbench.jobs.worker import LAPSE_S


def start_worker(
    root: str, threads: int | None, lapse_s: float = LAPSE_S, *, idle_exit: bool = True
) -> subprocess.Popen[bytes]:
    """A ``workbench worker`` process on the store at ``root``, a child of this process (it
    stops when this process is gone, and with ``idle_exit`` once nothing is queued)."""
    cmd = [sys.executable, "-m", "workbench.cli", "worker", "--store", root,
           "--lapse", str(lapse_s), "--parent", str(os.getpid())]  # fmt: skip
    if idle_exit:
        cmd.append("--exit-when-idle")
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL)


def run_on_workers(
    parts: Sequence[Any],
    store: Any,
    workers: int,
    *,
    title: str = "run",
    progress: bool = True,
    read: bool = False,
    threads: int | None = 1,
    lapse_s: float = LAPSE_S,
    poll_s: float = 0.2,
    on_result: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Every part of ``parts`` computed by ``workers`` local worker processes (or served from
    the store); outcomes in the order of ``parts`` (``workbench.runner.PartOutcome``; a failed
    or cancelled part has that status and no result). Raises one WorkbenchError naming the
    first failure after every part has ended."""
    from tqdm.auto import tqdm

    from workbench.runner import PartOutcome, serve_stored

    if workers < 1:
        raise WorkbenchError(f"--workers must be at least 1, got {workers}", "use --workers 2")
    queue = JobQueue(store.root)
    outcomes: dict[str, PartOutcome] = {}
    waiting: dict[str, Any] = {}
    for part in serve_stored(parts, store, outcomes, read=read, on_result=on_result):
        queue.submit(part, again=True)  # a job done before whose result is gone runs again
        waiting[part.run_id] = part
    procs: list[subprocess.Popen[bytes]] = []
    starts, last_requeue = 0, 0.0
    bar = tqdm(total=len(parts), initial=len(outcomes), desc=title, unit="part",
               disable=not progress)  # fmt: skip
    try:
        while waiting:
            if time.monotonic() - last_requeue >= 1.0:  # a write: not on every poll
                queue.requeue_stale(lapse_s)
                last_requeue = time.monotonic()
            jobs = {j.job_id: j for j in queue.jobs(list(waiting))}
            alive = [p for p in procs if p.poll() is None]
            pending = [j for j in jobs.values() if not j.done]
            want = min(workers, len(pending)) - len(alive)
            if want > 0 and starts < 4 * workers + len(parts):  # replace workers that died
                for _ in range(want):
                    procs.append(start_worker(str(store.root), threads, lapse_s))
                    starts += 1
            for job_id, job in jobs.items():
                if not job.done:
                    continue
                part = waiting.pop(job_id)
                status = "computed" if job.state == "done" else job.state
                result = _read(store, part, read) if status == "computed" else None
                seconds = (job.finished or 0) - (job.started or job.finished or 0)
                outcomes[job_id] = PartOutcome(part, status, seconds, result, job.error)
                bar.update(1)
                if on_result is not None:
                    on_result(outcomes[job_id])
            running = [j for j in jobs.values() if j.state == "running"]
            if running:
                j = running[0]
                bar.set_postfix_str(f"{len(running)} running; {j.title} {j.step}/{j.total}")
            if waiting:
                time.sleep(poll_s)
    finally:
        bar.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.terminate()
    failed = [o for o in outcomes.values() if o.status in ("failed", "cancelled")]
    if failed:
        first = queue.get(failed[0].run_id)
        raise WorkbenchError(
            f"{len(failed)} of {len(parts)} part(s) did not finish; first: "
            f"{failed[0].part.describe()} {failed[0].status}"
            + (f" ({first.error})" if first is not None and first.error else ""),
            "see `workbench jobs`; fix the part and run the spec again (stored parts are kept)",
        )
    return [outcomes[p.run_id] for p in parts]


def _read(store: Any, part: Any, read: bool) -> Any:
    return store.load(part.run_id) if read else None

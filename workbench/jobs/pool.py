"""Running a spec's parts on local worker processes (``workbench run SPEC --workers N``).

The driver queues every part that is not already stored (:meth:`JobQueue.submit`, idempotent
by run id), starts up to ``N`` ``workbench worker --exit-when-idle`` processes for the queued
jobs, and follows the job table with one progress bar until every part is done, failed or
cancelled. Workers that die are replaced while work remains; their jobs come back to the queue
once the heartbeat lapses. Drivers of one store share jobs: a part already queued or running
(another driver's) is waited for, not queued again, and served from the store once done, so it
is computed once; a done job whose result is missing or not servable is queued again once
(:meth:`JobQueue.rerun`). A killed driver leaves its jobs queued: running the spec again serves
what was stored, finds the rest already queued, and starts workers for them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from workbench.errors import WorkbenchError
from workbench.jobs.queue import IN_STORE, Job, JobQueue
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
    or cancelled part has that status and no result). A part whose job another driver queued
    is not queued twice: this driver waits for that job and serves its stored result
    ("stored"); "computed" are the parts this driver's workers computed. Raises one
    WorkbenchError naming the first failure after every part has ended."""
    from tqdm.auto import tqdm

    from workbench.runner import PartOutcome, serve_stored

    if workers < 1:
        raise WorkbenchError(f"--workers must be at least 1, got {workers}", "use --workers 2")
    queue = JobQueue(store.root)
    outcomes: dict[str, PartOutcome] = {}
    waiting: dict[str, Any] = {}
    for part in serve_stored(parts, store, outcomes, read=read, on_result=on_result):
        queue.submit(part)  # one job per run id: one queued or running already is shared
        waiting[part.run_id] = part
    procs: list[subprocess.Popen[bytes]] = []
    mine: set[str] = set()  # this driver's workers, as the job table names them
    last_requeue = 0.0
    bar = tqdm(total=len(parts), initial=len(outcomes), desc=title, unit="part",
               disable=not progress)  # fmt: skip
    try:
        while waiting:
            if time.monotonic() - last_requeue >= 1.0:  # a write: not on every poll
                queue.requeue_stale(lapse_s)
                last_requeue = time.monotonic()
            jobs = {j.job_id: j for j in queue.jobs(list(waiting))}
            for run_id, part in list(waiting.items()):
                job = jobs.get(run_id)
                if job is None:  # the job table was deleted meanwhile
                    jobs[run_id] = queue.submit(part)
                    continue
                if not job.done:
                    continue
                outcome = _ended(part, job, store, read, mine)
                if outcome is None:  # done, but its result is gone or not to be served
                    jobs[run_id] = queue.rerun(part, job)
                    continue
                del waiting[run_id]
                outcomes[run_id] = outcome
                bar.update(1)
                if on_result is not None:
                    on_result(outcome)
            pending = [jobs[run_id] for run_id in waiting]
            _staff(procs, mine, pending, workers, len(parts), store, threads, lapse_s)
            running = [j for j in pending if j.state == "running"]
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


def _ended(part: Any, job: Job, store: Any, read: bool, mine: set[str]) -> Any:
    """The outcome of ``part`` whose job ``job`` ended: "computed" when one of this driver's
    workers (``mine``) computed it; a done job computed elsewhere (another driver's worker, or
    served by its worker) is served through :func:`~workbench.runner.stored_outcome`; None
    when its result is missing or not servable (then it is to be run again)."""
    from workbench.runner import PartOutcome, stored_outcome

    seconds = (job.finished or 0) - (job.started or job.finished or 0)
    if job.state != "done":
        return PartOutcome(part, job.state, seconds, None, job.error)
    if job.worker in mine and job.text != IN_STORE:
        result = store.get(part.run_id) if read else None
        if read and result is None:
            return None
        return PartOutcome(part, "computed", seconds, result)
    return stored_outcome(part, store, read=read)


def _staff(
    procs: list[subprocess.Popen[bytes]],
    mine: set[str],
    pending: Sequence[Job],
    workers: int,
    n_parts: int,
    store: Any,
    threads: int | None,
    lapse_s: float,
) -> None:
    """Start workers for the queued jobs (up to ``workers`` alive at once, counting those busy
    with a job): none for jobs running on another driver's workers, whose end this driver
    only awaits. Workers that died are replaced; past ``4 * workers + n_parts`` deaths, none
    is, and with none alive and jobs still queued the run stops with a WorkbenchError."""
    alive = [p for p in procs if p.poll() is None]
    queued = sum(j.state == "queued" for j in pending)
    held = sum(j.state == "running" and j.worker in mine for j in pending)
    want = min(workers, queued + held) - len(alive)
    if want <= 0:
        return
    died = sum(p.returncode not in (None, 0) for p in procs)
    if died > 4 * workers + n_parts:
        if not alive:
            raise WorkbenchError(
                f"{died} worker processes died; {queued} job(s) are still queued",
                "run `workbench worker` to see why a worker stops",
            )
        return
    host = socket.gethostname()
    for _ in range(want):
        p = start_worker(str(store.root), threads, lapse_s)
        procs.append(p)
        mine.add(f"{host}:{p.pid}")


def _read(store: Any, part: Any, read: bool) -> Any:
    return store.load(part.run_id) if read else None

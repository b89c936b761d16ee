"""A worker: a process that owns its loaded models and runs queued jobs one at a time.

``workbench worker`` (or :func:`work`) claims the oldest queued job of a store, resolves its
request, and runs it through :func:`workbench.runner.run_part` on its own
:class:`~workbench.runner.ModelPool` (models stay loaded between jobs), so no other caller's
hooks ever meet its models. A heartbeat thread reports it alive every ``heartbeat_s`` with the
job's latest progress; a job cancelled meanwhile stops at its next progress step; a job whose
result another process stored first is served, not computed, and ends done "in the store".
The result reaches the store only through the store's atomic protocol; a worker killed mid-job
leaves nothing behind but a running job whose heartbeat lapses, and any worker (or driver) then
puts it back in the queue.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.jobs.queue import IN_STORE, Job, JobQueue, request_from_json

LAPSE_S = 30.0
"""A running job whose heartbeat is older than this goes back to the queue."""


class JobCancelled(Exception):
    """Raised inside a job's progress callback when the job was cancelled (or lost)."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Beat:
    """The heartbeat thread of one job, carrying the latest progress to the queue."""

    def __init__(self, queue: JobQueue, job: Job, worker: str, every_s: float) -> None:
        self.queue, self.job, self.worker, self.every_s = queue, job, worker, every_s
        self.progress: tuple[int, int, str] | None = None
        self.stopped = threading.Event()
        self.state = "running"
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"beat-{job.job_id}")

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.state = self.queue.heartbeat(self.job.job_id, self.worker, self.progress)
            except WorkbenchError:
                continue  # a busy or briefly unreadable table: try again at the next beat

    def callback(self, desc: str, done: int, total: int) -> None:
        """The job's progress callback (``workbench.progress.reporting``)."""
        self.progress = (done, total, desc)
        if self.state != "running":
            raise JobCancelled(self.state)

    def __enter__(self) -> _Beat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def run_job(job: Job, queue: JobQueue, store: Any, pool: Any, worker: str, beat_s: float) -> str:
    """Run one claimed job; returns its final state (done, failed, cancelled or lost)."""
    from workbench.progress import reporting
    from workbench.runner import run_part

    with _Beat(queue, job, worker, beat_s) as beat:
        try:
            part = request_from_json(job.request).resolve()
            if part.run_id != job.job_id:
                raise WorkbenchError(
                    f"job {job.job_id} resolves to run {part.run_id} on this worker",
                    "run workers with the same workbench and library versions as the driver",
                )
            with reporting(beat.callback):
                outcome = run_part(part, store, pool, read=False)
        except JobCancelled as stop:
            return str(stop)
        except WorkbenchError as e:
            queue.finish(job.job_id, worker, "failed", str(e), beat.progress)
            return "failed"
        except Exception as e:
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"
            queue.finish(job.job_id, worker, "failed", error, beat.progress)
            return "failed"
    # a result another process stored first was served, not computed: the job says so
    progress = beat.progress if outcome.status == "computed" else (0, 0, IN_STORE)
    done = queue.finish(job.job_id, worker, "done", progress=progress)
    return "done" if done else beat.state


def work(
    root: Path | str | None = None,
    *,
    exit_when_idle: bool = False,
    poll_s: float = 0.5,
    heartbeat_s: float = 1.0,
    lapse_s: float = LAPSE_S,
    threads: int | None = None,
    max_jobs: int | None = None,
    parent: int | None = None,
    log: Any = None,
) -> int:
    """Run queued jobs of the store at ``root`` (default: the workbench store) until stopped,
    or until the queue is empty with ``exit_when_idle``, or once process ``parent`` is gone
    (a worker pool started by the app dies with it); returns the number of jobs run.
    ``threads``: torch's thread count in this process (e.g. 1 per worker on a small machine)."""
    from workbench.runner import ModelPool
    from workbench.store import ResultStore

    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    store = ResultStore(Path(root) if root is not None else None)
    queue = JobQueue(store.root)
    pool, me, n = ModelPool(), worker_id(), 0
    while max_jobs is None or n < max_jobs:
        if parent is not None and os.getppid() != parent:
            break
        queue.requeue_stale(lapse_s)
        job = queue.claim(me)
        if job is None:
            if exit_when_idle and not queue.jobs(states=("queued",)):
                break
            time.sleep(poll_s)
            continue
        t0 = time.perf_counter()
        state = run_job(job, queue, store, pool, me, heartbeat_s)
        n += 1
        if log is not None:
            log(f"{state:>9}  {job.job_id}  {job.title}  ({time.perf_counter() - t0:.2f}s)")
    return n

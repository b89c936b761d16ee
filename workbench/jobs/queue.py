"""The job table of a results store: what is queued, running, done, failed or cancelled.

One row per job in ``<store root>/jobs.sqlite`` (SQLite in WAL mode, standard library): the
results catalog (DuckDB) admits one writing process at a time under an exclusive file lock,
while workers write small heartbeats and progress updates every second, which SQLite's
row-level transactions take without blocking result writes. Jobs are bookkeeping, not
results: a result exists only in the results store, written by its atomic protocol; this table
can be deleted at any time without losing one.

A job's id is the run id of the part it computes, so submitting is idempotent: a part already
queued, running or done returns its job; a failed or cancelled one is queued again. So several
drivers submitting one part share one job, and it is computed once while it is queued or
running; a done job is queued again only by :meth:`JobQueue.rerun`, when the caller saw that
very completion's result missing or not servable (two callers deciding at once re-run it once).
A worker claims the oldest queued job atomically (``BEGIN IMMEDIATE``), and only the worker
holding a job can report on it or finish it. A running job whose heartbeat is older than the
lapse goes back to the queue (its worker died), so it is completed once, by another worker.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

STATES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
JOBS_FILE = "jobs.sqlite"
IN_STORE = "in the store"
"""The text of a done job whose result was served from the store, not computed by its worker."""

_DDL = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    title TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    text TEXT NOT NULL DEFAULT '',
    worker TEXT NOT NULL DEFAULT '',
    heartbeat REAL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
"""
_COLUMNS = (
    "job_id", "request", "title", "state", "step", "total", "text", "worker", "heartbeat",
    "created", "started", "finished", "attempts", "error",
)  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One row of the job table (times are Unix seconds)."""

    job_id: str
    request: str  # the RunRequest as JSON (``request_json``)
    title: str
    state: str
    step: int
    total: int
    text: str
    worker: str
    heartbeat: float | None
    created: float
    started: float | None
    finished: float | None
    attempts: int
    error: str

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def _dead_here(worker: str) -> bool:
    """Whether ``worker`` (``host:pid``) was a process of this machine that has exited."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _unreadable(path: Path, err: BaseException) -> WorkbenchError:
    return WorkbenchError(
        f"the job table {path} is unreadable ({err})",
        "stop the workers and delete it (results are not kept there)",
    )


def request_json(request: Any) -> str:
    """A :class:`~workbench.runner.RunRequest` as canonical JSON (what a worker resolves)."""
    return json.dumps(
        {
            "analysis": request.analysis,
            "model": request.model,
            "task": request.task,
            "params": dict(request.params),
            "task_params": dict(request.task_params),
            "prepend_bos": request.prepend_bos,
            "device": request.device,
            "dtype": request.dtype,
        },
        sort_keys=True,
    )


def request_from_json(text: str) -> Any:
    from workbench.runner import RunRequest

    d: Mapping[str, Any] = json.loads(text)
    return RunRequest(
        d["analysis"], d["model"], d["task"], d["params"], d["task_params"], d["prepend_bos"],
        d.get("device"), d.get("dtype"),
    )  # fmt: skip


class JobQueue:
    """The job table of the store rooted at ``root`` (created on first use)."""

    def __init__(self, root: Path | str) -> None:
        self.path = Path(root) / JOBS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(_DDL)
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            raise _unreadable(self.path, e) from None

    def __repr__(self) -> str:
        return f"JobQueue({str(self.path)!r})"

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            raise _unreadable(self.path, e) from None
        finally:
            con.close()

    @staticmethod
    def _job(row: Sequence[Any]) -> Job:
        return Job(*row)

    def _fetch(self, con: sqlite3.Connection, job_id: str) -> Job | None:
        rows = con.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id = ?", [job_id]
        ).fetchall()
        return self._job(rows[0]) if rows else None

    # ---- the driver's side ----------------------------------------------------------------

    def submit(self, part: Any, *, again: bool = False) -> Job:
        """Queue ``part`` (a resolved :class:`~workbench.runner.Part`) as job ``part.run_id``;
        idempotent: a queued, running or done job is returned as it is (a done one is queued
        again with ``again``: its result is not in the store), a failed or cancelled one is
        queued again. ``again=True`` re-queues any done job, even one that finished after
        the caller looked in the store; a driver uses :meth:`rerun` with the done job it saw."""
        keep = ("queued", "running") if again else ("queued", "running", "done")
        with self._tx(immediate=True) as con:
            found = self._fetch(con, part.run_id)
            if found is not None and found.state in keep:
                return found
            self._queue(con, part, found)
            job = self._fetch(con, part.run_id)
        assert job is not None
        return job

    def rerun(self, part: Any, seen: Job) -> Job:
        """Queue the done job of ``part`` again because its result, as the caller saw it done
        (``seen``), is missing from the store or not servable; a job that changed since
        (queued again by another caller, and running, done, failed or cancelled since) is
        returned as it is, so that callers deciding at once re-run it once."""
        with self._tx(immediate=True) as con:
            found = self._fetch(con, part.run_id)
            unchanged = (
                found is not None
                and found.state == "done"
                and ((found.finished, found.attempts) == (seen.finished, seen.attempts))
            )
            if found is None or unchanged:
                self._queue(con, part, found)
            job = self._fetch(con, part.run_id)
        assert job is not None
        return job

    def _queue(self, con: sqlite3.Connection, part: Any, found: Job | None) -> None:
        if found is None:
            con.execute(
                "INSERT INTO jobs (job_id, request, title, state, created) "
                "VALUES (?, ?, ?, 'queued', ?)",
                [part.run_id, request_json(part.request), part.describe(), time.time()],
            )
        else:  # ended before: queue it again
            con.execute(
                "UPDATE jobs SET state = 'queued', worker = '', step = 0, total = 0, "
                "text = '', error = '', heartbeat = NULL, started = NULL, finished = NULL, "
                "created = ? WHERE job_id = ?",
                [time.time(), part.run_id],
            )

    def mark_done(self, job_id: str) -> None:
        """Record a queued job as done without running it (its result is already stored)."""
        with self._tx(immediate=True) as con:
            con.execute(
                "UPDATE jobs SET state = 'done', finished = ?, text = ? "
                "WHERE job_id = ? AND state = 'queued'",
                [time.time(), IN_STORE, job_id],
            )

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (a running one stops at its next progress step)."""
        with self._tx(immediate=True) as con:
            job = self._fetch(con, job_id)
            if job is None:
                raise WorkbenchError(f"no job {job_id}", "list the jobs with `workbench jobs`")
            if not job.done:
                con.execute(
                    "UPDATE jobs SET state = 'cancelled', finished = ? WHERE job_id = ?",
                    [time.time(), job_id],
                )
            job = self._fetch(con, job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._tx() as con:
            return self._fetch(con, job_id)

    def jobs(self, ids: Sequence[str] | None = None, states: Sequence[str] = ()) -> list[Job]:
        """Jobs (all, or those of ``ids``), oldest first, optionally only in ``states``."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args += list(states)
        with self._tx() as con:
            rows = con.execute(
                sql + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY created",
                args,
            ).fetchall()
        jobs = [self._job(r) for r in rows]
        if ids is not None:
            wanted = set(ids)
            jobs = [j for j in jobs if j.job_id in wanted]
        return jobs

    def table(self) -> Any:
        """The jobs as a pandas table (newest first), times as UTC timestamps."""
        import pandas as pd

        df = pd.DataFrame([j.__dict__ for j in self.jobs()], columns=list(_COLUMNS))
        for col in ("heartbeat", "created", "started", "finished"):
            df[col] = pd.to_datetime(df[col], unit="s", utc=True)
        return df.drop(columns=["request"]).iloc[::-1].reset_index(drop=True)

    # ---- the worker's side ----------------------------------------------------------------

    def claim(self, worker: str) -> Job | None:
        """The oldest queued job, now running on ``worker``; None when nothing is queued."""
        now = time.time()
        with self._tx(immediate=True) as con:
            rows = con.execute(
                "SELECT job_id FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1"
            ).fetchall()
            if not rows:
                return None
            con.execute(
                "UPDATE jobs SET state = 'running', worker = ?, heartbeat = ?, started = ?, "
                "attempts = attempts + 1 WHERE job_id = ?",
                [worker, now, now, rows[0][0]],
            )
            return self._fetch(con, rows[0][0])

    def heartbeat(
        self, job_id: str, worker: str, progress: tuple[int, int, str] | None = None
    ) -> str:
        """Mark ``worker`` alive on ``job_id`` (and record ``(step, total, text)``); returns the
        job's state, so a worker sees a cancellation. A job no longer held by ``worker``
        (re-queued after its heartbeat lapsed) reads as ``"lost"``."""
        now = time.time()
        with self._tx(immediate=True) as con:
            if progress is None:
                cur = con.execute(
                    "UPDATE jobs SET heartbeat = ? WHERE job_id = ? AND worker = ? "
                    "AND state = 'running'",
                    [now, job_id, worker],
                )
            else:
                step, total, text = progress
                cur = con.execute(
                    "UPDATE jobs SET heartbeat = ?, step = ?, total = ?, text = ? "
                    "WHERE job_id = ? AND worker = ? AND state = 'running'",
                    [now, int(step), int(total), str(text)[:200], job_id, worker],
                )
            if cur.rowcount:
                return "running"
            job = self._fetch(con, job_id)
        return job.state if job is not None and job.worker == worker else "lost"

    def finish(
        self,
        job_id: str,
        worker: str,
        state: str,
        error: str = "",
        progress: tuple[int, int, str] | None = None,
    ) -> bool:
        """Record the end of ``worker``'s job (``done`` or ``failed``, with its last progress);
        False when the job is no longer the worker's (cancelled, or re-queued elsewhere)."""
        if state not in ("done", "failed"):
            raise ValueError(f"finish a job as done or failed, not {state!r}")
        step, total, text = progress or (0, 0, "")
        with self._tx(immediate=True) as con:
            cur = con.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ?, step = ?, total = ?, "
                "text = ? WHERE job_id = ? AND worker = ? AND state = 'running'",
                [state, error.splitlines()[0][:500] if error else "", time.time(), step, total,
                 text, job_id, worker],
            )  # fmt: skip
            return bool(cur.rowcount)

    def requeue_stale(self, lapse_s: float) -> list[str]:
        """Put back in the queue every running job whose heartbeat is older than ``lapse_s``
        (its worker died or hangs), or whose worker was a process of this machine that no
        longer exists; returns their ids."""
        cutoff = time.time() - lapse_s
        with self._tx(immediate=True) as con:
            running = con.execute(
                "SELECT job_id, worker, heartbeat FROM jobs WHERE state = 'running'"
            ).fetchall()
            rows = [(j,) for j, w, beat in running if (beat or 0) < cutoff or _dead_here(w)]
            for (job_id,) in rows:
                con.execute(
                    "UPDATE jobs SET state = 'queued', worker = '', text = 'worker lost; queued "
                    "again' WHERE job_id = ? AND state = 'running'",
                    [job_id],
                )
        return [r[0] for r in rows]

"""The job table: idempotent submission, exclusive claims, heartbeats, lapses, cancellation."""

from __future__ import annotations

import threading
import time

import pytest

from workbench.errors import WorkbenchError
from workbench.jobs.queue import JobQueue, request_from_json
from workbench.runner import RunRequest


def _part(n: int = 4):
    return RunRequest(
        "head_detectors", "tiny-llama", "induction", {}, {"seq_len": 8, "n_prompts": n}
    ).resolve("fp")


def test_submission_is_idempotent_by_run_id(tmp_path):
    q = JobQueue(tmp_path)
    part = _part()
    a, b = q.submit(part), q.submit(part)
    assert a.job_id == b.job_id == part.run_id and a.state == b.state == "queued"
    assert len(q.jobs()) == 1
    assert request_from_json(a.request) == part.request  # what a worker resolves
    claimed = q.claim("w1")
    assert claimed is not None and claimed.state == "running"
    assert q.submit(part).state == "running"  # a running job is not queued twice
    assert q.finish(part.run_id, "w1", "done", progress=(3, 3, "x"))
    assert q.submit(part).state == "done"
    assert q.submit(part, again=True).state == "queued"  # its result is gone: again


def test_a_done_job_is_queued_again_once_by_callers_that_saw_it_done(tmp_path):
    q = JobQueue(tmp_path)
    part = _part()
    q.submit(part)
    q.claim("w1")
    assert q.finish(part.run_id, "w1", "done")
    seen = q.get(part.run_id)
    assert seen is not None and q.submit(part).state == "done"  # a plain submit keeps it
    queued = q.rerun(part, seen)  # its result is gone: run it again
    assert queued.state == "queued"
    assert q.rerun(part, seen) == queued  # a second caller that saw it done: the same job
    q.claim("w2")
    assert q.rerun(part, seen).state == "running"  # not queued twice while it runs
    assert q.finish(part.run_id, "w2", "done")
    assert q.rerun(part, seen).state == "done"  # done again since `seen`: a stale decision
    latest = q.get(part.run_id)
    assert latest is not None and latest.attempts == 2 and len(q.jobs()) == 1
    assert q.rerun(part, latest).state == "queued"


def test_only_one_worker_claims_a_job(tmp_path):
    q = JobQueue(tmp_path)
    for n in range(1, 6):
        q.submit(_part(n))
    got: list[str] = []
    lock = threading.Lock()

    def claim_all(name: str) -> None:
        while (job := JobQueue(tmp_path).claim(name)) is not None:
            with lock:
                got.append(job.job_id)

    threads = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(j.job_id for j in q.jobs()) and len(set(got)) == 5


def test_only_the_holder_reports_and_a_lapsed_job_is_queued_again(tmp_path):
    q = JobQueue(tmp_path)
    part = _part()
    q.submit(part)
    q.claim("w1")
    assert q.heartbeat(part.run_id, "w1", (1, 4, "step")) == "running"
    assert q.get(part.run_id).step == 1
    assert q.heartbeat(part.run_id, "intruder") == "lost"
    assert not q.finish(part.run_id, "intruder", "done")
    time.sleep(0.05)
    assert q.requeue_stale(lapse_s=0.01) == [part.run_id]
    assert q.get(part.run_id).state == "queued"
    assert q.heartbeat(part.run_id, "w1") == "lost"  # w1 woke up late: the job is not its own
    again = q.claim("w2")
    assert again is not None and again.attempts == 2
    assert not q.finish(part.run_id, "w1", "done") and q.finish(part.run_id, "w2", "done")


def test_cancel_and_errors(tmp_path):
    q = JobQueue(tmp_path)
    part = _part()
    q.submit(part)
    q.claim("w1")
    assert q.cancel(part.run_id).state == "cancelled"
    assert q.heartbeat(part.run_id, "w1") == "cancelled"  # the worker stops at its next step
    assert not q.finish(part.run_id, "w1", "done")
    assert q.submit(part).state == "queued"  # a cancelled part can be submitted again
    with pytest.raises(WorkbenchError, match="no job"):
        q.cancel("ffff")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "jobs.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(WorkbenchError, match="unreadable"):
        JobQueue(tmp_path / "bad").jobs()

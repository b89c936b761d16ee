"""Several drivers on one store share one job per run id: a part queued or running for one
driver is waited for by the others and served from the store, so it is computed once; a done
job whose result is gone is queued again, once."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from tests.tables import assert_same_rows
from workbench.jobs import pool as pool_module
from workbench.jobs.pool import run_on_workers
from workbench.jobs.queue import IN_STORE, JobQueue
from workbench.runner import ModelPool, RunRequest, run_part
from workbench.spec import load_spec, run_spec
from workbench.store import ResultStore

# four parts of a few seconds each on one worker, so that two drivers overlap on them
SPEC = 'title = "d"\n[defaults]\nmodels = ["tiny-llama"]\n' + "".join(
    f'[[analysis]]\nname = "head_detectors"\nparams = {{ batch_size = 1 }}\n'
    f'tasks = [{{ name = "induction", seq_len = 48, n_prompts = {n} }}]\n'
    for n in (200, 201, 202, 203)
)
# one driver process: the CLI's path (run_spec with --workers 1), outcomes pickled to a file
DRIVER = textwrap.dedent(
    """
    import pickle, sys
    from workbench.spec import load_spec, run_spec
    outcomes = run_spec(load_spec(sys.argv[1]), workers=1, read=True, progress=False)
    with open(sys.argv[2], "wb") as f:
        pickle.dump([(o.run_id, o.status, dict(o.result.tables)) for o in outcomes], f)
    """
)
TINY = RunRequest("head_detectors", "tiny-llama", "induction", {}, {"seq_len": 8, "n_prompts": 4})


def test_two_drivers_at_once_compute_every_part_once_and_both_get_every_result(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    home = tmp_path / "home"
    env = {**os.environ, "WORKBENCH_HOME": str(home)}
    outs = [tmp_path / f"driver{i}.pkl" for i in (1, 2)]
    drivers = [
        subprocess.Popen([sys.executable, "-c", DRIVER, str(spec), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for out in outs
    ]  # fmt: skip
    for d in drivers:
        _, err = d.communicate(timeout=600)
        assert d.returncode == 0, err
    got = [pickle.loads(out.read_bytes()) for out in outs]
    store = ResultStore(home / "store")
    jobs = JobQueue(store.root).jobs()
    run_ids = [p.run_id for p in load_spec(spec).parts]
    # computed once: one job per part, claimed once (a worker computes only a job it claimed;
    # a driver never computes), by a worker that computed it (not served it from the store)
    assert sorted(j.job_id for j in jobs) == sorted(run_ids)
    assert all(j.state == "done" and j.attempts == 1 and j.text != IN_STORE for j in jobs), jobs
    assert sorted(store.list_runs()["run_id"]) == sorted(run_ids)
    assert not [p for p in store.results_dir.iterdir() if p.name not in set(run_ids)]
    # each part is "computed" by the driver whose worker computed it, "stored" for the other
    statuses: dict[str, list[str]] = {run_id: [] for run_id in run_ids}
    for outcomes in got:
        assert [run_id for run_id, _, _ in outcomes] == run_ids  # every result, in spec order
        for run_id, status, _ in outcomes:
            statuses[run_id].append(status)
    assert all(sorted(s) == ["computed", "stored"] for s in statuses.values()), statuses
    # both drivers got every result, row for row equal to each other and to the store
    for (run_id, _, first), (_, _, second) in zip(got[0], got[1], strict=True):
        stored = store.load(run_id).tables
        assert sorted(first) == sorted(second) == sorted(stored)
        for name, table in stored.items():
            assert_same_rows(first[name], table)
            assert_same_rows(second[name], table)


@pytest.mark.timeout(180)  # the failure this guards against is a driver waiting forever
def test_a_driver_waits_for_a_job_running_elsewhere_and_serves_it(tmp_path, monkeypatch):
    """A job another driver's worker holds: no worker is started for it, nothing is queued
    again, and the result that worker stores is served ("stored")."""
    store = ResultStore(tmp_path / "store")
    queue = JobQueue(store.root)
    part = TINY.resolve()
    queue.submit(part)
    claimed = queue.claim("elsewhere:1")  # another host's worker: alive as far as we know
    assert claimed is not None
    started: list[object] = []
    monkeypatch.setattr(pool_module, "start_worker", lambda *a, **k: started.append(a))
    got: list[Any] = []
    driver = threading.Thread(
        target=lambda: got.extend(run_on_workers([part], store, 2, progress=False, read=True,
                                                 poll_s=0.02)),
    )  # fmt: skip
    driver.start()
    time.sleep(0.5)  # the driver polls the running job meanwhile
    assert driver.is_alive() and not started
    held = queue.get(part.run_id)
    assert held is not None and held.state == "running" and held.attempts == 1
    outcome = run_part(part, store, ModelPool(), read=False)  # "elsewhere" computes it
    assert outcome.status == "computed"
    assert queue.finish(part.run_id, "elsewhere:1", "done")
    driver.join(timeout=60)
    assert not driver.is_alive() and not started
    (served,) = got
    assert served.status == "stored" and served.result is not None
    assert_same_rows(served.result.heads, store.load(part.run_id).heads)
    job = queue.get(part.run_id)
    assert job is not None and job.state == "done" and job.attempts == 1


@pytest.mark.timeout(180)
def test_a_job_done_after_the_store_was_checked_is_served_not_queued_again(tmp_path, monkeypatch):
    """The race between a driver's store check and its submission: the job finished (and its
    result was stored) in between; the driver serves it and queues nothing."""
    import workbench.runner as runner

    store = ResultStore(tmp_path / "store")
    queue = JobQueue(store.root)
    part = TINY.resolve()
    queue.submit(part)
    assert queue.claim("elsewhere:1") is not None
    run_part(part, store, ModelPool(), read=False)
    assert queue.finish(part.run_id, "elsewhere:1", "done")
    # as if the driver had looked in the store just before the result arrived
    monkeypatch.setattr(runner, "serve_stored", lambda parts, *a, **k: list(parts))
    started: list[object] = []
    monkeypatch.setattr(pool_module, "start_worker", lambda *a, **k: started.append(a))
    (outcome,) = run_on_workers([part], store, 1, progress=False, poll_s=0.02)
    assert outcome.status == "stored" and not started
    job = queue.get(part.run_id)
    assert job is not None and job.state == "done" and job.attempts == 1


def test_a_done_job_whose_result_is_gone_runs_again_once(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'title = "g"\n[defaults]\nmodels = ["tiny-llama"]\n[[analysis]]\n'
        'name = "head_detectors"\ntasks = [{ name = "induction", seq_len = 8, n_prompts = 4 },'
        ' { name = "induction", seq_len = 9, n_prompts = 4 }]\n'
    )
    parts = load_spec(spec).parts
    store = ResultStore(home / "store")
    first = run_spec(load_spec(spec), store=store, workers=1, progress=False)
    assert [o.status for o in first] == ["computed", "computed"]
    store.delete(parts[0].run_id)  # its job stays done
    again = run_spec(load_spec(spec), store=store, workers=1, progress=False, read=True)
    assert [o.status for o in again] == ["computed", "stored"]
    jobs = {j.job_id: j for j in JobQueue(store.root).jobs()}
    assert jobs[parts[0].run_id].attempts == 2 and jobs[parts[1].run_id].attempts == 1
    assert {j.state for j in jobs.values()} == {"done"}
    assert store.has(parts[0].run_id)

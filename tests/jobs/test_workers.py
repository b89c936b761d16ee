"""Local workers for real: results equal the in-process run's row for row; a worker or a driver
killed with ``kill -9`` mid-job leaves every part computed exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.tables import assert_same_rows
from workbench.cli import main
from workbench.jobs.queue import IN_STORE, JobQueue
from workbench.runner import RunRequest
from workbench.store import ResultStore

SPEC = """
title = "w"
[defaults]
models = ["tiny-llama"]
[[analysis]]
name = "head_detectors"
tasks = [
    { name = "induction", seq_len = 8, n_prompts = 4 },
    { name = "induction", seq_len = 9, n_prompts = 4 },
]
[[analysis]]
name = "activation_patching"
tasks = [{ name = "ioi", n_prompts = 4 }]
[[analysis]]
name = "direct_logit_attribution"
tasks = [{ name = "ioi", n_prompts = 4 }]
"""
SLOW = RunRequest(
    "head_detectors", "tiny-llama", "induction", {"batch_size": 1},
    {"seq_len": 48, "n_prompts": 3000},
)  # fmt: skip
# a job of 800 steps (about 5 s unloaded on 2 cores): a worker reports its progress every second,
# so the first progress seen comes within about a second of the job starting to compute, and a
# kill then lands mid-job with seconds to spare; on a loaded machine the job slows as well
MID = RunRequest(
    "head_detectors", "tiny-llama", "induction", {"batch_size": 1},
    {"seq_len": 48, "n_prompts": 800},
)  # fmt: skip


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "WORKBENCH_HOME": str(home)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", *args]


def _wait(cond, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _tables(store: ResultStore) -> dict[str, object]:
    return {r: store.load(r).heads for r in store.list_runs()["run_id"]}


def test_workers_equal_the_in_process_run_row_for_row(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "serial"))
    assert main(["run", str(spec), "--no-progress"]) == 0
    serial = _tables(ResultStore())
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "workers"))
    assert main(["run", str(spec), "--no-progress", "--workers", "2"]) == 0
    assert "4 part(s): 4 computed, 0 from the store" in capsys.readouterr().out
    store = ResultStore()
    parallel = _tables(store)
    assert sorted(parallel) == sorted(serial)
    for run_id, heads in serial.items():
        assert_same_rows(parallel[run_id], heads)
    jobs = JobQueue(store.root).jobs()
    assert {j.state for j in jobs} == {"done"} and len({j.worker for j in jobs}) == 2
    assert main(["jobs"]) == 0 and "done" in capsys.readouterr().out
    assert main(["run", str(spec), "--no-progress", "--workers", "2"]) == 0
    assert "0 computed, 4 from the store" in capsys.readouterr().out


def test_a_worker_killed_mid_job_is_replaced_and_the_job_completed_once(tmp_path):
    home = tmp_path / "home"
    store = ResultStore(home / "store")
    queue = JobQueue(store.root)
    part = MID.resolve()
    queue.submit(part)
    first = subprocess.Popen(_cli("worker", "--lapse", "60"), env=_env(home))
    try:  # killed as soon as its job reports progress
        _wait(lambda: (j := queue.get(part.run_id)) is not None and j.step > 0, what="a step")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    job = queue.get(part.run_id)
    assert job is not None and job.state == "running" and 0 < job.step < job.total, job
    assert not store.has(part.run_id) and job.attempts == 1  # killed mid-job: nothing stored
    # the worker is gone from this machine: the next worker re-queues its job at once
    second = subprocess.run(_cli("worker", "--exit-when-idle"), env=_env(home), timeout=300,
                            capture_output=True, text=True)  # fmt: skip
    assert second.returncode == 0, second.stderr
    job = queue.get(part.run_id)
    assert job is not None and job.state == "done" and job.attempts == 2
    assert job.step == job.total == 800 and job.text != IN_STORE  # computed by the second
    runs = store.list_runs()
    assert list(runs["run_id"]) == [part.run_id]
    assert not [p for p in store.results_dir.iterdir() if p.name != part.run_id]
    from workbench.runner import run_analysis

    again = run_analysis(MID.analysis, MID.model, MID.task, params=MID.params,
                         task_params=MID.task_params,
                         store=ResultStore(tmp_path / "serial"))  # fmt: skip
    assert again.run_id == part.run_id
    assert_same_rows(store.load(part.run_id).heads["value"], again.heads["value"])


@pytest.mark.parametrize("kill", ["driver", "driver and workers"])
def test_a_killed_driver_then_rerun_computes_every_part_once(tmp_path, kill):
    home = tmp_path / "home"
    spec = tmp_path / "spec.toml"
    parts = "\n".join(
        f'[[analysis]]\nname = "head_detectors"\nparams = {{ batch_size = 1 }}\n'
        f'tasks = [{{ name = "induction", seq_len = 48, n_prompts = {n} }}]\n'
        for n in (400, 401, 402, 403)
    )
    spec.write_text('title = "k"\n[defaults]\nmodels = ["tiny-llama"]\n' + parts)
    store = ResultStore(home / "store")
    queue = JobQueue(store.root)
    driver = subprocess.Popen(_cli("run", str(spec), "--workers", "2", "--no-progress"),
                              env=_env(home), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _wait(lambda: any(j.step > 0 for j in queue.jobs()), what="a running job")
    if kill == "driver":
        driver.send_signal(signal.SIGKILL)
    else:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    out = subprocess.run(_cli("run", str(spec), "--workers", "2", "--no-progress"),
                         env=_env(home), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "4 part(s):" in out.stdout
    runs = store.list_runs()
    assert len(runs) == 4 and runs["run_id"].is_unique
    jobs = queue.jobs()
    assert len(jobs) == 4 and {j.state for j in jobs} == {"done"}
    if kill == "driver":  # its workers finished their jobs before stopping: none ran twice
        assert all(j.attempts == 1 for j in jobs)
    assert not [p for p in store.results_dir.iterdir() if p.name not in set(runs["run_id"])]


def test_bad_worker_options_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    assert main(["run", str(spec), "--workers", "-1"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["jobs", "--state", "sleeping"]) == 2
    assert main(["cancel", "abc"]) == 2
    assert "matches 0 jobs" in capsys.readouterr().err


def test_cancelling_a_running_job_stops_its_worker_and_stores_nothing(
    tmp_path, capsys, monkeypatch
):
    home = tmp_path / "home"
    store = ResultStore(home / "store")
    queue = JobQueue(store.root)
    part = SLOW.resolve()
    queue.submit(part)
    worker = subprocess.Popen(_cli("worker", "--exit-when-idle"), env=_env(home))
    try:
        _wait(lambda: (j := queue.get(part.run_id)) is not None and j.step > 0, what="a step")
        monkeypatch.setenv("WORKBENCH_HOME", str(home))
        assert main(["cancel", part.run_id[:8]]) == 0
        assert "cancelled" in capsys.readouterr().out
        assert worker.wait(timeout=120) == 0  # it stopped at the next step, then idled out
    finally:
        if worker.poll() is None:
            worker.kill()
    job = queue.get(part.run_id)
    assert job is not None and job.state == "cancelled" and job.step < job.total
    assert not store.has(part.run_id) and store.list_runs().empty

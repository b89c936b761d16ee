"""The one orchestrator: a request is resolved once, a computed result is not read back, a stored
one is verified once, and every caller (API, spec, CLI) goes through ``run_part``."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest

from tests.test_cli import SPEC
from workbench import params as P
from workbench import runner
from workbench.cli import main
from workbench.store import store as store_module

TASK = {"seq_len": 8, "n_prompts": 4}


@pytest.fixture()
def counted(monkeypatch):
    """Counts of the calls that would show a request resolved or a result read twice."""
    calls: Counter[str] = Counter()

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            calls[label] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)

    wrap(runner.RunRequest, "resolve", "resolve")
    wrap(P, "from_mapping", "from_mapping")
    wrap(store_module, "read_verified", "read_verified")  # every verification of a stored run
    wrap(store_module.ResultStore, "get", "get")
    wrap(runner, "compute", "compute")
    return calls


def test_a_part_is_resolved_once_and_its_fresh_result_not_read_back(load, store, counted):
    model = load("tiny-llama")
    first = runner.run_analysis("head_detectors", model, task_params=TASK, store=store)
    assert not first.from_store
    # one resolution; one parse of the analysis params and one of the task params
    assert counted["resolve"] == 1 and counted["from_mapping"] == 2
    assert counted["compute"] == 1
    assert counted["get"] == 1  # the store lookup before computing (a miss); nothing after put
    assert counted["read_verified"] == 0  # nothing stored was verified or read back

    counted.clear()
    again = runner.run_analysis("head_detectors", model, task_params=TASK, store=store)
    assert again.from_store and again.run_id == first.run_id
    assert counted["resolve"] == 1 and counted["compute"] == 0
    assert counted["read_verified"] == 1  # the stored part verified (and read) once
    assert again.heads.equals(first.heads)


def test_a_spec_part_through_the_cli_is_resolved_once_and_verified_once(
    tmp_path: Path, monkeypatch, counted, capsys
):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    assert main(["run", str(spec), "--print", "--no-progress"]) == 0
    assert "computed" in capsys.readouterr().out
    assert counted["resolve"] == 1 and counted["from_mapping"] == 2
    assert counted["compute"] == 1 and counted["read_verified"] == 0  # --print used the result

    counted.clear()
    assert main(["run", str(spec), "--print", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stored" in out and "top 10 heads by induction" in out
    assert counted["resolve"] == 1 and counted["compute"] == 0
    assert counted["read_verified"] == 1  # verified and read once, printed from that read

    counted.clear()
    assert main(["run", str(spec), "--no-progress"]) == 0  # without --print: verified only
    assert counted["read_verified"] == 1 and counted["get"] == 0


def test_every_caller_runs_parts_through_run_part():
    """The spec runner, the Python API and the app's Run page hold no orchestration of their
    own: each calls ``run_part`` (the app page is checked as source text: it is a script)."""
    import inspect

    from workbench import spec

    assert "run_parts(" in inspect.getsource(spec.run_spec)
    assert "run_part(" in inspect.getsource(runner.run_analysis)
    app = Path(__file__).resolve().parents[1] / "app"
    page = (app / "pages" / "4_Run.py").read_text()
    views = (app / "views.py").read_text()  # the Run and Interventions pages share run_request
    assert "views.run_request(" in page and "get_or_compute" not in page
    assert "run_part(" in views and "get_or_compute" not in views


def test_prompts_an_analysis_builds_itself_enter_its_key(monkeypatch):
    """pasta_profile builds knowledge-conflict prompts beside its needle task: their recipe is in
    the run key, so a change of those prompts (here their split seed) is a new run, and a run
    that uses no conflicts has the plain task key."""
    from workbench.runner import RunRequest
    from workbench.tasks import recipe_hash

    a = RunRequest("pasta_profile", "tiny-llama", "needle").resolve()
    b = RunRequest("pasta_profile", "tiny-llama", "needle", params={"conflict_seed": 1}).resolve()
    plain = RunRequest("pasta_profile", "tiny-llama", "needle",
                       params={"target": "needle", "evaluate": "needle"}).resolve()  # fmt: skip
    assert a.key.data_hash != b.key.data_hash
    assert plain.key.data_hash == recipe_hash("needle", plain.task_params)
    assert a.key.data_hash != plain.key.data_hash

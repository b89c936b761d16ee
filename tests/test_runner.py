"""The one orchestrator: a request is resolved once, a computed result is not read back, a stored
one is verified once, and every path (API, spec, CLI, workers, the app; Ray in tests/jobs)
serves through ``stored_outcome`` and finishes a part through ``finish_part``."""

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


def count_finishes(monkeypatch) -> dict[str, list]:
    """Record every call of the runner's one serve decision (``stored_outcome``: run id and the
    status it gave, None for "compute") and of its one finish (``finish_part``: run id and
    outcome status), and every after-store hook of head_detectors (its registry entry given a
    recording hook, which checks it receives the agreement declarations)."""
    from dataclasses import replace

    from workbench.registry import REGISTRY

    calls: dict[str, list] = {"serve": [], "finish": [], "hook": []}
    serve, finish = runner.stored_outcome, runner.finish_part

    def serving(part, *args, **kwargs):
        out = serve(part, *args, **kwargs)
        calls["serve"].append((part.run_id, None if out is None else out.status))
        return out

    def finishing(part, *args, **kwargs):
        out = finish(part, *args, **kwargs)
        calls["finish"].append((part.run_id, out.status))
        return out

    def hook(store, result, declared):
        assert declared("head_detectors") is None
        assert declared("attribution_patching").partner == "activation_patching"
        calls["hook"].append(result.run_id)

    monkeypatch.setattr(runner, "stored_outcome", serving)
    monkeypatch.setattr(runner, "finish_part", finishing)
    entry = replace(REGISTRY["head_detectors"], after_store=hook)
    monkeypatch.setitem(REGISTRY, "head_detectors", entry)
    return calls


REQUEST = runner.RunRequest("head_detectors", "tiny-llama", "induction", task_params=TASK)


def _api(store, tmp_path, monkeypatch) -> str:
    return runner.run_analysis(
        REQUEST.analysis, REQUEST.model, REQUEST.task, task_params=TASK, store=store
    ).run_id


def _spec(store, tmp_path, monkeypatch) -> str:
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    assert main(["run", str(spec), "--no-progress"]) == 0
    return str(store.list_runs()["run_id"].iloc[0])


def _worker(store, tmp_path, monkeypatch) -> str:
    """A worker's loop in this process (so the counters see it), on the job the driver queued;
    a stored part is then answered by the worker pool's driver without starting a worker."""
    from workbench.jobs.pool import run_on_workers
    from workbench.jobs.queue import JobQueue
    from workbench.jobs.worker import work

    part = REQUEST.resolve()
    if store.has(part.run_id):
        assert run_on_workers([part], store, 1, progress=False)[0].status == "stored"
        return part.run_id
    JobQueue(store.root).submit(part)
    assert work(store.root, exit_when_idle=True, poll_s=0.05, heartbeat_s=0.1) == 1
    assert JobQueue(store.root).get(part.run_id).state == "done"
    return part.run_id


def _app(store, tmp_path, monkeypatch) -> str:
    """The Run page computing in the page (no app workers), under AppTest in this process."""
    pytest.importorskip("streamlit")
    from tests.app.conftest import APP, open_page

    monkeypatch.setenv("WORKBENCH_APP_MODEL", REQUEST.model)
    monkeypatch.delenv("WORKBENCH_APP_WORKERS", raising=False)
    monkeypatch.syspath_prepend(str(APP))
    at = open_page("4_Run")
    at.number_input(key="task.induction.seq_len").set_value(TASK["seq_len"]).run()
    at.number_input(key="task.induction.n_prompts").set_value(TASK["n_prompts"]).run()
    at.button(key="run.go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return str(at.session_state["last_run"])


@pytest.mark.parametrize("path", [_api, _spec, _worker, _app], ids=lambda f: f.__name__[1:])
def test_every_path_finishes_a_part_through_finish_part(path, tmp_path, monkeypatch):
    """In this process (the API, a spec), on a worker and from the app's Run page: a computed
    part goes through ``runner.finish_part`` exactly once (stored, its after-store hook run
    once with the declarations), after ``runner.stored_outcome`` said compute; run again, the
    stored part is served by that same decision and nothing is computed or hooked again."""
    import sys

    from workbench.store import ResultStore

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    store = ResultStore(tmp_path / "home" / "store")
    calls = count_finishes(monkeypatch)
    try:
        run_id = path(store, tmp_path, monkeypatch)
        assert calls["finish"] == [(run_id, "computed")]
        assert calls["hook"] == [run_id]
        assert calls["serve"] == [(run_id, None)]  # asked once, before computing
        assert store.has(run_id)

        for kind in calls.values():
            kind.clear()
        assert path(store, tmp_path, monkeypatch) == run_id
        assert calls["serve"] == [(run_id, "stored")] and calls["hook"] == []
        # run_part asks the decision inside finish_part; the pool's driver and the app's page
        # ask it before anything would compute, and then finish nothing
        inside = path in (_api, _spec)
        assert calls["finish"] == ([(run_id, "stored")] if inside else [])

        if path is _app:  # a stored result the serve decision refuses is computed anew
            for kind in calls.values():
                kind.clear()
            monkeypatch.setattr(runner.Part, "servable", lambda self: False)
            assert path(store, tmp_path, monkeypatch) == run_id
            assert calls["serve"] == [(run_id, None)]
            assert calls["finish"] == [(run_id, "stored")]  # the identical stored one is kept
    finally:
        for name in ("caches", "widgets", "views"):
            sys.modules.pop(name, None)


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

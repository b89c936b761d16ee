"""The app on jobs (AppTest, real worker processes): a run submitted from the Run page is a job
in the store's job table, computed by the app's worker; the page shows its progress and then
its result, also after a reload; the Jobs page lists it; an empty store gets the starter spec."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from tests.app.conftest import APP, MODEL


@pytest.fixture()
def app_home(home, monkeypatch):
    monkeypatch.setenv("WORKBENCH_APP_WORKERS", "1")
    yield home
    import caches

    for proc in caches._pool(caches.store_root(), 1):  # stop the worker this test started
        proc.terminate()
        proc.wait(timeout=30)
    caches._pool.clear()
    caches._job_queue.clear()
    caches._starter_parts.clear()


def _page(name: str | None = None, **query: str) -> AppTest:
    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=120)
    if name is not None:
        at.switch_page(f"pages/{name}.py")
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _wait(cond, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_run_is_a_job_that_survives_a_reload(app_home):
    from workbench.jobs.queue import JobQueue
    from workbench.store import ResultStore

    at = _page("4_Run")
    at.selectbox(key="run.analysis").select("head_detectors").run()
    at.number_input(key="task.induction.n_prompts").set_value(5).run()
    at.button(key="run.go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    run_id = (
        at.query_params["run"][0]
        if isinstance(at.query_params["run"], list)
        else at.query_params["run"]
    )
    queue, store = JobQueue(app_home / "store"), ResultStore(app_home / "store")
    job = queue.get(run_id)
    assert job is not None and job.state in ("queued", "running", "done")
    _wait(lambda: store.has(run_id))
    assert queue.get(run_id).state == "done" and queue.get(run_id).worker
    reloaded = _page("4_Run", run=run_id)  # a new session: only the URL knows the run
    assert not reloaded.exception
    assert any("is in the store" in s.value for s in reloaded.success)
    jobs = _page("7_Jobs")
    assert not jobs.exception and "1 done" in " ".join(c.value for c in jobs.caption)


def test_an_empty_store_gets_the_starter_runs(app_home):
    from workbench.jobs.queue import JobQueue
    from workbench.store import ResultStore

    home = _page()
    assert not home.exception
    queue = JobQueue(app_home / "store")
    starter = queue.jobs()
    assert len(starter) == 5 and {j.title.split(" / ")[1] for j in starter} == {MODEL}
    assert any("starter analyses" in i.value for i in home.info)
    store = ResultStore(app_home / "store")
    _wait(lambda: any(r == "head_detectors" for r in store.list_runs()["analysis"]))
    atlas = _page("1_Atlas")
    assert not atlas.exception and atlas.get("plotly_chart")
    assert not _page().exception and len(queue.jobs()) == 5  # not queued twice

"""The KV-plans page under Streamlit's AppTest: a stored plan evaluation of tiny-llama shows
its grid, budget, controls and curve; without one the page says what to run."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from tests.app.conftest import MODEL, open_page


def _page() -> AppTest:
    return open_page("8_KV_plans")


def test_without_an_evaluation_the_page_says_what_to_run(home):
    at = _page()
    assert not at.exception
    assert "kv_plan_eval" in at.info[0].value


def test_a_stored_evaluation_shows_grid_budget_controls_and_curve(home):
    from workbench.runner import run_analysis
    from workbench.store import ResultStore

    store = ResultStore(home / "store")
    s = run_analysis("kv_head_scores", MODEL, task_params={"length": 7, "repeats": 3,
                     "n_prompts": 2}, store=store)  # fmt: skip
    r = run_analysis(
        "kv_plan_eval", MODEL,
        params={"scores_run": s.run_id, "sink": 2, "window": 16, "n_random": 2,
                "max_new_tokens": 2, "curve": [1], "curve_random": 1},
        task_params={"context_lengths": [48], "depth_percents": [50], "n_needles": 1},
        store=store,
    )  # fmt: skip
    at = _page()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="kv.run").value == r.run_id
    shown = {m.label: m.value for m in at.metric}
    assert shown["kv_fraction"] == f"{r.info['kv_fraction']:.3f}"
    assert shown["full KV heads"] == f"{r.info['n_full']} of {r.info['n_streamable']}"
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(charts) == 3  # grid, controls, curve
    assert "full cache" in charts[0]
    at.selectbox(key="kv.metric").select("kl").run()
    assert not at.exception

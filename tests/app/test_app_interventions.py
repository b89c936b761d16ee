"""The Interventions page under Streamlit's AppTest: typed heads, an intervention and a task run
from the page and show the metric with and without it against random heads; heads picked from a
stored conflict_heads run; a bad head is a one-line error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "app"
MODEL = "tiny-llama"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", MODEL)
    monkeypatch.syspath_prepend(str(APP))
    yield tmp_path
    for name in ("caches", "widgets", "views"):
        sys.modules.pop(name, None)


def _page() -> AppTest:
    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=240)
    at.switch_page("pages/9_Interventions.py")
    return at.run()


def test_typed_heads_run_and_show_the_comparison(home):
    at = _page()
    assert not at.exception, [e.value for e in at.exception]
    at.text_input(key="iv.heads").set_value("L1H2, L0H3")
    at.selectbox(key="iv.task").select("ioi")
    at.selectbox(key="iv.kind").select("act").run()
    at.number_input(key="iv.n").set_value(3)
    at.button(key="iv.go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "act on 2 heads" in at.success[0].value
    shown = {m.label: m.value for m in at.metric}
    assert {"without", "with (chosen heads)", "random sets (mean)", "percentile · p"} <= set(shown)
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(charts) == 1 and "random sets" in charts[0]
    at.selectbox(key="iv.metric").select("logit_diff").run()
    assert not at.exception


def test_heads_from_a_stored_selection_and_a_bad_head(home):
    from workbench.runner import run_analysis
    from workbench.store import ResultStore

    store = ResultStore(home / "store")
    src = run_analysis("conflict_heads", MODEL, "knowledge_conflict",
                       params={"require_known": False, "n_random": 2, "k_grid": [1]},
                       store=store)  # fmt: skip
    at = _page()
    at.radio(key="iv.from").set_value("a stored selection").run()
    assert at.selectbox(key="iv.run").value == src.run_id
    assert any(c.value.startswith("heads: ") for c in at.caption)
    at.number_input(key="iv.n").set_value(2)
    at.button(key="iv.go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "zero on" in at.success[0].value

    at = _page()
    at.text_input(key="iv.heads").set_value("L7H0")
    at.button(key="iv.go").click().run()
    assert any("outside the model" in e.value for e in at.error)

"""The Interventions page under Streamlit's AppTest: typed heads, an intervention and a task run
from the page and show the metric with and without it against random heads; heads picked from a
stored conflict_heads run; a bad head is a one-line error."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from tests.app.conftest import MODEL, open_page


def _page() -> AppTest:
    return open_page("9_Interventions", timeout=240)


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

"""The web app's pages under Streamlit's AppTest (unit tier: tiny-llama, a store in a tmp dir)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "app"
MODEL = "tiny-llama"
TIMEOUT = 120


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A workbench home whose store holds tiny-llama results (detectors, patching, DLA)."""
    from workbench.runner import run_analysis
    from workbench.store import ResultStore

    root = tmp_path_factory.mktemp("apphome")
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_HOME", str(root))
    mp.setenv("WORKBENCH_APP_MODEL", MODEL)
    mp.syspath_prepend(str(APP))
    store = ResultStore(root / "store")
    ids = {
        "detectors": run_analysis(
            "head_detectors",
            MODEL,
            "induction",
            task_params={"seq_len": 8, "n_prompts": 2},
            store=store,
        ).run_id,
        "grid": run_analysis(
            "activation_patching",
            MODEL,
            "ioi",
            params={"component": "resid_pre"},
            task_params={"n_prompts": 2},
            store=store,
        ).run_id,
        "dla": run_analysis(
            "direct_logit_attribution", MODEL, "ioi", task_params={"n_prompts": 2}, store=store
        ).run_id,
    }
    yield root, store, ids
    mp.undo()
    for name in ("caches", "widgets", "views"):
        sys.modules.pop(name, None)


def page(name: str | None = None, **query: str) -> AppTest:
    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=TIMEOUT)
    if name is not None:
        at.switch_page(f"pages/{name}.py")
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def errors(at: AppTest) -> str:
    return " ".join(e.value for e in at.error)


def test_home_lists_the_stored_runs(home):
    at = page()
    ok(at)
    assert "3** stored run(s)" in at.markdown[0].value
    assert at.sidebar.selectbox[0].value == MODEL


def test_unknown_model_is_a_message_not_a_traceback(home):
    at = page()
    at.sidebar.selectbox[0].select("other…").run()
    at.sidebar.text_input[0].input("no-such-model").run()
    ok(at)
    assert "unknown model 'no-such-model'" in errors(at)


def test_atlas_shows_every_stored_score_and_opens_a_head(home):
    at = page("1_Atlas")
    ok(at)
    scores = at.selectbox(key="atlas.column").options
    assert any("induction" in s for s in scores)
    assert any("dla" in s for s in scores)
    assert at.get("plotly_chart")
    pick = at.selectbox(key="atlas.pick")
    pick.select("L1H2").run()
    at.button(key="atlas.open").click().run()
    ok(at)
    assert at.header[0].value.startswith("L1H2")


def test_atlas_with_an_empty_store_says_so(home, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    at = page("1_Atlas")
    ok(at)
    assert "No stored per-head scores" in at.info[0].value


def test_head_page_scores_dla_and_attention(home):
    _, _, ids = home
    at = page("2_Head", layer="1", head="2")
    ok(at)
    assert at.header[0].value.startswith("L1H2")
    scores = at.dataframe[0].value
    assert set(scores["run_id"]) == {ids["detectors"], ids["dla"]}
    assert set(scores["metric"]) == {"previous_token", "duplicate_token", "induction", "dla"}
    assert (at.dataframe[1].value["metric"] == "dla").all()
    assert len(at.get("plotly_chart")) == 1  # the attention map
    attended = at.dataframe[-1].value
    assert attended["share"].is_monotonic_decreasing
    assert 0 < attended["share"].sum() <= 1 + 1e-6


def test_head_page_rejects_a_head_the_model_lacks(home):
    at = page("2_Head", layer="7", head="0")
    ok(at)
    assert "L7H0 does not exist" in errors(at)


def test_attention_explorer_one_head_all_heads_and_long_prompts(home):
    at = page("3_Attention")
    ok(at)
    assert len(at.get("plotly_chart")) == 1
    at.radio(key="attn.view").set_value("all heads of the layer").run()
    ok(at)
    assert len(at.get("plotly_chart")) == 1
    at.number_input(key="attn.limit").set_value(8).run()  # the prompt is longer: top keys
    at.text_area[0].input("When Mary and John went to the store , John gave").run()
    ok(at)
    assert not at.get("plotly_chart")
    table = at.dataframe[0].value
    assert set(table["rank"]) == set(range(1, 6))
    assert (table["key"] <= table["query"]).all()


def test_attention_explorer_empty_prompt(home):
    at = page("3_Attention")
    at.text_area[0].input("   ").run()
    ok(at)
    assert "the prompt is empty" in errors(at)


def test_run_page_runs_patching_into_the_store(home):
    _, store, _ = home
    before = len(store.list_runs())
    at = page("4_Run")
    at.selectbox(key="run.analysis").select("activation_patching").run()
    at.number_input(key="task.ioi.n_prompts").set_value(3).run()
    at.selectbox(key="params.activation_patching.component").select("attn_out").run()
    at.button(key="run.go").click().run()
    ok(at)
    assert not at.error
    assert len(store.list_runs()) == before + 1
    assert "is in the store" in at.success[0].value
    assert at.get("plotly_chart")  # layer x head heatmap of attn_out? (per layer: grid table)
    # the same request again is answered from the store
    at.button(key="run.go").click().run()
    assert len(store.list_runs()) == before + 1


def test_run_page_custom_prompts_errors(home):
    at = page("4_Run")
    at.selectbox(key="run.analysis").select("activation_patching").run()
    at.selectbox(key="run.task.activation_patching").select("custom prompts (type them)").run()
    at.button(key="run.go").click().run()
    ok(at)
    assert "prompt is empty" in errors(at)
    at.text_area(key="run.clean").input("When Mary and John went to the store , John gave")
    at.text_area(key="run.corrupt").input("When Mary and John went , John gave")
    at.text_input(key="run.correct").input(" Mary")
    at.text_input(key="run.incorrect").input(" John")
    at.button(key="run.go").click().run()
    ok(at)
    assert "same token length" in errors(at)


def test_run_page_custom_prompts_run(home):
    _, store, _ = home
    at = page("4_Run")
    at.selectbox(key="run.analysis").select("direct_logit_attribution").run()
    at.selectbox(key="run.task.direct_logit_attribution").select("custom prompts (type them)").run()
    at.text_area(key="run.clean").input("When Mary and John went to the store , John gave")
    at.text_area(key="run.corrupt").input("When Mary and John went to the store , Mary gave")
    at.text_input(key="run.correct").input("Mary")
    at.text_input(key="run.incorrect").input("John")
    at.button(key="run.go").click().run()
    ok(at)
    assert not at.error, errors(at)
    rid = at.session_state["last_run"]
    assert store.get(rid).key["task"] == "custom"


def test_circuits_page_overlap_of_two_runs(home):
    from workbench.circuits import derive_circuit
    from workbench.circuits.overlap import overlap

    _, store, ids = home
    at = page("5_Circuits")
    ok(at)
    at.selectbox(key="A").select(ids["detectors"]).run()
    at.selectbox(key="A.metric").select("induction").run()
    at.number_input(key="A.k").set_value(3).run()
    at.selectbox(key="B").select(ids["dla"]).run()
    at.number_input(key="B.k").set_value(3).run()
    ok(at)
    shown = at.dataframe[0].value["value"]
    want = overlap(
        derive_circuit(store, ids["detectors"], metric="induction", k=3),
        derive_circuit(store, ids["dla"], k=3),
        n_permutations=0,
    )
    assert shown["intersection"] == str(want.intersection)
    assert shown["jaccard"] == str(want.jaccard)
    assert len(at.get("plotly_chart")) == 1


def test_runs_page_filters_and_downloads(home):
    _, store, ids = home
    at = page("6_Runs")
    ok(at)
    at.selectbox(key="runs.analysis").select("activation_patching").run()
    assert set(at.dataframe[0].value["analysis"]) == {"activation_patching"}
    at.selectbox(key="runs.pick").select(ids["grid"]).run()
    at.selectbox(key="runs.table").select("grid").run()
    ok(at)
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels[:3] == ["Download CSV", "Download PARQUET", "Download JSON"]
    from workbench.export import to_bytes

    grid = store.get(ids["grid"]).tables["grid"]
    back = pd.read_csv(io.BytesIO(to_bytes(grid, "csv")))
    assert len(back) == len(grid) and list(back.columns) == list(grid.columns)


def test_a_stored_result_never_loads_the_model(home, monkeypatch):
    import streamlit as st

    import workbench.models.loading as loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_model)
    st.cache_resource.clear()
    at = page("4_Run")  # head_detectors on induction, as stored by the fixture
    at.number_input(key="task.induction.seq_len").set_value(8).run()
    at.number_input(key="task.induction.n_prompts").set_value(2).run()
    at.button(key="run.go").click().run()
    ok(at)
    _, _, ids = home
    assert at.session_state["last_run"] == ids["detectors"]
    assert at.get("plotly_chart")
    for name in ("1_Atlas", "6_Runs", "5_Circuits"):
        ok(page(name))

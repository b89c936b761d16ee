"""The Edge-circuits page under Streamlit's AppTest, and its figures on a result: without a stored
edge_circuits run the page says what to run; with a tiny-llama run it shows the run's metrics,
the circuit graph, the faithfulness panel and the exact-check scatter, for either method."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from streamlit.testing.v1 import AppTest

from tests.app.conftest import MODEL, open_page
from workbench.analyses.edge_circuits import ENTRY

PARAMS = {"n_exact": 10, "n_boot": 50, "n_random": 2, "fractions": "0.05,0.2,0.5,1"}


def _compute(root: Path):
    from workbench.runner import run_analysis
    from workbench.store import ResultStore

    return run_analysis(ENTRY.name, MODEL, "ioi", task_params={"n_prompts": 4}, params=PARAMS,
                        store=ResultStore(root))  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return _compute(tmp_path_factory.mktemp("edges") / "store")


def _page() -> AppTest:
    return open_page("10_Edge_circuits")


# ---- the figures ---------------------------------------------------------------------------


def test_circuit_graph_draws_the_chosen_circuit_or_the_top_edges(result):
    from workbench.analyses.edge_circuits.figures import circuit_graph_figure

    edges = result.tables["edges"]
    fig = circuit_graph_figure(result, "eap")
    hover = next(t for t in fig.data if t.name == "edges")
    assert len(hover.x) == int(edges["eap_in_circuit"].sum())
    assert {t.name for t in fig.data if t.mode == "lines"} <= {"positive score", "negative score"}
    assert any(t.mode == "lines" for t in fig.data)
    assert "chosen circuit" in fig.layout.title.text
    nodes = next(t for t in fig.data if t.name == "nodes")
    assert {"embed", "logits", "L0H0", "L0KV1", "L1.mlp"} <= set(nodes.text)

    top = circuit_graph_figure(result, "eap_ig", max_edges=5)
    hover = next(t for t in top.data if t.name == "edges")
    best = edges.reindex(edges["eap_ig"].abs().sort_values(ascending=False).index)["edge"][:5]
    assert [c[0] for c in hover.customdata] == list(best)
    assert "top 5" in top.layout.title.text


def test_faithfulness_has_one_panel_per_ablation_and_names_them(result):
    from workbench.analyses.edge_circuits.figures import faithfulness_figure

    fig = faithfulness_figure(result)
    ablations = result.info["ablations"]
    titles = [a.text for a in fig.layout.annotations if a.text.startswith("ablation: ")]
    assert titles == [f"ablation: {a}" for a in ablations]
    assert {t.xaxis for t in fig.data} == {"x"} | {f"x{i}" for i in range(2, len(ablations) + 1)}
    assert all(any(a in t.name for a in ablations) for t in fig.data)
    assert "ablate_complement" in fig.layout.title.text
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert {t.name for t in lines} == {f"{m} · {a}" for m in ("eap", "eap_ig") for a in ablations}
    randoms = [t for t in fig.data if t.name.startswith("random")]
    assert randoms and all(t.line.dash == "dash" for t in randoms)
    assert any(t.fill == "tonexty" for t in fig.data)  # the bootstrap bands
    assert {s.y0 for s in fig.layout.shapes} == {0.8, 1.0}
    assert fig.layout.xaxis.type == "log"

    one = faithfulness_figure(result, ["zero"], direction="ablate_circuit")
    assert "ablate_circuit" in one.layout.title.text
    assert all(t.name.endswith("· zero") or "zero " in t.name for t in one.data)


def test_exact_scatter_marks_the_flagged_edges(result):
    from workbench.analyses.edge_circuits.figures import exact_scatter_figure

    check = result.tables["exact_check"]
    mine = check[check["method"] == "eap"]
    fig = exact_scatter_figure(result, "eap")
    names = [t.name for t in fig.data]
    agree = result.tables["exact_agreement"].set_index(["method", "set"])
    for which in set(mine["set"]):
        rho = agree.loc[("eap", which), "spearman"]
        assert any(n.startswith(which) and f"Spearman {rho:.2f}" in n for n in names)
    flagged = next(t for t in fig.data if t.name.startswith("flagged"))
    assert len(flagged.x) == mine.loc[mine["flagged"], "edge"].nunique() > 0
    assert any(flagged.text)
    assert "y = x" in names and "Spearman" in fig.layout.title.text


# ---- the page ------------------------------------------------------------------------------


def test_without_a_run_the_page_says_what_to_run(home):
    at = _page()
    assert not at.exception, [e.value for e in at.exception]
    assert ENTRY.name in at.info[0].value
    assert "analyses/edge_circuits.toml" in at.info[0].value


def test_a_stored_run_shows_metrics_figures_and_both_methods(home):
    r = _compute(home / "store")
    at = _page()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="ec.run").value == r.run_id
    shown = {m.label: m.value for m in at.metric}
    info, summary = r.info, r.tables["summary"]
    chosen = info["chosen"]["eap"]
    assert shown["edges in graph"] == f"{info['graph']['total']:,}"
    assert shown["chosen circuit"] == f"{chosen['n_edges']} edges"
    curves = r.tables["curves"]
    f = curves[(curves.ordering == "eap") & (curves.ablation == info["first_ablation"])
               & (curves.direction == "ablate_complement")
               & (curves.n_requested == chosen["requested"])]["faithfulness"].iloc[0]  # fmt: skip
    assert shown["faithfulness"] == f"{f:.3f}"
    s = summary[(summary.ordering == "eap") & (summary.ablation == info["first_ablation"])
                & (summary.direction == "ablate_complement")].iloc[0]  # fmt: skip
    assert shown["CPR · CMD"] == f"{s['cpr']:.3f} · {s['cmd']:.3f}"
    assert shown["vs random"] == f"{s['vs_random']:.2f}"
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(charts) == 3  # graph, faithfulness, exact scatter
    assert "chosen circuit" in charts[0] and "ablation: " in charts[1] and "Spearman" in charts[2]
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == [
        "Edge table (CSV)",
        f"eap's chosen circuit (CSV, {chosen['n_edges']} edges)",
        "eap as EAP-IG graph JSON",
        "eap as auto-circuit scores (JSON)",
    ]

    at.selectbox(key="ec.method").select("eap_ig").run()
    assert not at.exception, [e.value for e in at.exception]
    chosen = info["chosen"]["eap_ig"]
    shown = {m.label: m.value for m in at.metric}
    assert shown["chosen circuit"] == f"{chosen['n_edges']} edges"
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert "eap_ig" in charts[0] and "eap_ig" in charts[2]

    at.radio(key="ec.view").set_value("the top edges by |score|").run()
    at.number_input(key="ec.size").set_value(7).run()
    at.selectbox(key="ec.direction").select("ablate_circuit").run()
    assert not at.exception, [e.value for e in at.exception]
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert "top 7" in charts[0] and "ablate_circuit" in charts[1]

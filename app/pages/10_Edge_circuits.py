"""Edge circuits: a stored edge_circuits run: a method's chosen circuit as a graph, its
faithfulness under each ablation against random orderings, and its estimates against exact
patching; the edge table and the chosen circuit to download."""

from __future__ import annotations

import json

import streamlit as st
import widgets

from workbench import export
from workbench.analyses.edge_circuits import ENTRY
from workbench.analyses.edge_circuits.figures import (
    circuit_graph_figure,
    exact_scatter_figure,
    faithfulness_figure,
)
from workbench.edges.stored import export_run

MAX_DRAWN = 5000


def num(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(float(value), fmt)


model_name = widgets.page("Edge circuits")
st.caption(ENTRY.description + f" — {ENTRY.reference}")
res = widgets.stored_run(
    model_name, ENTRY.name, "Run", "ec.run",
    f"No stored {ENTRY.name} run of this model yet. On the Run page run {ENTRY.name} "
    "(task ioi), or `workbench run analyses/edge_circuits.toml`.",
)  # fmt: skip
run_id = res.run_id
info, tables = res.info, res.tables
method = st.selectbox("Method", list(info["chosen"]), key="ec.method")
chosen = info["chosen"][method]
first = info["first_ablation"]
curves, summary = tables["curves"], tables["summary"]
point = curves[(curves["ordering"] == method) & (curves["ablation"] == first)
               & (curves["direction"] == "ablate_complement")
               & (curves["n_requested"] == chosen["requested"])]  # fmt: skip
mine = summary[(summary["ordering"] == method) & (summary["ablation"] == first)
               & (summary["direction"] == "ablate_complement")]  # fmt: skip
c1, c2, c3, c4, c5 = st.columns(5)
c1.metric("edges in graph", f"{info['graph']['total']:,}")
c2.metric("chosen circuit", f"{chosen['n_edges']} edges")
c2.caption(f"{len(chosen['heads'])} heads · {chosen['requested']} requested")
if len(point):
    p = point.iloc[0]
    c3.metric("faithfulness", f"{p['faithfulness']:.3f}")
    c3.caption(f"95% CI {p['ci_low']:.3f} – {p['ci_high']:.3f}")
if len(mine):
    s = mine.iloc[0]
    c4.metric("CPR · CMD", f"{s['cpr']:.3f} · {s['cmd']:.3f}")
    c5.metric("vs random", num(s["vs_random"], ".2f"))
params = res.key.get("params", {})
st.caption(
    f"run `{run_id}` · {res.key.get('task')} · {info['n_prompts']} prompts · rule "
    f"{info['rule']} · chosen: the smallest circuit from which every larger "
    f"one has faithfulness ≥ {params.get('threshold', 0.8)} under the {first} ablation, "
    f"ablate_complement (requested "
    f"{chosen['requested']} edges, {chosen['n_edges']} after pruning) · metric clean "
    f"{info['clean_metric']:.3f}, corrupted {info['corrupt_metric']:.3f}"
)

st.subheader("Circuit graph")
left, right = st.columns([2, 1])
view = left.radio(
    "Show", ["the chosen circuit", "the top edges by |score|"], horizontal=True, key="ec.view"
)
most = min(int(info["graph"]["total"]), MAX_DRAWN)
size = right.number_input(
    "Edges shown (top by |score|)",
    min_value=1,
    max_value=most,
    value=max(1, min(most, int(chosen["n_edges"]))),
    step=1,
    key="ec.size",
    disabled=view == "the chosen circuit",
    help=f"at most {MAX_DRAWN:,} (a browser draws more only slowly)",
)
max_edges = None if view == "the chosen circuit" else int(size)
st.plotly_chart(circuit_graph_figure(res, method, max_edges), key="ec.graph")
st.caption(
    "Heads at (layer, head), MLPs on the bottom row, KV heads (the k / v receivers) as diamonds "
    "between the query heads they serve; hover an edge's middle for its name, via and score."
)

st.subheader("Faithfulness")
left, right = st.columns([1, 2])
direction = left.selectbox("Direction", list(info["directions"]), key="ec.direction")
ablations = right.multiselect(
    "Ablations", list(info["ablations"]), default=list(info["ablations"]), key="ec.ablations"
)
if ablations:
    st.plotly_chart(faithfulness_figure(res, ablations, direction), key="ec.faith")
st.dataframe(
    summary,
    hide_index=True,
    column_order=["ordering", "ablation", "direction", "cpr", "cmd", "edges_to_08",
                  "log_area", "vs_random", "random_log_area", "random_cpr", "random"],
    key="ec.summary",
)  # fmt: skip

st.subheader("Estimates against exact patching")
if "exact_check" in tables:
    st.plotly_chart(exact_scatter_figure(res, method), key="ec.exact")
    agreement = tables["exact_agreement"]
    st.dataframe(agreement[agreement["method"] == method], hide_index=True, key="ec.agreement")
else:
    st.caption("This run patched no edge exactly (n_exact = 0).")
if "overlap" in tables:
    st.subheader("Chosen heads against a head circuit")
    st.dataframe(tables["overlap"], hide_index=True, key="ec.overlap")

st.subheader("Downloads")
d1, d2, d3, d4 = st.columns(4)
d1.download_button(
    "Edge table (CSV)",
    data=lambda: export.to_bytes(tables["edges"], "csv"),
    file_name=f"{run_id}-edges.csv",
    mime=export.MIME["csv"],
    key="ec.dl.edges",
)
circuit = tables["circuit"][tables["circuit"]["method"] == method]
d2.download_button(
    f"{method}'s chosen circuit (CSV, {len(circuit)} edges)",
    data=lambda: export.to_bytes(circuit, "csv"),
    file_name=f"{run_id}-{method}-circuit.csv",
    mime=export.MIME["csv"],
    key="ec.dl.circuit",
)
for col, fmt, what in ((d3, "eap-ig", "EAP-IG graph JSON"),
                      (d4, "auto-circuit", "auto-circuit scores (JSON)")):  # fmt: skip
    col.download_button(
        f"{method} as {what}",
        data=lambda fmt=fmt: json.dumps(export_run(res, method, fmt)),
        file_name=f"{run_id}-{method}-{fmt}.json",
        mime="application/json",
        key=f"ec.dl.{fmt}",
    )

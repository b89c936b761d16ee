"""KV plans: a stored plan evaluation: the per-KV-head grid coloured by plan, its budget, and
the plan against random plans of the same budget (and the recall-vs-budget curve)."""

from __future__ import annotations

import caches
import streamlit as st
import widgets

from workbench.analyses.kv_plan_eval import ENTRY
from workbench.analyses.kv_plan_eval.compute import METRICS
from workbench.analyses.kv_plan_eval.figures import controls_figure, curve_figure, plan_grid_figure
from workbench.circuits.kvplans import kv_scores

model_name = widgets.page("KV-cache plans")
res = widgets.stored_run(
    model_name, ENTRY.name, "Evaluation", "kv.run",
    "No stored KV-plan evaluation of this model yet. On the Run page run kv_head_scores, "
    "then kv_plan_eval with its run id as scores_run (or `workbench run "
    "analyses/kv_plans_smollm2.toml`).",
)  # fmt: skip
run_id = res.run_id
info = res.info
plan = info["plan"]
c1, c2, c3, c4 = st.columns(4)
c1.metric("full KV heads", f"{info['n_full']} of {info['n_streamable']}")
c2.metric("kv_fraction", f"{info['kv_fraction']:.3f}")
c3.metric("mode", info["mode"])
c4.metric("samples", info["n_samples"])
st.caption(f"{info['plan_str']} · contexts {info['context_lengths']} tokens")

scores = None
source = (plan.get("sources") or [None])[0]
scored = caches.result(source) if source else None
metric_name = "induction"
if scored is not None and "kv_heads" in scored.tables:
    kv = scored.tables["kv_heads"]
    names = sorted(set(kv["metric"]))
    default = names.index("induction") if "induction" in names else 0
    metric_name = st.selectbox("Score shown on hover", names, index=default, key="kv.score")
    scores = kv_scores(kv, metric_name, tuple(plan["grid"]))
st.plotly_chart(plan_grid_figure(plan, scores, metric_name), key="kv.grid")

metric = st.selectbox("Metric", list(METRICS), key="kv.metric")
st.plotly_chart(controls_figure(res.tables["plans"], metric), key="kv.controls")
summary = res.tables["summary"]
st.dataframe(summary[summary["metric"] == metric], hide_index=True, key="kv.summary")
if "curve" in res.tables:
    st.plotly_chart(curve_figure(res.tables["curve"], metric), key="kv.curve")
if "oracle" in res.tables:
    st.subheader("Every plan (exhaustive)")
    st.dataframe(res.tables["oracle"], hide_index=True, key="kv.oracle")
    st.dataframe(res.tables["rule_ranks"], hide_index=True, key="kv.ranks")
with st.expander("plan JSON (for a serving stack)"):
    st.json(plan)

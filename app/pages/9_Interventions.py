"""Interventions: act on chosen heads (zero ablation, ACT calibration, PASTA steering), and see the
task metric with and without it, against random heads of the same number."""

from __future__ import annotations

import caches
import streamlit as st
import views
import widgets

from workbench.analyses.intervention_eval import ENTRY, INTERVENTIONS
from workbench.analyses.intervention_eval.compute import METRICS
from workbench.analyses.intervention_eval.figures import conditions_figure
from workbench.registry import REGISTRY
from workbench.runner import RunRequest
from workbench.tasks import TASKS

SOURCES = [name for name, entry in REGISTRY.items() if entry.chooses_heads]
TASK_CHOICES = [
    t for t in ("knowledge_conflict", "label_choice", "factual", "ioi", "induction") if t in TASKS
]

model_name = widgets.page("Interventions")
st.caption(ENTRY.description + f" — {ENTRY.reference}")
listed = caches.runs(model_name)
stored = listed[listed["analysis"].isin(SOURCES)] if not listed.empty else listed

left, right = st.columns(2)
with left:
    st.subheader("Heads")
    how = st.radio("From", ["type them", "a stored selection"], horizontal=True, key="iv.from")
    params: dict = {}
    if how == "type them":
        params["heads"] = st.text_input(
            "Heads", value="L20H1, L25H4", key="iv.heads", help="e.g. L3H4, L20H1"
        )
    elif stored.empty:
        st.info(f"No stored run of {', '.join(SOURCES)} for this model yet.")
    else:
        run_id = st.selectbox(
            "Run",
            list(stored["run_id"]),
            key="iv.run",
            format_func=lambda r: f"{r} · {stored.loc[stored['run_id'] == r, 'analysis'].iloc[0]}",
        )
        res = caches.result(run_id)
        chosen = (res.info.get("chosen") if res is not None else None) or []
        params["heads_run"] = run_id
        if isinstance(chosen, dict):
            params["heads_key"] = st.selectbox("Which list", sorted(chosen), key="iv.key")
            chosen = chosen[params["heads_key"]]
        st.caption("heads: " + ", ".join(map(str, chosen)) if chosen else "no chosen heads")
    task = st.selectbox("Task", TASK_CHOICES, key="iv.task")
    task_params = widgets.param_widgets(TASKS[task].params_cls, f"iv.task.{task}")
with right:
    st.subheader("Intervention")
    iv = st.selectbox("Intervention", list(INTERVENTIONS), key="iv.kind")
    params["intervention"] = iv
    if iv == "act":
        params["tau"] = st.slider("tau (sink column threshold)", 0.01, 0.5, 0.1, key="iv.tau")
        params["beta"] = st.slider("beta (kept share of a sink)", 0.05, 1.0, 0.4, key="iv.beta")
    elif iv == "pasta":
        params["alpha"] = st.select_slider(
            "alpha (weight outside the highlight)",
            [0.001, 0.01, 0.05, 0.1, 0.3, 1.0],
            0.01,
            key="iv.alpha",
        )
        params["span"] = st.text_input(
            "Highlight",
            value="context",
            key="iv.span",
            help="'context' (knowledge_conflict) or start:stop",
        )
    params["n_random"] = int(st.number_input("Random head sets", 1, 200, 20, key="iv.n"))
    params["random_pool"] = st.selectbox(
        "Random heads", ["uniform", "layer_matched"], key="iv.pool"
    )

if st.button("Run", type="primary", key="iv.go"):
    with widgets.friendly_errors():
        request = RunRequest(ENTRY.name, model_name, task, params, task_params)
        st.session_state.iv_last = views.run_request(request, model_name)

last = st.session_state.get("iv_last") or st.query_params.get("run")
res = caches.result(last) if last else None
if last and res is None and caches.n_workers():
    views.job_status(last, key="iv.job")
if res is not None and res.key.get("analysis") == ENTRY.name:
    info = res.info
    st.success(
        f"{info['intervention']} on {len(info['chosen'])} heads "
        f"({', '.join(info['chosen'])}) · {info['n_prompts']} prompts · run `{last}`"
    )
    metric = st.selectbox("Metric", list(METRICS), key="iv.metric")
    summary = res.tables["summary"].set_index("metric")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("without", f"{summary.loc[metric, 'none']:.3f}")
    c2.metric(
        "with (chosen heads)",
        f"{summary.loc[metric, 'chosen']:.3f}",
        f"{summary.loc[metric, 'change']:+.3f}",
    )
    c3.metric("random sets (mean)", f"{summary.loc[metric, 'random_mean']:.3f}")
    c4.metric(
        "percentile · p",
        f"{summary.loc[metric, 'percentile']:.0f} · {summary.loc[metric, 'p_value']:.3f}",
    )
    st.plotly_chart(conditions_figure(res.tables["conditions"], metric), key="iv.fig")
    st.dataframe(res.tables["summary"], hide_index=True, key="iv.summary")

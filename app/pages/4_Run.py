"""Run an analysis from the registry on a task or on typed clean/corrupted prompts."""

from __future__ import annotations

import caches
import streamlit as st
import views
import widgets

from workbench.registry import REGISTRY
from workbench.runner import RunRequest
from workbench.tasks import TASKS
from workbench.tasks.custom import write_pairs

CUSTOM = "custom prompts (type them)"

model_name = widgets.page("Run an analysis")
analysis_name = st.selectbox("Analysis", list(REGISTRY), key="run.analysis")
analysis = REGISTRY[analysis_name]
st.caption(analysis.description + (f" — {analysis.reference}" if analysis.reference else ""))

# tasks an analysis declares (needle sets, plain texts) are offered to it alone; the others get
# every prompt-pair task (those declared by prompt-group analyses, e.g. knowledge_conflict, too)
OWN_KIND = {t for entry in REGISTRY.values() if entry.task_kind != "groups" for t in entry.tasks}
if analysis.tasks:
    choices = list(analysis.tasks)
else:
    choices = [t for t in TASKS if t not in OWN_KIND and t != "custom"] + [CUSTOM, "custom"]
task = st.selectbox(
    "Task", choices, index=choices.index(analysis.default_task), key=f"run.task.{analysis_name}"
)

left, right = st.columns(2)
with left:
    st.subheader("Prompts")
    if task == CUSTOM:
        clean = st.text_area("Clean prompt(s), one per line", key="run.clean")
        corrupt = st.text_area("Corrupted prompt(s), same token length", key="run.corrupt")
        correct = st.text_input("Correct answer (one token, e.g. ' Mary')", key="run.correct")
        incorrect = st.text_input("Incorrect answer (one token)", key="run.incorrect")
        task_params = {}
    else:
        task_params = widgets.param_widgets(TASKS[task].params_cls, f"task.{task}")
with right:
    st.subheader("Parameters")
    params = widgets.param_widgets(analysis.params_cls, f"params.{analysis_name}")
    bos = st.selectbox("BOS", ["auto", "true", "false"], key="run.bos")
    device = st.selectbox("Device", caches.devices(), key="run.device")
    dtypes = ["float32", "bfloat16"] + ([] if device == "cpu" else ["float16"])
    dtype = st.selectbox("Precision", dtypes, key="run.dtype", help="enters the run key")
prepend_bos = None if bos == "auto" else bos == "true"

if st.button("Run", type="primary", key="run.go"):
    with widgets.friendly_errors():
        run_task = task
        if task == CUSTOM:
            path = write_pairs(clean, corrupt, correct, incorrect)
            run_task, task_params = "custom", {"path": str(path)}
        request = RunRequest(
            analysis_name, model_name, run_task, params, task_params, prepend_bos, device, dtype
        )
        st.session_state.last_run = views.run_request(request, model_name, device, dtype)

last = st.session_state.get("last_run") or st.query_params.get("run")
if last:
    res = caches.result(last)
    if res is None and caches.n_workers():
        views.job_status(last, key="run.job")
    elif res is not None and res.key.get("model") == model_name:
        st.success(f"Result `{last}` is in the store.")
        views.show_result(res, key="run.result")

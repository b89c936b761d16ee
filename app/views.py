"""The app's result views: one stored result drawn from the engine's tables and figures."""

from __future__ import annotations

from typing import Any

import streamlit as st

from workbench.result import Result


def show_result(res: Result, key: str = "res") -> None:
    """Per-head heatmaps, layer x position grids and the other tables of one result."""
    from workbench.figures import grid_components, layer_position_figure

    k = res.key
    st.caption(
        f"run `{res.run_id}` · {k.get('analysis')} on {k.get('model')} / {k.get('task')} · "
        "in the store"
        + (f" · {res.manifest.get('seconds') or 0:.2f} s compute" if res.manifest else "")
    )
    metrics = [m for m in res.metrics if res.heads[res.heads["metric"] == m]["value"].notna().any()]
    if metrics:
        metric = st.selectbox("Per-head metric", metrics, key=f"{key}.metric")
        fig = res.figure(metric)
        fig.update_layout(height=min(900, 220 + 18 * int(res.heads["layer"].max() + 1)))
        st.plotly_chart(fig, key=f"{key}.fig")
        st.dataframe(res.top(metric, 10), hide_index=True)
    for name, table in res.tables.items():
        if name == "heads":
            continue
        comps = grid_components(table)
        if comps:
            comp = st.selectbox(f"{name}: component", comps, key=f"{key}.{name}.comp")
            st.plotly_chart(
                layer_position_figure(table, comp, title=str(k.get("analysis"))),
                key=f"{key}.{name}.fig",
            )
        with st.expander(f"table `{name}` ({len(table)} rows)"):
            st.dataframe(table, hide_index=True)


def job_status(run_id: str, key: str = "job") -> str:
    """A job's live state, refreshed every second while it is queued or running (survives
    reloads: the state is read from the store's job table); returns the state shown."""
    import caches

    job = caches.job_queue().get(run_id)
    if job is None:
        return "none"
    if job.done:
        if job.state == "failed":
            st.error(f"Run `{run_id}` failed: {job.error}")
        elif job.state == "cancelled":
            st.warning(f"Run `{run_id}` was cancelled.")
        return job.state

    @st.fragment(run_every=1.0)
    def live() -> None:
        now = caches.job_queue().get(run_id)
        if now is None or now.done:
            st.rerun()  # the whole page: it now shows the result (or the failure)
            return
        share = now.step / now.total if now.total else 0.0
        where = f"on {now.worker}" if now.worker else "waiting for a worker"
        st.progress(min(1.0, share), text=f"{now.title}: {now.state} {where} · "
                    f"{now.text} {now.step}/{now.total}")  # fmt: skip

    live()
    return job.state


def run_request(request: Any, model_name: str, device: str = "cpu", dtype: str = "float32") -> str:
    """Resolve and run one request as the Run page does: nothing if the runner's serve decision
    (``runner.stored_outcome``) serves it from the store, a job when workers run (the worker
    finishes it), otherwise here with a progress bar (``runner.run_part``, which finishes it
    through ``runner.finish_part``). Returns the run id (also put in the URL)."""
    import caches

    from workbench.progress import reporting
    from workbench.runner import ModelPool, run_part, stored_outcome

    part = request.resolve()  # validates everything without loading the model
    store = caches.store()
    if stored_outcome(part, store, read=False) is not None:
        pass
    elif caches.n_workers():  # a job: it lives in the store's job table, not in this page
        queue = caches.job_queue()
        job = queue.submit(part)  # a queued or running job (another session's) is shared
        if job.state == "done" and stored_outcome(part, store, read=False) is None:
            queue.rerun(part, job)  # done before, but its result is gone or not to be served
    else:
        bar = st.progress(0.0, text="starting…")

        def progress(desc: str, done: int, total: int) -> None:
            bar.progress(min(1.0, done / max(total, 1)), text=f"{desc} {done}/{total}")

        pool = ModelPool()
        pool.add(caches.model(model_name, device, dtype))
        with st.spinner(f"Running {request.analysis} on {model_name}…"), reporting(progress):
            run_part(part, store, pool, read=False, serve=False)  # the decision was just made
        bar.progress(1.0, text="done")
    st.query_params["run"] = part.run_id  # a reload or a shared link finds the run again
    return str(part.run_id)

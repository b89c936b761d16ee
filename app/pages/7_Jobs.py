"""Jobs: queued, running and finished work of everyone using this store; cancel a job."""

from __future__ import annotations

import caches
import streamlit as st
import widgets

widgets.page("Jobs")
if not caches.n_workers():
    st.info(
        f"This app computes inside the page (no worker pool; set {caches.WORKERS_ENV}=1, as "
        "`make app` does, to run analyses as jobs)."
    )


@st.fragment(run_every=2.0)
def table() -> None:
    df = caches.job_queue().table()
    if df.empty:
        st.info("No jobs yet: start one on the Run page.")
        return
    counts = df["state"].value_counts()
    st.caption(" · ".join(f"{n} {state}" for state, n in counts.items()))
    cols = ["job_id", "title", "state", "step", "total", "text", "worker", "attempts",
            "created", "finished", "error"]  # fmt: skip
    st.dataframe(df[cols], hide_index=True, key="jobs.table")


table()
active = [j for j in caches.job_queue().jobs() if not j.done]
if active:
    pick = st.selectbox(
        "Cancel a job", [j.job_id for j in active],
        format_func=lambda i: f"{i} · {next(j.title for j in active if j.job_id == i)}",
        key="jobs.pick",
    )  # fmt: skip
    if st.button("Cancel", key="jobs.cancel"):
        with widgets.friendly_errors():
            st.success(f"job {pick}: {caches.job_queue().cancel(pick).state}")

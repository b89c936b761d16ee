"""Runs: browse the store, download results (CSV, Parquet, JSON) and figures (HTML)."""

from __future__ import annotations

import caches
import streamlit as st
import widgets

from workbench import export

widgets.page("Stored runs")
listed = caches.runs()
if listed.empty:
    st.info("The store is empty: start a run on the Run page.")
    st.stop()

c1, c2, c3 = st.columns(3)
ALL = "(all)"
model = c1.selectbox("Model", [ALL, *sorted(set(listed["model"]))], key="runs.model")
analysis = c2.selectbox("Analysis", [ALL, *sorted(set(listed["analysis"]))], key="runs.analysis")
task = c3.selectbox("Task", [ALL, *sorted(set(listed["task"]))], key="runs.task")
shown = listed
for col, value in (("model", model), ("analysis", analysis), ("task", task)):
    if value != ALL:
        shown = shown[shown[col] == value]
st.dataframe(shown, hide_index=True)
if shown.empty:
    st.stop()

run_id = st.selectbox(
    "Run",
    list(shown["run_id"]),
    format_func=lambda r: (
        f"{r} · "
        + " / ".join(shown.loc[shown["run_id"] == r, ["analysis", "model", "task"]].iloc[0])
    ),
    key="runs.pick",
)
res = caches.result(run_id)
if res is None:
    st.error(f"Run {run_id} is damaged or gone; run it again.")
    st.stop()
table = st.selectbox("Table", list(res.tables), key="runs.table")
df = res.tables[table]
st.caption(f"{len(df)} rows")
cols = st.columns(3)
for col, fmt in zip(cols, export.FORMATS, strict=True):
    col.download_button(
        f"Download {fmt.upper()}",
        data=export.to_bytes(df, fmt),
        file_name=f"{run_id}-{table}.{fmt}",
        mime=export.MIME[fmt],
        key=f"runs.dl.{fmt}",
    )
if res.metrics:
    metric = st.selectbox("Figure of metric", res.metrics, key="runs.metric")
    fig = res.figure(metric)
    st.plotly_chart(fig, key="runs.fig")
    st.download_button(
        "Download figure (standalone HTML)",
        data=lambda: fig.to_html(include_plotlyjs=True, full_html=True),
        file_name=f"{run_id}-{metric}.html",
        mime="text/html",
        key="runs.dl.html",
    )

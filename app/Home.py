"""The workbench web app: which attention heads do what. Run with ``make app``."""

from __future__ import annotations

import caches
import streamlit as st
import widgets

model = widgets.page("workbench — which attention heads do what")
listed = caches.runs(model)
st.markdown(
    f"""
Model **{model}** · **{len(listed)}** stored run(s) for it in the results store.

- **Atlas**: every stored score of every head, as a layer x head grid; pick a head to open it.
- **Head**: one head's scores across analyses, its attention map, its direct logit attribution.
- **Attention**: attention patterns of any layer and head on your own prompt.
- **Run**: run an analysis from the registry on a task or your own clean/corrupted prompts.
- **Circuits**: how far two stored runs (or circuits) agree.
- **Runs**: browse the store, download results as CSV, Parquet or JSON, figures as HTML.
- **Jobs**: queued, running and finished work of everyone using this store.
"""
)
starter = caches.starter(model) if caches.n_workers() and model == caches.default_model() else []
pending = [j for j in map(caches.job_queue().get, starter) if j is not None and not j.done]
if pending:
    st.info(
        f"A first look at **{model}** is being computed ({len(pending)} of {len(starter)} "
        "starter analyses still queued or running: `analyses/starter.toml`); the **Atlas** fills "
        "in as each one lands."
    )
if len(listed):
    st.dataframe(listed.drop(columns=["params"]).head(10), hide_index=True)
elif not pending:
    st.info("No results for this model yet: start one on the **Run** page.")

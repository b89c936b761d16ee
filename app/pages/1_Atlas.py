"""Atlas: the layer x head grid of any stored score of the selected model; pick a head."""

from __future__ import annotations

import time

import caches
import streamlit as st
import widgets

t0 = time.perf_counter()
model_name = widgets.page("Head atlas")
atlas = caches.atlas(model_name)
if atlas is None:
    queued = [j for j in caches.job_queue().jobs() if not j.done] if caches.n_workers() else []
    st.info(
        "No stored per-head scores for this model yet: "
        + (f"{len(queued)} job(s) are queued or running (Jobs page); the atlas appears as "
           "they land." if queued else "run analyses on the Run page.")
    )  # fmt: skip
    st.stop()
st.caption(
    f"{atlas.n_layers} layers x {atlas.n_heads} heads · {len(atlas.columns)} score column(s) "
    "(the latest run of each analysis / variant / metric / task) · hover a cell for its value, "
    "run and roles; open a head below"
)
column = st.selectbox("Score", atlas.columns, key="atlas.column")
st.plotly_chart(atlas.figure(column), key="atlas.fig")

ranked = atlas.table.sort_values(column, ascending=False, na_position="last")
c1, c2 = st.columns([3, 1])
choice = c1.selectbox(
    "Open a head (highest score first)", list(ranked["head_label"]), key="atlas.pick"
)
if c2.button("Open head page", key="atlas.open"):
    layer_s, head_s = choice[1:].split("H")
    widgets.head_link(int(layer_s), int(head_s))

if len(atlas.role_table):
    st.subheader("Roles")
    st.dataframe(atlas.role_table, hide_index=True)
with st.expander("Provenance of every score column"):
    st.dataframe(atlas.provenance, hide_index=True)
st.caption(f"atlas page built in {time.perf_counter() - t0:.2f} s (server side)")

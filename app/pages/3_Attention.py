"""Attention explorer: one head's map, or all heads of a layer, on any prompt."""

from __future__ import annotations

import caches
import streamlit as st
import widgets

from workbench.attention import DENSE_LIMIT, head_figure, layer_figure, top_keys

model_name = widgets.page("Attention explorer")
text = widgets.prompt_picker("attn")
with widgets.friendly_errors():
    loaded = caches.model(model_name)
    c1, c2, c3, c4 = st.columns(4)
    layer = c1.number_input("Layer", 0, loaded.n_layers - 1, 0, key="attn.layer")
    view = c2.radio("Show", ["one head", "all heads of the layer"], key="attn.view")
    head = c3.number_input("Head", 0, loaded.n_heads - 1, 0, key="attn.head")
    limit = int(c4.number_input("Dense map up to (tokens)", 2, 2048, DENSE_LIMIT, key="attn.limit"))
    amap = caches.attention(model_name, text, int(layer))

st.caption(f"{amap.n_tokens} tokens · layer {amap.layer} · {amap.n_heads} heads")
if amap.dense(limit):
    if view == "one head":
        st.plotly_chart(head_figure(amap, int(head)), key="attn.fig")
    else:
        st.plotly_chart(layer_figure(amap), key="attn.layerfig")
else:
    k = st.slider("Keys per query", 1, 20, 5, key="attn.k")
    st.info(
        f"{amap.n_tokens} tokens is more than {limit}: showing the top {k} keys per "
        f"query of head {int(head)} instead of a dense map."
    )
    st.dataframe(top_keys(amap.pattern[int(head)], amap.labels, k), hide_index=True)

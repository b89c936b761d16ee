"""One head: its scores across analyses, attention map, attended tokens, DLA and sinks."""

from __future__ import annotations

import caches
import streamlit as st
import widgets

from workbench.attention import attended_tokens, head_figure, top_keys
from workbench.errors import WorkbenchError
from workbench.registry import REGISTRY

model_name = widgets.page("Head")
rows = caches.head_rows(model_name)

qp = st.query_params
start = st.session_state.get("head", (0, 0))
with widgets.friendly_errors():
    start = (int(qp.get("layer", start[0])), int(qp.get("head", start[1])))
n_layers = int(rows["layer"].max()) + 1 if len(rows) else None
c1, c2 = st.columns(2)
layer = int(c1.number_input("Layer", 0, None, start[0], key="head.layer"))
head = int(c2.number_input("Head", 0, None, start[1], key="head.head"))
st.session_state.head = (layer, head)
st.query_params.update({"layer": str(layer), "head": str(head), "model": model_name})
st.header(f"L{layer}H{head} · {model_name}")

mine = rows[(rows["layer"] == layer) & (rows["head"] == head)]
st.subheader("Scores across analyses")
if mine.empty:
    st.info("No stored per-head scores for this head yet (run analyses on the Run page).")
else:
    cols = [
        c for c in ("analysis", "metric", "task", "value", "stderr", "n", "run_id") if c in mine
    ]
    st.dataframe(mine[cols].sort_values(["analysis", "metric"]), hide_index=True)
    if n_layers is not None:
        ranked = rows.assign(rank=rows.groupby(["run_id", "metric"])["value"].rank(ascending=False))
        mine_rank = ranked.loc[mine.index, ["analysis", "metric", "rank"]]
        st.caption(
            "Rank among all heads (1 = highest): "
            + ", ".join(f"{r.analysis}/{r.metric} #{int(r.rank)}" for r in mine_rank.itertuples())
        )

atlas = caches.atlas(model_name)
roles = atlas.roles_of(layer, head) if atlas is not None else []
if roles:
    st.success("Roles: " + "; ".join(roles))

for entry in REGISTRY.values():  # analyses that declare a Head page section
    if not entry.head_page:
        continue
    own = mine[mine["analysis"] == entry.name]
    st.subheader(entry.head_page)
    if own.empty:
        st.info(f"No stored {entry.name} run for this model.")
    else:
        shown = [c for c in ("metric", "task", "value", "stderr", "run_id") if c in own]
        st.dataframe(own[shown], hide_index=True)

st.subheader("Attention map")
text = widgets.prompt_picker("head")
with widgets.friendly_errors():
    loaded = caches.model(model_name)
    if not (layer < loaded.n_layers and head < loaded.n_heads):
        raise WorkbenchError(
            f"L{layer}H{head} does not exist in {model_name}",
            f"it has {loaded.n_layers} layers x {loaded.n_heads} heads",
        )
    amap = caches.attention(model_name, text, layer)
if amap.dense():
    st.plotly_chart(head_figure(amap, head), key="head.fig")
else:
    st.dataframe(top_keys(amap.pattern[head], amap.labels, 5), hide_index=True)
st.markdown("**Tokens it attends to most** (share of its attention mass)")
st.dataframe(attended_tokens(amap.pattern[head], amap.labels, 10), hide_index=True)

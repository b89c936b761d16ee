"""Circuits: pick two stored circuits, or derive them from two per-head runs; see the overlap."""

from __future__ import annotations

from typing import Any

import caches
import streamlit as st
import widgets

from workbench.circuits import CIRCUIT_ANALYSIS, derive_circuit, load_circuit, run_scores
from workbench.circuits.overlap import overlap

model_name = widgets.page("Circuits and overlap")
listed = caches.runs(model_name)
per_head = set(caches.head_rows(model_name)["run_id"])
listed = listed[listed["run_id"].isin(per_head) | (listed["analysis"] == CIRCUIT_ANALYSIS)]
if len(listed) < 2:
    st.info("Needs two stored circuits or per-head runs of this model (see the Run page).")
    st.stop()
labels = {r.run_id: f"{r.analysis} / {r.task} · {r.run_id[:8]}" for r in listed.itertuples()}
ids = list(labels)
kinds = dict(zip(listed["run_id"], listed["analysis"], strict=True))


def side(col: Any, name: str, default: int) -> tuple[Any, Any, str]:
    """One circuit: a stored circuit, or the top-k heads of a per-head run (with its scores)."""
    with col:
        rid = st.selectbox(f"{name}: run", ids, index=default, format_func=labels.get, key=name)
        if kinds[rid] == CIRCUIT_ANALYSIS:
            circuit = load_circuit(caches.store(), rid)
            return circuit, None, f"{name} (circuit {rid[:8]})"
        res = caches.result(rid)
        assert res is not None
        metric = st.selectbox(f"{name}: metric", res.metrics, key=f"{name}.metric")
        k = int(st.number_input(f"{name}: top k heads", 1, 500, 10, key=f"{name}.k"))
        absolute = st.checkbox(f"{name}: rank by |score|", key=f"{name}.abs")
        circuit = derive_circuit(
            caches.store(), rid, "top_k", metric=metric, k=k, absolute=absolute
        )
        scores, _ = run_scores(caches.store(), rid, metric)
        return circuit, scores, f"{name} ({kinds[rid]}.{metric} top {k})"


c1, c2 = st.columns(2)
with widgets.friendly_errors():
    ca, sa, name_a = side(c1, "A", 0)
    cb, sb, name_b = side(c2, "B", 1)
    result = overlap(ca, cb, scores_a=sa, scores_b=sb, names=(name_a, name_b), n_permutations=2000)
st.plotly_chart(result.figure(), key="circ.fig")
st.dataframe(result.table.T.rename(columns={0: "value"}).astype(str), key="circ.table")
h1, h2 = st.columns(2)
h1.markdown(f"**{name_a}**: " + ", ".join(str(h) for h in sorted(ca.heads)))
h2.markdown(f"**{name_b}**: " + ", ".join(str(h) for h in sorted(cb.heads)))

"""The app's result views: one stored result drawn from the engine's tables and figures."""

from __future__ import annotations

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

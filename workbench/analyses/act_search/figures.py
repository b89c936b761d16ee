"""Figures of an ``act_search`` result, from its stored tables (torch-free).

- :func:`gain_heatmap`: layer x head grid of a per-head column of the ``search`` table (default
  the calibration accuracy gain), the chosen heads marked with a star;
- :func:`eval_figure`: accuracy change per eval task for the chosen set, calibrating every
  searched head, and the random sets of the same size (dots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go


def gain_heatmap(search: pd.DataFrame, column: str = "acc_gain") -> go.Figure:
    import plotly.graph_objects as go

    n_layers, n_heads = int(search["layer"].max()) + 1, int(search["head"].max()) + 1
    z = np.full((n_layers, n_heads), np.nan)
    mark = np.full((n_layers, n_heads), "", dtype=object)
    for row in search.itertuples(index=False):
        z[row.layer, row.head] = getattr(row, column)
        mark[row.layer, row.head] = "*" if row.chosen else ""
    bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[f"H{h}" for h in range(n_heads)], y=[f"L{la}" for la in range(n_layers)],
            text=mark, texttemplate="%{text}", colorscale="RdBu", zmid=0.0,
            zmin=-bound or -1.0, zmax=bound or 1.0, colorbar={"title": column},
            hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>",
        )
    )  # fmt: skip
    fig.update_layout(
        title=f"ACT per-head search: {column} with the head alone calibrated (* = chosen)",
        yaxis={"autorange": "reversed"},
        height=min(900, 160 + 20 * n_layers),
    )
    return fig


def eval_figure(ev: pd.DataFrame, metric: str = "acc_change") -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    tasks = list(dict.fromkeys(ev["task"]))
    rand = ev[ev["condition"].str.startswith("random_")]
    fig.add_trace(go.Scatter(x=rand["task"], y=rand[metric], mode="markers", name="random sets",
                             marker={"color": "#999999", "size": 6}))  # fmt: skip
    for cond, color in (("chosen", "#d62728"), ("all", "#1f77b4")):
        sel = ev[ev["condition"] == cond].set_index("task").reindex(tasks)
        marker = {"color": color, "size": 12, "symbol": "diamond"}
        fig.add_trace(go.Scatter(x=tasks, y=sel[metric], mode="markers", name=cond, marker=marker))
    fig.update_layout(title=f"ACT chosen heads on held-out tasks: {metric}", yaxis_title=metric)
    return fig

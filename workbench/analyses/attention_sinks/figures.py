"""Figures of an ``attention_sinks`` result, drawn from its stored tables (torch-free).

``sink_rate_figure(result.tables["positions"])``: ``Sink_k`` against ``k`` (1-indexed, Gu et
al. 2024); ``sink_share_heatmap(result.heads)``: layer x head share of samples in which each head
is a sink for the first token. Both take plain pandas tables, so the app can call them on a
stored result without loading a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.figures import head_heatmap

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go


def sink_rate_figure(positions: pd.DataFrame, domain: str = "all") -> go.Figure:
    """Bar chart of ``Sink_k^epsilon`` (percent of (sample, layer, head) triples) per ``k``."""
    import plotly.graph_objects as go

    rows = positions[positions["domain"] == domain]
    if rows.empty:
        raise KeyError(f"no domain {domain!r}; have {sorted(set(positions['domain']))}")
    fig = go.Figure(
        go.Bar(
            x=rows["k"],
            y=rows["sink_pct"],
            customdata=rows[["position", "token", "n_queries"]].values,
            hovertemplate="k=%{x} (position %{customdata[0]}, %{customdata[1]}), "
            "%{customdata[2]} queries: Sink_k %{y:.1f}%<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Sink_k by position ({domain}); k = 1 is the first token",
        xaxis={"title": "k (1-indexed position)"},
        yaxis={"title": "Sink_k (% of sample x layer x head)", "range": [0, 100]},
    )
    return fig


def sink_share_heatmap(heads: pd.DataFrame, metric: str = "sink_share") -> go.Figure:
    """Layer x head heatmap of a per-head sink metric (default: first-token sink share)."""
    rows = heads[heads["metric"] == metric]
    if rows.empty:
        raise KeyError(f"no metric {metric!r}; have {sorted(set(heads['metric']))}")
    mat = rows.pivot(index="layer", columns="head", values="value")
    return head_heatmap(
        mat,
        title=f"{metric} per head",
        colorbar=metric,
        hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>",
        zmin=0,
        zmax=1 if metric.startswith(("sink_share", "dormant_share")) else None,
    )

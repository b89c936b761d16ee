"""The conditions of an intervention evaluation as one figure (plotly only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go


def conditions_figure(conditions: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """``metric`` per condition: the random sets as points (with their mean), the unmodified
    model, the chosen heads and all heads as bars."""
    import plotly.graph_objects as go

    rand = conditions[conditions["kind"] == "random"]
    fixed = conditions[conditions["kind"] != "random"]
    fig = go.Figure()
    fig.add_bar(
        x=list(fixed["condition"]),
        y=list(fixed[metric]),
        name="conditions",
        marker_color=[
            "#888" if c == "none" else "#d62728" if c == "chosen" else "#1f77b4"
            for c in fixed["condition"]
        ],
    )
    if not rand.empty:
        fig.add_scatter(
            x=["random sets"] * len(rand),
            y=list(rand[metric]),
            mode="markers",
            name=f"{len(rand)} random sets",
            marker={"color": "#2ca02c", "size": 8},
            text=list(rand["condition"]),
        )
        fig.add_scatter(
            x=["random sets"],
            y=[float(rand[metric].mean())],
            mode="markers",
            name="random mean",
            marker={"symbol": "line-ew-open", "size": 30, "color": "black"},
        )
    fig.update_layout(yaxis_title=metric, xaxis_title="", height=380, bargap=0.5)
    return fig

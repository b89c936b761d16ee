"""Figures of a ``kv_plan_eval`` result, from its stored tables and manifest (torch-free).

- :func:`plan_grid_figure`: layer x KV head grid coloured by policy (full / stream / native),
  hover with the head's score when a KV-head score table is given;
- :func:`controls_figure`: every evaluated plan's mean ``metric`` (random plans as dots per
  family, the plan and the named controls as marked lines), so the plan's place among random
  plans of the same budget is visible;
- :func:`curve_figure`: ``metric`` against the number of full KV heads, the scored top-k plans
  as a line and the random k-sets as dots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

POLICY_CODE = {"stream": 0, "full": 1, "native": 2}


def plan_grid_figure(
    plan: Mapping[str, Any], scores: np.ndarray | None = None, score_name: str = "score"
) -> go.Figure:
    """The plan (``KVPlan.to_dict()``) as a layer x KV head grid."""
    import plotly.graph_objects as go

    n_layers, n_kv = (int(x) for x in plan["grid"])
    full = {tuple(h) for h in plan["full"]}
    native = {int(lay) for lay, _ in plan.get("native", [])}
    code = np.zeros((n_layers, n_kv))
    text = np.empty((n_layers, n_kv), dtype=object)
    for lay in range(n_layers):
        for g in range(n_kv):
            policy = "native" if lay in native else "full" if (lay, g) in full else "stream"
            code[lay, g] = POLICY_CODE[policy]
            score = "" if scores is None else f"<br>{score_name} {scores[lay, g]:.3f}"
            text[lay, g] = f"L{lay} KV{g}: {policy}{score}"
    colors = [[0, "#d9d9d9"], [0.33, "#d9d9d9"], [0.34, "#d62728"], [0.66, "#d62728"],
              [0.67, "#9ecae1"], [1, "#9ecae1"]]  # fmt: skip
    fig = go.Figure(
        go.Heatmap(
            z=code, x=[f"KV{g}" for g in range(n_kv)], y=[f"L{lay}" for lay in range(n_layers)],
            text=text, hovertemplate="%{text}<extra></extra>", colorscale=colors, zmin=0, zmax=2,
            showscale=False, xgap=2, ygap=2,
        )
    )  # fmt: skip
    stream = plan.get("stream", {})
    fig.update_layout(
        title=f"KV plan ({plan.get('rule') or '-'}): red = full cache, grey = sink "
        f"{stream.get('sink')} + window {stream.get('window')}"
        + (", blue = the model's own sliding window" if native else ""),
        yaxis={"autorange": "reversed"},
        height=min(900, 160 + 20 * n_layers),
    )
    return fig


def controls_figure(plans: pd.DataFrame, metric: str = "recall") -> go.Figure:
    """Mean ``metric`` of every plan of the ``plans`` table."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for fam, prefix in (("uniform random", "random_u"), ("layer-matched random", "random_l")):
        rows = plans[plans["plan"].str.startswith(prefix)]
        fig.add_trace(
            go.Box(y=rows[metric], name=fam, boxpoints="all", jitter=0.4, pointpos=0,
                   text=rows["plan"], hovertemplate="%{text}: %{y:.4f}<extra></extra>")
        )  # fmt: skip
    named = plans[~plans["plan"].str.startswith("random_")]
    spots = ("top right", "bottom right", "top left", "bottom left")  # lines often nearly meet
    for i, row in enumerate(named.sort_values(metric).itertuples()):
        fig.add_hline(
            y=float(getattr(row, metric)), line_dash="solid" if row.plan == "plan" else "dot",
            line_color="#d62728" if row.plan == "plan" else "#636363",
            annotation_text=f"{row.plan} {float(getattr(row, metric)):.3f}",
            annotation_position=spots[i % len(spots)],
        )  # fmt: skip
    fig.update_layout(
        title=f"{metric}: the plan (red) among random plans with as many full KV heads",
        yaxis={"title": metric},
        showlegend=False,
    )
    return fig


def curve_figure(curve: pd.DataFrame, metric: str = "recall") -> go.Figure:
    """``metric`` against the number of full KV heads (scored top-k line, random dots)."""
    import plotly.graph_objects as go

    scored = curve[curve["kind"] == "scored"].sort_values("k")
    rand = curve[curve["kind"] == "random"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=scored["k"], y=scored[metric], mode="lines+markers",
                             name="top-k by score", line={"color": "#d62728"}))  # fmt: skip
    fig.add_trace(go.Scatter(x=rand["k"], y=rand[metric], mode="markers", name="random k-sets",
                             marker={"color": "#636363"}))  # fmt: skip
    fig.update_layout(
        title=f"{metric} against the number of full KV heads",
        xaxis={"title": "full KV heads"},
        yaxis={"title": metric},
    )
    return fig

"""Figures of an ``edge_circuits`` result, drawn from its stored tables (plotly only, torch-free).

- :func:`circuit_graph_figure`: a method's chosen circuit (or the whole graph's top edges by
  ``|score|``) as a graph laid out by layer: ``embed`` at the left, ``logits`` at the right,
  heads at ``(layer, head)``, each layer's MLP on the bottom row, KV heads (the ``k`` / ``v``
  receivers of grouped-query attention) as diamonds between the query heads they serve; edges
  coloured by the sign of their score, thicker and darker with ``|score|``;
- :func:`faithfulness_figure`: faithfulness against the circuit's edge count, one panel per
  ablation, each method with its bootstrap band and the random orderings dashed, so how far the
  curve moves with the ablation is visible at a glance;
- :func:`exact_scatter_figure`: each exactly patched edge's estimate against its exact patching
  effect, per set (top / random / named) with its Spearman, the most discrepant edges ringed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

METHOD_COLORS = {"eap": "#d62728", "eap_ig": "#1f77b4"}
SET_COLORS = {"top": "#d62728", "random": "#7f7f7f", "named": "#2ca02c"}
SIGN_COLORS = {1: "214,39,40", -1: "31,119,180"}  # rgb: positive red, negative blue
DIRECTION_TEXT = {
    "ablate_complement": "circuit kept, every other edge ablated (sufficiency)",
    "ablate_circuit": "the circuit's edges ablated (necessity)",
}
MLP_ROW = -1.5  # the y of the MLP row, below head 0
_NODE = re.compile(r"^L(\d+)(?:H(\d+)|KV(\d+)|\.mlp)")


def _grid(edges: pd.DataFrame) -> tuple[int, int, int]:
    """``(n_layers, n_heads, n_kv_heads)`` read off the edge names."""
    layers, heads, kv = [0], [0], [0]
    for name in (*edges["sender"].unique(), *edges["receiver"].unique()):
        m = _NODE.match(str(name))
        if m:
            layers.append(int(m[1]))
            if m[2] is not None:
                heads.append(int(m[2]))
            if m[3] is not None:
                kv.append(int(m[3]))
    return max(layers) + 1, max(heads) + 1, max(kv) + 1


def _position(name: str, grid: tuple[int, int, int]) -> tuple[float, float]:
    """Where node ``name`` (a sender or a receiver) is drawn."""
    n_layers, n_heads, n_kv = grid
    middle = (n_heads - 1) / 2
    if name == "embed":
        return -1.0, middle
    if name == "logits":
        return float(n_layers), middle
    m = _NODE.match(name)
    if m is None:
        raise ValueError(f"not a node of the edge graph: {name!r}")
    layer = int(m[1])
    if m[2] is not None:
        return float(layer), float(m[2])
    if m[3] is not None:  # a KV head: between the query heads of its group, left of them
        group = n_heads / n_kv
        return layer - 0.3, int(m[3]) * group + (group - 1) / 2
    return layer + 0.4, MLP_ROW


def _node(receiver: str) -> str:
    """The node a receiver is drawn at: ``L7H1.q`` at head ``L7H1``, ``L0KV1.k`` at ``L0KV1``."""
    return receiver.rsplit(".", 1)[0] if receiver.endswith((".q", ".k", ".v")) else receiver


def _curve(x0: float, y0: float, x1: float, y1: float, n: int = 9) -> tuple[list, list]:
    """A gentle arc (quadratic Bezier) from ``(x0, y0)`` to ``(x1, y1)``: long edges along one
    row bend away from the nodes between their ends."""
    t = np.linspace(0, 1, n)
    bend = 0.12 * abs(x1 - x0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + bend
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t**2 * x1
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t**2 * y1
    return [*xs.tolist(), None], [*ys.tolist(), None]


def circuit_graph_figure(
    result: Any, method: str, max_edges: int | None = None, *, n_widths: int = 4
) -> go.Figure:
    """``method``'s chosen circuit (``max_edges`` None), or the top ``max_edges`` edges of the
    whole graph by ``|score|``, laid out by layer (module docstring). Edge width and opacity
    grow with ``|score|`` (in ``n_widths`` steps), red positive, blue negative; hovering an
    edge's midpoint gives its name, via and score; all nodes are drawn, those the shown edges
    touch darker."""
    import plotly.graph_objects as go

    edges = result.tables["edges"]
    grid = _grid(edges)
    n_layers, n_heads, n_kv = grid
    score = edges[method].to_numpy(dtype=float)
    if max_edges is None:
        shown = edges[edges[f"{method}_in_circuit"].astype(bool)]
        what = f"{method}'s chosen circuit: {len(shown)} of {len(edges)} edges"
    else:
        order = np.argsort(-np.nan_to_num(np.abs(score), nan=-1.0), kind="stable")
        shown = edges.iloc[order[: max(0, int(max_edges))]]
        what = f"{method}: the top {len(shown)} of {len(edges)} edges by |score|"
    values = shown[method].to_numpy(dtype=float)
    top = float(np.nanmax(np.abs(values))) if len(values) and np.isfinite(values).any() else 1.0
    fig = go.Figure()
    touched = set(shown["sender"]) | {_node(str(r)) for r in shown["receiver"]}
    nodes = ["embed", "logits", *(f"L{la}.mlp" for la in range(n_layers)),
             *(f"L{la}H{h}" for la in range(n_layers) for h in range(n_heads)),
             *(f"L{la}KV{g}" for la in range(n_layers) for g in range(n_kv))]  # fmt: skip
    fig.add_trace(go.Scatter(
        x=[_position(n, grid)[0] for n in nodes], y=[_position(n, grid)[1] for n in nodes],
        mode="markers", name="nodes", showlegend=False, text=nodes,
        hovertemplate="%{text}<extra></extra>",
        marker={"size": [12 if n in ("embed", "logits") else 7 for n in nodes],
                "symbol": ["diamond" if "KV" in n else "square" if "mlp" in n else "circle"
                           for n in nodes],
                "color": ["#333" if n in touched else "#d0d0d0" for n in nodes]},
    ))  # fmt: skip
    step = np.clip(np.ceil(np.abs(np.nan_to_num(values)) / top * n_widths), 1, n_widths)
    sign = np.where(values >= 0, 1, -1)
    widest = {s: int(step[sign == s].max()) if (sign == s).any() else 0 for s in (1, -1)}
    for k in range(1, n_widths + 1):  # thin first: the strongest edges are drawn on top
        for s in (1, -1):
            rows = shown[(sign == s) & (step == k)]
            if rows.empty:
                continue
            xs: list = []
            ys: list = []
            for sender, receiver in zip(rows["sender"], rows["receiver"], strict=True):
                a, b = _position(str(sender), grid), _position(_node(str(receiver)), grid)
                cx, cy = _curve(*a, *b)
                xs += cx
                ys += cy
            color = f"rgba({SIGN_COLORS[s]},{0.25 + 0.65 * k / n_widths})"
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", hoverinfo="skip", legendgroup=str(s),
                name=f"{'positive' if s > 0 else 'negative'} score",
                showlegend=k == widest[s],
                line={"width": 0.8 + 3.2 * k / n_widths, "color": color},
            ))  # fmt: skip
    mids = [_curve(*_position(str(s), grid), *_position(_node(str(r)), grid), n=3)
            for s, r in zip(shown["sender"], shown["receiver"], strict=True)]  # fmt: skip
    fig.add_trace(go.Scatter(
        x=[m[0][1] for m in mids], y=[m[1][1] for m in mids], mode="markers", name="edges",
        showlegend=False, marker={"size": 6, "color": "rgba(0,0,0,0.01)"},
        customdata=np.stack([shown["edge"].astype(str), shown["via"].astype(str), values], 1)
        if len(shown) else None,
        hovertemplate="%{customdata[0]}<br>via %{customdata[1]}<br>score %{customdata[2]:.4g}"
        "<extra></extra>",
    ))  # fmt: skip
    fig.update_layout(
        title=f"{what} (red: positive score, blue: negative; diamonds: KV heads, squares: MLPs)",
        xaxis={"tickvals": [-1, *range(n_layers), n_layers],
               "ticktext": ["embed", *(f"L{la}" for la in range(n_layers)), "logits"],
               "showgrid": False, "zeroline": False, "title": "layer"},
        yaxis={"tickvals": [MLP_ROW, *range(n_heads)],
               "ticktext": ["MLP", *(f"H{h}" for h in range(n_heads))],
               "showgrid": False, "zeroline": False, "title": "head"},
        height=min(900, 260 + 34 * n_heads), plot_bgcolor="white",
        legend={"orientation": "h", "y": -0.15},
    )  # fmt: skip
    return fig


def _ablations(result: Any, curves: pd.DataFrame, direction: str) -> list[str]:
    have = set(curves.loc[curves["direction"] == direction, "ablation"])
    order = list(result.info.get("ablations") or dict.fromkeys(curves["ablation"]))
    return [a for a in order if a in have]


def faithfulness_figure(
    result: Any, ablations: Sequence[str] | None = None, direction: str = "ablate_complement"
) -> go.Figure:
    """Faithfulness against the pruned circuit's edge count (log x), one panel per ablation
    (``ablations``: all the run has in ``direction``): a line per method with its bootstrap
    interval (``ci_low`` .. ``ci_high``) as a band, the random orderings dashed grey (stored for
    the first ablation unless the run asked for ``random_panel``), guides at 0.8 and 1. Circuits
    pruned to 0 edges have no place on the log axis and are left out."""
    from plotly.subplots import make_subplots

    curves = result.tables["curves"]
    names = list(ablations) if ablations is not None else _ablations(result, curves, direction)
    fig = make_subplots(rows=1, cols=max(1, len(names)), shared_yaxes=True,
                        subplot_titles=[f"ablation: {a}" for a in names],
                        horizontal_spacing=0.04)  # fmt: skip
    rows = curves[(curves["direction"] == direction) & (curves["n_edges"] > 0)]
    palette = iter(("#2ca02c", "#9467bd", "#8c564b", "#e377c2"))
    colors: dict[str, str] = {}
    for col, ablation in enumerate(names, start=1):
        here = rows[rows["ablation"] == ablation]
        for ordering in dict.fromkeys(here["ordering"]):
            r = here[here["ordering"] == ordering].sort_values("n_edges")
            name = f"{ordering} · {ablation}"
            hover = (f"{name}<br>%{{x}} edges: f = %{{y:.3f}} [%{{customdata[0]:.3f}}, "
                     "%{customdata[1]:.3f}]<br>KL %{customdata[2]:.3g} · %{customdata[3]} heads"
                     "<extra></extra>")  # fmt: skip
            data = r[["ci_low", "ci_high", "kl", "n_heads"]].to_numpy()
            if str(ordering).startswith("random"):
                fig.add_scatter(x=r["n_edges"], y=r["faithfulness"], mode="lines", name=name,
                                legendgroup="random", customdata=data, hovertemplate=hover,
                                line={"color": "#9a9a9a", "dash": "dash", "width": 1.5},
                                row=1, col=col)  # fmt: skip
                continue
            color = colors.setdefault(
                str(ordering), METHOD_COLORS.get(str(ordering)) or next(palette, "#17becf")
            )
            band = "rgba({},{},{},0.15)".format(*(int(color[i : i + 2], 16) for i in (1, 3, 5)))
            fig.add_scatter(x=r["n_edges"], y=r["ci_high"], mode="lines", line={"width": 0},
                            name=f"{name} 95% CI", legendgroup=str(ordering), showlegend=False,
                            hoverinfo="skip", row=1, col=col)  # fmt: skip
            fig.add_scatter(x=r["n_edges"], y=r["ci_low"], mode="lines", line={"width": 0},
                            fill="tonexty", fillcolor=band, name=f"{name} 95% CI",
                            legendgroup=str(ordering), showlegend=False, hoverinfo="skip",
                            row=1, col=col)  # fmt: skip
            fig.add_scatter(x=r["n_edges"], y=r["faithfulness"], mode="lines+markers", name=name,
                            legendgroup=str(ordering), customdata=data, hovertemplate=hover,
                            line={"color": color, "width": 2.5}, row=1, col=col)  # fmt: skip
    for y, dash in ((0.8, "dot"), (1.0, "solid")):
        fig.add_hline(y=y, line_dash=dash, line_color="#444", line_width=1, row="all", col="all")
    f = rows.loc[rows["ablation"].isin(names), "faithfulness"].to_numpy(dtype=float)
    f = f[np.isfinite(f)]
    lo, hi = min(0.0, *f) if f.size else 0.0, max(1.0, *f) if f.size else 1.0
    pad = 0.08 * (hi - lo)  # the lines set the range: a wide bootstrap band is cut at the edge
    fig.update_yaxes(range=[lo - pad, hi + pad])
    fig.update_xaxes(type="log", title_text="edges in the circuit (pruned)")
    fig.update_yaxes(title_text="faithfulness", row=1, col=1)
    fig.update_layout(
        title=f"Faithfulness, direction {direction}: {DIRECTION_TEXT.get(direction, direction)}",
        height=430,
        legend={"orientation": "h", "y": -0.25, "traceorder": "grouped"},
    )
    return fig


def exact_scatter_figure(result: Any, method: str, *, n_labels: int = 8) -> go.Figure:
    """``method``'s estimate (x) against the exact patching effect (y) of every exactly patched
    edge, coloured by set with that set's Spearman (``exact_agreement``) in its legend entry and
    the title; the flagged edges (largest ``|estimate - exact|``) ringed, the ``n_labels`` worst
    named (those at least a fifth as far off as the worst); the line y = x."""
    import plotly.graph_objects as go

    check = result.tables["exact_check"]
    rows = check[check["method"] == method]
    agree = result.tables.get("exact_agreement")
    rho: dict[str, float] = {}
    if agree is not None and len(agree):
        mine = agree[agree["method"] == method]
        rho = dict(zip(mine["set"].astype(str), mine["spearman"].astype(float), strict=True))
    fig = go.Figure()
    for which in dict.fromkeys(rows["set"]):
        r = rows[rows["set"] == which]
        fig.add_scatter(
            x=r["estimate"], y=r["exact"], mode="markers",
            name=f"{which} (n={len(r)}, Spearman {rho.get(str(which), float('nan')):.2f})",
            marker={"color": SET_COLORS.get(str(which), "#9467bd"), "size": 7, "opacity": 0.75},
            customdata=r[["edge", "via", "abs_diff"]].astype(str).to_numpy(),
            hovertemplate="%{customdata[0]} (via %{customdata[1]})<br>estimate %{x:.4g}<br>"
            "exact %{y:.4g}<br>|diff| %{customdata[2]}<extra></extra>",
        )  # fmt: skip
    flagged = rows[rows["flagged"].astype(bool)].sort_values("abs_diff", ascending=False)
    flagged = flagged.drop_duplicates("edge")
    worst = float(flagged["abs_diff"].max()) if len(flagged) else 0.0
    pairs = zip(flagged["edge"].astype(str), flagged["abs_diff"], strict=True)
    labels = [e if i < n_labels and d >= 0.2 * worst else "" for i, (e, d) in enumerate(pairs)]
    fig.add_scatter(
        x=flagged["estimate"], y=flagged["exact"], mode="markers+text", text=labels,
        textposition=["top center" if i % 2 == 0 else "bottom center" for i in range(len(labels))],
        textfont={"size": 10}, name=f"flagged ({len(flagged)}: largest |estimate - exact|)",
        marker={"symbol": "circle-open", "size": 14, "color": "black", "line": {"width": 1.5}},
        hoverinfo="skip",
    )  # fmt: skip
    both = np.concatenate([rows["estimate"].to_numpy(float), rows["exact"].to_numpy(float)])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ends = [lo - pad, hi + pad]
    fig.add_scatter(x=ends, y=ends, mode="lines", name="y = x", hoverinfo="skip",
                    line={"color": "#444", "dash": "dot", "width": 1})  # fmt: skip
    title = ", ".join(f"{s} {v:.2f}" for s, v in rho.items())
    fig.update_layout(
        title=f"{method}: estimate vs exact patching per edge (Spearman {title or 'n/a'})",
        xaxis={"title": f"{method} estimate"},
        yaxis={"title": "exact patching effect"},
        height=480,
    )
    return fig

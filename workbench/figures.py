"""Plotly figures of stored tables (torch-free).

:func:`head_heatmap` draws any ``layer x head`` matrix (per-head results, the atlas, sinks).
:func:`layer_position_figure` draws a long-form ``grid`` table (``component, layer, pos, value``
and optionally ``head``), as written by activation and attribution patching, as a
``layer x position`` heatmap. Where the grid has one row per head and position, the heads of a
layer are summed (for patching effects of ``z`` this is the layer's total effect at that
position only to first order; the title says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go


def head_heatmap(
    mat: pd.DataFrame,
    title: str,
    colorbar: str,
    hovertemplate: str = "%{y} %{x}: %{z:.4f}<extra></extra>",
    layout: dict[str, Any] | None = None,
    **trace: Any,
) -> go.Figure:
    """Heatmap of a ``layer x head`` matrix (rows ``L0..``, columns ``H0..``, layer 0 on top);
    ``trace`` goes to ``go.Heatmap`` (e.g. ``customdata``, ``zmin``), ``layout`` to the figure."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Heatmap(
            z=mat.values,
            x=[f"H{h}" for h in mat.columns],
            y=[f"L{layer}" for layer in mat.index],
            colorscale="Viridis",
            hovertemplate=hovertemplate,
            colorbar={"title": colorbar},
            **trace,
        )
    )
    fig.update_layout(
        title=title,
        yaxis={"autorange": "reversed", "title": "layer"},
        xaxis={"title": "head"},
        **(layout or {}),
    )
    return fig


def grid_components(grid: pd.DataFrame) -> list[str]:
    """Components of ``grid`` that have a position axis (rows with a non-null ``pos``)."""
    if "pos" not in grid or "layer" not in grid:
        return []
    rows = grid[grid["pos"].notna()]
    if "component" not in rows:
        return ["all"] if len(rows) else []
    return list(dict.fromkeys(rows["component"].astype(str)))


def layer_position_matrix(grid: pd.DataFrame, component: str | None = None) -> pd.DataFrame:
    """``layer x pos`` matrix of ``value`` (summed over heads where the grid has a head axis)."""
    rows = grid[grid["pos"].notna()] if "pos" in grid else grid.iloc[0:0]
    if component is not None and component != "all" and "component" in rows:
        rows = rows[rows["component"].astype(str) == component]
    if rows.empty:
        raise WorkbenchError(
            f"no layer x position cells for component {component!r}",
            f"components with positions: {', '.join(grid_components(grid)) or '(none)'}",
        )
    rows = rows.assign(pos=rows["pos"].astype("int64"), layer=rows["layer"].astype("int64"))
    return rows.pivot_table(index="layer", columns="pos", values="value", aggfunc="sum")


def layer_position_figure(
    grid: pd.DataFrame, component: str | None = None, title: str = ""
) -> go.Figure:
    """Heatmap of :func:`layer_position_matrix`, diverging colours centred on 0."""
    import numpy as np
    import plotly.graph_objects as go

    mat = layer_position_matrix(grid, component)
    rows = grid[grid["pos"].notna()]
    summed = "head" in rows and bool((rows["head"].fillna(-1) >= 0).any())
    lim = float(np.nanmax(np.abs(mat.values))) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=mat.values,
            x=[f"{p}" for p in mat.columns],
            y=[f"L{layer}" for layer in mat.index],
            colorscale="RdBu",
            zmid=0.0,
            zmin=-lim,
            zmax=lim,
            hovertemplate="%{y} pos %{x}: %{z:.4f}<extra></extra>",
        )
    )
    label = component or "all"
    fig.update_layout(
        title=f"{title} {label}: layer x position" + (" (summed over heads)" if summed else ""),
        yaxis={"autorange": "reversed", "title": "layer"},
        xaxis={"title": "position", "type": "category"},
        height=min(900, 200 + 18 * len(mat.index)),
    )
    return fig

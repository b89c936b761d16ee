"""Edge scores and circuits of a stored ``edge_circuits`` run, and their export.

A stored run keeps one row per edge (table ``edges``: the mean score of each method and whether
the edge is in that method's chosen circuit) and its graph's shape (``info["grid"]``: layers,
heads, KV heads), so the scores come back as :class:`~workbench.edges.common.EdgeScores` (one
"prompt": the mean) without the model, and export to the EAP-IG graph JSON or auto-circuit's
table (:mod:`workbench.edges.interop`). Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.edges.graph import EdgeGraph, build_graph
from workbench.errors import WorkbenchError

FORMATS = ("eap-ig", "auto-circuit")


def run_graph(result: Any) -> EdgeGraph:
    """The edge graph of a stored ``edge_circuits`` run (one-line error for another run)."""
    grid = result.info.get("grid")
    if "edges" not in result.tables or not grid:
        raise WorkbenchError(
            f"run {result.run_id} ({result.key.get('analysis')}) holds no edge scores",
            "give the run id of an edge_circuits run",
        )
    return build_graph(*(int(x) for x in grid))


def run_scores(result: Any, method: str) -> Any:
    """``method``'s mean edge scores of a stored run, as ``EdgeScores`` over the whole graph."""
    from workbench.edges.common import EdgeScores

    graph = run_graph(result)
    edges = result.tables["edges"]
    if method not in edges.columns:
        methods = [c for c in ("eap", "eap_ig") if c in edges.columns]
        raise WorkbenchError(
            f"run {result.run_id} has no '{method}' scores", f"choose from {', '.join(methods)}"
        )
    if list(edges["edge"]) != graph.names():
        raise WorkbenchError(
            f"run {result.run_id}'s edge table does not match its graph", "recompute the run"
        )
    values = edges[method].to_numpy(dtype=float)
    return EdgeScores(graph, np.arange(len(graph)), values[None], method, str(
        result.key.get("params", {}).get("metric", "logit_diff")))  # fmt: skip


def run_circuit(result: Any, method: str) -> list[str]:
    """The edges of ``method``'s chosen circuit in a stored run."""
    edges = result.tables["edges"]
    column = f"{method}_in_circuit"
    if column not in edges.columns:
        raise WorkbenchError(f"run {result.run_id} has no '{method}' circuit", "use eap or eap_ig")
    return [str(e) for e in edges.loc[edges[column].astype(bool), "edge"]]


def export_run(result: Any, method: str, fmt: str = "eap-ig") -> dict[str, Any]:
    """The run's ``method`` scores (and, for EAP-IG's layout, its chosen circuit as
    ``in_graph``) as a JSON-ready dict in ``fmt`` (``eap-ig`` or ``auto-circuit``)."""
    from workbench.edges.interop import to_auto_circuit, to_eap_ig_json

    if fmt not in FORMATS:
        raise WorkbenchError(f"unknown edge export format '{fmt}'", f"use {' or '.join(FORMATS)}")
    scores = run_scores(result, method)
    if fmt == "eap-ig":
        return to_eap_ig_json(scores, run_circuit(result, method))
    return to_auto_circuit(scores)

"""Comparing two per-head results: how far do two scorings of the same heads agree?

For an estimate against the exact quantity it estimates (two analyses pair up by declaring an
``Agreement`` on their registry entries; Syed et al. 2023 report this rank agreement for
attribution patching), and for any pair of stored per-head runs. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.stats import pearson, ranks
from workbench.types import Agreement

__all__ = ["agreement", "compare_runs"]


def agreement(attribution: np.ndarray, exact: np.ndarray, k: int = 10) -> dict[str, float]:
    """How well attribution estimates agree with exact patching effects (same shape).

    ``spearman``: rank correlation; ``pearson``: linear correlation; ``top_k_overlap``: share of
    the ``k`` largest ``|exact|`` cells that are among the ``k`` largest ``|attribution|``.
    """
    a = np.asarray(attribution, dtype=float).ravel()
    e = np.asarray(exact, dtype=float).ravel()
    if a.shape != e.shape or a.size < 2:
        raise ValueError("agreement needs two arrays of the same size (at least 2 cells)")
    k = max(1, min(k, a.size))

    top_a = set(np.argsort(-np.abs(a), kind="mergesort")[:k].tolist())
    top_e = set(np.argsort(-np.abs(e), kind="mergesort")[:k].tolist())
    return {
        "spearman": pearson(ranks(a), ranks(e)),
        "pearson": pearson(a, e),
        "top_k_overlap": len(top_a & top_e) / k,
        "k": float(k),
    }


def compare_runs(
    store: Any,
    run_a: str,
    run_b: str,
    *,
    metric_a: str | None = None,
    metric_b: str | None = None,
    k: int = 10,
) -> dict[str, Any]:
    """:func:`agreement` of two stored per-head runs of the same model shape.

    ``run_a`` plays the estimate, ``run_b`` the reference (e.g. attribution vs exact patching).
    """
    mats = []
    for rid, metric in ((run_a, metric_a), (run_b, metric_b)):
        result = store.load(rid)
        if result.heads.empty:
            raise WorkbenchError(f"run {rid} has no per-head table", "compare per-head runs")
        metric = metric or result.metrics[0]
        if metric not in result.metrics:
            raise WorkbenchError(
                f"run {rid} has no metric '{metric}'", f"metrics: {', '.join(result.metrics)}"
            )
        mats.append((result, metric, result.matrix(metric)))
    (ra, ma, a), (rb, mb, b) = mats
    if a.shape != b.shape:
        raise WorkbenchError(
            f"runs {run_a} and {run_b} have different head grids ({a.shape} vs {b.shape})",
            "compare runs of the same model",
        )
    stats = agreement(a.to_numpy(), b.to_numpy(), k=k)
    return {
        "run_a": ra.run_id,
        "metric_a": ma,
        "analysis_a": ra.key.get("analysis"),
        "run_b": rb.run_id,
        "metric_b": mb,
        "analysis_b": rb.key.get("analysis"),
        **stats,
    }


AGREEMENT = "attribution_agreement"
"""Analysis name of a stored agreement record (derived from two stored runs, never computed
from a model, so it is not in the analysis registry)."""


Declared = Callable[[str], Agreement | None]
"""``declared(analysis)``: that analysis's :class:`~workbench.types.Agreement` declaration, or
None. The runner passes it to the after-store hook (``workbench.runner.finish_part``); callers
above the registry build it from ``REGISTRY`` (this module never imports the registry)."""


def find_counterpart(store: Any, result: Any, declared: Declared) -> Any | None:
    """The newest stored run that ``result`` can be compared with: a run of the partner its
    registry entry declares (``Analysis.agreement``, looked up with ``declared``), on the same
    model weights, prompts and task, sharing the declared parameters, and comparable itself
    (``Agreement.accepts``)."""
    mine = declared(result.key["analysis"])
    if mine is None or not mine.accepts(result.key["params"]):
        return None
    theirs = declared(mine.partner)
    rows = store.list_runs(
        model=result.key["model"], analysis=mine.partner, task=result.key["task"]
    )
    for row in rows.itertuples():
        other = store.get(row.run_id)
        if other is None:
            continue
        same = (
            other.key["model_fingerprint"] == result.key["model_fingerprint"]
            and other.key["data_hash"] == result.key["data_hash"]
            and all(other.key["params"].get(f) == result.key["params"].get(f) for f in mine.match)
        )
        if same and theirs is not None and theirs.accepts(other.key["params"]):
            return other
    return None


def record_agreement(store: Any, run: Any, declared: Declared, k: int = 10) -> str | None:
    """Store the agreement of attribution patching with exact z patching when both runs exist.

    The after-store hook of both analyses (their registry entries' ``after_store``), called
    with the result just stored (``run``: a :class:`~workbench.result.Result`, or a run id to
    read) and ``declared``, the lookup of their ``Agreement`` declarations. The estimate and
    the reference are the roles their entries declare. The record
    (analysis ``attribution_agreement``) holds the table ``agreement`` (one row:
    :func:`agreement` of the per-head effects, both run ids) and ``cells`` (layer, head,
    attribution, exact effect). Returns its run id, or None when there is no counterpart yet.
    """
    import pandas as pd

    from workbench import __version__
    from workbench.types import RunKey

    result = store.get(run) if isinstance(run, str) else run
    if result is None:
        return None
    other = find_counterpart(store, result, declared)
    if other is None:
        return None
    mine, theirs = declared(result.key["analysis"]), declared(other.key["analysis"])
    assert mine is not None and theirs is not None  # find_counterpart found both declared
    if mine.role == "estimate":
        attr, exact, a, e = result, other, mine.effects(result), theirs.effects(other)
    else:
        attr, exact, a, e = other, result, theirs.effects(other), mine.effects(result)
    stats = agreement(a, e, k=k)
    key = RunKey(
        model=attr.key["model"],
        model_fingerprint=attr.key["model_fingerprint"],
        analysis=AGREEMENT,
        params={"attribution_run": attr.run_id, "exact_run": exact.run_id, "k": k},
        task=attr.key["task"],
        data_hash=attr.key["data_hash"],
        code_version=f"{__version__}+{AGREEMENT}.1",
    )
    if store.has(key.run_id):
        return key.run_id
    n_layers, n_heads = a.shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    params = attr.key["params"]
    tables = {
        "agreement": pd.DataFrame(
            [
                {
                    "attribution_run": attr.run_id,
                    "exact_run": exact.run_id,
                    "component": "z",
                    "direction": params.get("direction"),
                    "metric": params.get("metric"),
                    **stats,
                }
            ]
        ),
        "cells": pd.DataFrame(
            {
                "layer": layer.ravel(),
                "head": head.ravel(),
                "attribution": a.ravel(),
                "exact_effect": e.ravel(),
            }
        ),
    }
    store.put(key, tables, {"agreement": stats})
    return key.run_id

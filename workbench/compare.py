"""Comparing two per-head results: how far do two scorings of the same heads agree?

Used for attribution vs exact patching (Syed et al. 2023 report the rank agreement) and for any
pair of stored per-head runs. Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.errors import WorkbenchError

__all__ = ["agreement", "compare_runs"]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


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

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x - x.mean(), y - y.mean()
        d = float(np.sqrt((x * x).sum() * (y * y).sum()))
        return float((x * y).sum() / d) if d > 0 else float("nan")

    top_a = set(np.argsort(-np.abs(a), kind="mergesort")[:k].tolist())
    top_e = set(np.argsort(-np.abs(e), kind="mergesort")[:k].tolist())
    return {
        "spearman": corr(_ranks(a), _ranks(e)),
        "pearson": corr(a, e),
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
    from workbench.results import AnalysisResult

    mats = []
    for rid, metric in ((run_a, metric_a), (run_b, metric_b)):
        stored = store.get(store.resolve(rid))
        if stored is None:
            raise WorkbenchError(f"run {rid} is damaged or gone", "run its spec again")
        result = AnalysisResult.from_stored(stored)
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

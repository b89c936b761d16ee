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
        stored = store.load(rid)
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


AGREEMENT = "attribution_agreement"
"""Analysis name of a stored agreement record (derived from two stored runs, never computed
from a model, so it is not in the analysis registry)."""

_PAIR = {
    "attribution_patching": "activation_patching",
    "activation_patching": "attribution_patching",
}


def _exact_is_head_sweep(params: dict[str, Any]) -> bool:
    return (
        params.get("component") == "z"
        and not params.get("per_position")
        and not params.get("layers")
        and params.get("positions", "from_first_diff") == "from_first_diff"
    )


def _effects(result: Any) -> np.ndarray:
    """Per-head effect ``metric(patched) - metric(base run)`` of an exact z sweep, or the
    attribution estimate of that same quantity."""
    mat = result.matrix(result.metrics[0]).to_numpy(dtype=float)
    if result.key["analysis"] == "attribution_patching":
        return mat
    info = result.manifest.get("extra", {})
    denoise = result.key["params"].get("direction", "denoising") == "denoising"
    return mat - float(info["baseline_corrupted" if denoise else "baseline_clean"])


def find_counterpart(store: Any, result: Any) -> Any | None:
    """The newest stored run that ``result`` (attribution patching, or an exact z sweep over all
    layers) can be compared with: the other method on the same model weights, prompts, BOS,
    direction and metric."""
    from workbench.results import AnalysisResult

    analysis = result.key["analysis"]
    if analysis not in _PAIR:
        return None
    mine = result.key["params"]
    if analysis == "activation_patching" and not _exact_is_head_sweep(mine):
        return None
    same = ("direction", "metric", "prepend_bos")
    rows = store.list_runs(
        model=result.key["model"], analysis=_PAIR[analysis], task=result.key["task"]
    )
    for row in rows.itertuples():
        stored = store.get(row.run_id)
        if stored is None:
            continue
        other = AnalysisResult.from_stored(stored)
        theirs = other.key["params"]
        if (
            other.key["model_fingerprint"] == result.key["model_fingerprint"]
            and other.key["data_hash"] == result.key["data_hash"]
            and other.key["task"] == result.key["task"]
            and all(theirs.get(f) == mine.get(f) for f in same)
            and (analysis == "activation_patching" or _exact_is_head_sweep(theirs))
        ):
            return other
    return None


def record_agreement(store: Any, run: Any, k: int = 10) -> str | None:
    """Store the agreement of attribution patching with exact z patching when both runs exist.

    The after-store hook of both analyses (their registry entries' ``after_store``), called
    with the result just stored (``run``: a ``StoredResult``, or a run id to read). The record
    (analysis ``attribution_agreement``) holds the table ``agreement`` (one row:
    :func:`agreement` of the per-head effects, both run ids) and ``cells`` (layer, head,
    attribution, exact effect). Returns its run id, or None when there is no counterpart yet.
    """
    import pandas as pd

    from workbench import __version__
    from workbench.results import AnalysisResult
    from workbench.types import RunKey

    stored = store.get(run) if isinstance(run, str) else run
    if stored is None:
        return None
    result = AnalysisResult.from_stored(stored)
    other = find_counterpart(store, result)
    if other is None:
        return None
    attr, exact = (
        (result, other)
        if result.key["analysis"] == "attribution_patching"
        else (
            other,
            result,
        )
    )
    a, e = _effects(attr), _effects(exact)
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

"""The statistics every analysis and post-processing step shares (numpy only, torch-free).

- :func:`mean_stderr`: mean and standard error ``std(ddof=1) / sqrt(n)`` over axis 0;
- :func:`pooled`: the same over all samples, from per-group means and standard errors;
- :func:`ranks`: ranks with ties averaged (as ``scipy.stats.rankdata``, 0-based);
- :func:`pearson`: ``sum(x' y') / sqrt(sum(x'^2) sum(y'^2))`` with ``x' = x - mean(x)``;
- :func:`spearman`: Pearson of the ranks, over the cells finite in both;
- :func:`hypergeom_sf`: ``P(X >= observed)`` for the intersection ``X = |A & B|`` of a fixed
  ``A`` and a uniform random ``B`` of ``N`` items, exact (integer arithmetic);
- :func:`permutation_p`: the same by drawing random ``B``:
  ``(1 + #{X* >= observed}) / (1 + n_permutations)``;
- :func:`random_rank`: where a value falls among the random controls' values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "hypergeom_sf",
    "mean_stderr",
    "pearson",
    "permutation_p",
    "pooled",
    "random_rank",
    "ranks",
    "spearman",
]


def mean_stderr(samples: Any) -> tuple[Any, Any]:
    """Mean and standard error over axis 0 (the samples): ``std(ddof=1) / sqrt(n)``, 0 if n = 1."""
    x = np.asarray(samples, dtype=np.float64)
    n = x.shape[0]
    se = x.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(x.shape[1:])
    return x.mean(axis=0), se


def pooled(
    means: Sequence[Any], stderrs: Sequence[Any | None], ns: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and standard error over all samples from per-group means / standard errors
    (module doc); NaN entries of a group are left out of that entry."""
    m = np.stack([np.asarray(x, dtype=np.float64) for x in means])
    n = np.asarray(ns, dtype=np.float64).reshape(-1, *([1] * (m.ndim - 1)))
    w = np.where(np.isnan(m), 0.0, n)
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(total > 0, np.nansum(m * w, axis=0) / total, np.nan)
        if any(s is None for s in stderrs):
            return mean, None
        s = np.stack([np.asarray(x, dtype=np.float64) for x in stderrs])  # type: ignore[arg-type]
        within = (w - np.where(w > 0, 1.0, 0.0)) * w * np.nan_to_num(s) ** 2
        between = w * np.nan_to_num(m - mean) ** 2
        var = (within + between).sum(axis=0) / (total - 1)
        se = np.where(total > 1, np.sqrt(var / total), np.where(total == 1, 0.0, np.nan))
    return mean, se


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=float)
    r[order] = np.arange(len(x), dtype=float)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Linear correlation (module docstring); NaN when either side is constant."""
    x, y = x - x.mean(), y - y.mean()
    d = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / d) if d > 0 else float("nan")


def hypergeom_sf(observed: int, n_total: int, size_a: int, size_b: int) -> float:
    """``P(X >= observed)`` for ``X = |A & B|``, ``B`` a uniform random ``size_b``-subset."""
    denom = math.comb(n_total, size_b)
    hi = min(size_a, size_b)
    num = sum(
        math.comb(size_a, x) * math.comb(n_total - size_a, size_b - x)
        for x in range(max(observed, 0), hi + 1)
    )
    return num / denom


def permutation_p(
    a_idx: np.ndarray, size_b: int, n_total: int, observed: int, n_permutations: int, seed: int
) -> float:
    """Permutation p-value of ``|A & B|`` for ``A`` (indices ``a_idx``) and random
    ``size_b``-subsets ``B`` of ``n_total`` items (module docstring), seeded."""
    rng = np.random.default_rng(seed)
    in_a = np.zeros(n_total, dtype=bool)
    in_a[a_idx] = True
    hits = 0
    chunk = max(1, 2_000_000 // max(n_total, 1))
    done = 0
    while done < n_permutations:
        m = min(chunk, n_permutations - done)
        draws = np.argsort(rng.random((m, n_total)), axis=1)[:, :size_b]
        hits += int((in_a[draws].sum(axis=1) >= observed).sum())
        done += m
    return (1 + hits) / (1 + n_permutations)


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman rank correlation over the cells finite in both, and their number (NaN below 3)."""
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3:
        return float("nan"), n
    return pearson(ranks(x[ok]), ranks(y[ok])), n


def random_rank(value: float, randoms: Any) -> tuple[float, float]:
    """Where ``value`` falls among random controls ``r_1..r_n`` (larger is better):
    ``percentile = 100 (#{r_i < v} + #{r_i = v} / 2) / n`` and the one-sided permutation
    p-value ``p = (1 + #{r_i >= v}) / (1 + n)`` (a random control as good or better)."""
    r = np.asarray(randoms, dtype=np.float64)
    if r.size == 0:
        return float("nan"), float("nan")
    pct = 100.0 * (float((r < value).sum()) + 0.5 * float((r == value).sum())) / r.size
    return pct, (1.0 + float((r >= value).sum())) / (1.0 + r.size)

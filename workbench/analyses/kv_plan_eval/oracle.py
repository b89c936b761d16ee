"""Every plan of a small grid, ranked, and where each scoring rule's plans fall in the ranking.

With ``m`` streamable KV heads (Gemma 3 above its 512-token sliding window: the one KV head of
each of its 3 global layers, so ``m = 3``) there are ``2^m`` plans. Each is run on the same
samples (by ``compute.py``) and ranked by needle recall, ties broken by the answer's
log-probability (rank 1 = best), over all plans and among the plans with the same number ``k``
of full heads. For every score in the KV-head table and every ``0 < k < m``, the score's top-``k``
plan is located in the ranking of the ``C(m, k)`` plans with ``k`` full heads: rank 1 means the
score picked the best plan of that budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.forward.plan import KVPlan

MAX_HEADS = 10


def _label(heads: Sequence[tuple[int, int]]) -> str:
    return "+".join(f"L{a}G{b}" for a, b in sorted(heads)) or "none"


def _subsets(pool: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], ...]]:
    """Every subset of ``pool`` (the full KV heads of one plan), smallest first."""
    return [c for k in range(len(pool) + 1) for c in itertools.combinations(pool, k)]


def oracle_plans(plan: KVPlan) -> dict[str, KVPlan]:
    """Every plan over ``plan``'s streamable KV heads, ``2^m`` of them, by label."""
    pool = plan.streamable
    if len(pool) > MAX_HEADS:
        raise WorkbenchError(
            f"the oracle evaluates 2^{len(pool)} plans; it is for at most {MAX_HEADS} "
            "streamable KV heads",
            "set oracle = false, or use a model with fewer global KV heads (Gemma 3)",
        )
    return {_label(c): plan.replace(c, "oracle") for c in _subsets(pool)}


def rank_plans(
    plan: KVPlan, every: Mapping[str, np.ndarray], means: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(oracle, rule_ranks)`` tables (module docstring) from the per-plan mean metrics of
    the :func:`oracle_plans` (``means``: one row per plan label, recall and logprob columns)."""
    pool = plan.streamable
    subsets = _subsets(pool)
    rows = pd.DataFrame(
        [{"plan": _label(c), "n_full": len(c), **means.loc[_label(c)].to_dict()} for c in subsets]
    )
    key = ["recall", "logprob"]
    rows = rows.sort_values(key, ascending=False, kind="mergesort").reset_index(drop=True)
    rows["rank"] = np.arange(1, len(rows) + 1)
    rows["rank_at_k"] = rows.groupby("n_full").cumcount() + 1
    ranks = []
    for metric, scores in sorted(every.items()):
        vals = np.asarray([scores[h] for h in pool], dtype=float)
        if not np.isfinite(vals).all():
            continue
        order = [pool[i] for i in np.argsort(-vals, kind="mergesort")]
        for k in range(1, len(pool)):
            label = _label(order[:k])
            hit = rows[rows["plan"] == label].iloc[0]
            best = rows[rows["n_full"] == k].iloc[0]
            ranks.append({
                "score": metric, "k": k, "plan": label, "rank_at_k": int(hit["rank_at_k"]),
                "of": int((rows["n_full"] == k).sum()), "recall": float(hit["recall"]),
                "logprob": float(hit["logprob"]), "best_plan": best["plan"],
                "best_recall": float(best["recall"]),
            })  # fmt: skip
    return rows, pd.DataFrame(ranks)

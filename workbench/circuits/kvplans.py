"""KV-cache plans from head scores (torch-free): which KV heads keep their whole cache.

A :class:`~workbench.forward.plan.KVPlan` gives every KV head ``full`` or ``stream`` (sink +
window, with or without a compensation token); its ``kv_fraction(N)`` is the budget accounting
of the definitions page (``docs/definitions.md``). Rules over per-KV-head scores
(``scores[l, g]``, e.g. the ``kv_heads`` table of ``kv_head_scores``, max-pooled):

- ``razor``: the top ``induction_share`` (14 %) of KV heads by induction and the top
  ``echo_share`` (1 %, at least one head) by echo, ranked across all layers, are full
  (Tang et al. 2024); ``ceil(share * n)`` heads each;
- ``top_k``: the ``k`` KV heads with the largest score are full;
- ``threshold``: every KV head with score ``> threshold`` is full;
- ``quantile``: the top ``ceil((1 - quantile) n)`` KV heads by score are full (DuoAttention
  thresholds its gates at a quantile; by rank, so tied scores such as gates stuck at 1 still
  give the stated share);
- ``budget``: the most heads in score order such that ``kv_fraction(N) <= budget``.

NaN scores are never chosen; ties go by (layer, kv_head). Each plan records its provenance
(rule, parameters, source runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.forward.plan import KVPlan

if TYPE_CHECKING:
    import pandas as pd

RULES = ("razor", "top_k", "threshold", "quantile", "budget")


def _order(scores: np.ndarray) -> list[tuple[int, int]]:
    """KV heads by descending score, NaN left out, ties by (layer, kv_head)."""
    flat = np.asarray(scores, dtype=float).ravel()
    idx = [int(i) for i in np.argsort(-flat, kind="mergesort") if np.isfinite(flat[i])]
    n_kv = scores.shape[1]
    return [(i // n_kv, i % n_kv) for i in idx]


def kv_scores(kv_table: Any, metric: str, grid: tuple[int, int], column: str = "max") -> np.ndarray:
    """``[n_layers, n_kv_heads]`` scores of ``metric`` from a ``kv_heads`` table."""
    rows = kv_table[kv_table["metric"] == metric]
    if rows.empty:
        raise WorkbenchError(f"no KV-head scores of '{metric}'", "run kv_head_scores first")
    if column not in rows.columns:
        raise WorkbenchError(
            f"the KV-head scores have no '{column}' column (a run stored before it was written)",
            f"use one of {', '.join(c for c in KV_POOLS if c in rows.columns)}, or run the "
            "scores again",
        )
    mat = np.full(grid, np.nan)
    mat[rows["layer"].to_numpy(), rows["kv_head"].to_numpy()] = rows[column].to_numpy()
    return mat


KV_POOLS = ("max", "mean", "sum")
"""The columns of a ``kv_heads`` table: a metric pooled over the query heads of a KV head."""


def head_rows(scores: Mapping[str, Any]) -> pd.DataFrame:
    """A per-head table (layer, head, metric, value) of ``scores[metric]``, ``[n_layers, n]``
    arrays (query heads, or KV heads), for :func:`pool_kv_heads`."""
    import pandas as pd

    frames = []
    for metric, values in scores.items():
        grid = np.asarray(values, dtype=float)
        layer, head = np.divmod(np.arange(grid.size), grid.shape[1])
        frames.append(pd.DataFrame({"layer": layer, "head": head, "metric": metric,
                                    "value": grid.ravel()}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def pool_kv_heads(
    heads: Any, n_kv_heads: int, axis: str = "head", n_heads: int | None = None
) -> pd.DataFrame:
    """The ``kv_heads`` table (layer, kv_head, metric, max, mean, sum) of a per-head table
    (layer, head, metric, value): of query heads (``axis`` "head": KV head ``g`` pools query
    heads ``g * group .. (g + 1) * group - 1``, ``group = n_heads / n_kv_heads``, ``n_heads``
    the table's by default; NaN values left out) or of KV heads already (``axis`` "kv_head":
    max = mean = sum = the value). The one pooling every KV-head table is built with
    (:func:`head_rows` turns score arrays into its input)."""
    import pandas as pd

    rows = heads.dropna(subset=["value"])
    if axis == "kv_head":
        out = rows.assign(kv_head=rows["head"], max=rows["value"], mean=rows["value"],
                          sum=rows["value"])  # fmt: skip
        return out[["layer", "kv_head", "metric", *KV_POOLS]].reset_index(drop=True)
    if axis != "head":
        raise WorkbenchError(
            f"per-layer scores ({axis}) cannot rank KV heads", "use a per-head run"
        )
    n_heads = int(rows["head"].max()) + 1 if n_heads is None else n_heads
    if n_heads % n_kv_heads:
        raise WorkbenchError(f"{n_heads} query heads do not split into {n_kv_heads} KV heads",
                             "check the model")  # fmt: skip
    group = n_heads // n_kv_heads
    g = rows.assign(kv_head=rows["head"] // group)
    agg = g.groupby(["layer", "kv_head", "metric"])["value"].agg(list(KV_POOLS))
    return pd.DataFrame(agg.reset_index())


def build_plan(
    model: str,
    rule: str,
    scores: Mapping[str, np.ndarray],
    *,
    sink: int = 4,
    window: int = 256,
    compensation: bool = True,
    weighted: bool = True,
    native: Mapping[int, int] | None = None,
    sources: Iterable[str] = (),
    **params: Any,
) -> KVPlan:
    """A plan by ``rule`` (module docstring) over ``scores`` (``{"induction": ..., "echo":
    ...}`` for razor; ``{"score": ...}`` for the others), each ``[n_layers, n_kv_heads]``."""
    if rule not in RULES:
        raise WorkbenchError(f"unknown KV plan rule '{rule}'", f"choose from {', '.join(RULES)}")
    first = next(iter(scores.values()))
    grid = (int(first.shape[0]), int(first.shape[1]))
    slide = tuple(sorted((int(k), int(v)) for k, v in (native or {}).items()))
    scores = {m: _without(v, slide) for m, v in scores.items()}
    n = (grid[0] - len(slide)) * grid[1]  # KV heads the rule chooses between
    if rule == "razor":
        ind_share = float(params.get("induction_share", 0.14))
        echo_share = float(params.get("echo_share", 0.01))
        if not (0 < ind_share <= 1 and 0 <= echo_share <= 1):
            raise WorkbenchError("razor: shares must be in (0, 1]", "e.g. induction_share 0.14")
        full = set(_order(scores["induction"])[: math.ceil(ind_share * n)])
        full |= set(_order(scores["echo"])[: max(1, math.ceil(echo_share * n))])
        used = {"induction_share": ind_share, "echo_share": echo_share}
    else:
        order = _order(scores["score"])
        if rule == "top_k":
            k = int(params.get("k", 0))
            if not 1 <= k <= len(order):
                raise WorkbenchError(f"top_k: k must be in 1..{len(order)}, got {k}", "fix k")
            full, used = set(order[:k]), {"k": k}
        elif rule == "threshold":
            t = float(params["threshold"])
            flat = np.asarray(scores["score"], dtype=float)
            full, used = {h for h in order if flat[h] > t}, {"threshold": t}
        elif rule == "quantile":
            q = float(params.get("quantile", 0.5))
            if not 0 <= q < 1:
                raise WorkbenchError(f"quantile must be in [0, 1), got {q}", "e.g. 0.5")
            keep = math.ceil((1 - q) * len(order))  # by rank: ties (gates at 1) still split
            full, used = set(order[:keep]), {"quantile": q, "kept": keep}
        else:  # budget
            budget, n_ctx = float(params.get("budget", 0)), int(params.get("n_ctx", 0))
            if not 0 < budget <= 1:
                raise WorkbenchError(f"budget must be in (0, 1], got {budget}", "e.g. 0.3")
            full, used = set(), {"budget": budget, "n_ctx": n_ctx}
            for head in order:
                trial = KVPlan(
                    model, grid, frozenset(full | {head} | _native_heads(slide, grid)), sink,
                    window, compensation, weighted, slide,
                )  # fmt: skip
                if trial.kv_fraction(n_ctx) > budget:
                    break
                full.add(head)
    return KVPlan(
        model, grid, frozenset(full | _native_heads(slide, grid)), sink, window, compensation,
        weighted, slide, rule, used, tuple(sources),
    )  # fmt: skip


def _native_heads(
    slide: tuple[tuple[int, int], ...], grid: tuple[int, int]
) -> set[tuple[int, int]]:
    return {(lay, g) for lay, _ in slide for g in range(grid[1])}


def _without(scores: np.ndarray, slide: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``scores`` with the natively sliding layers' rows NaN (never chosen)."""
    out = np.array(scores, dtype=float, copy=True)
    for lay, _ in slide:
        out[lay] = np.nan
    return out


def controls(
    plan: KVPlan, n_random: int, seed: int, scores: np.ndarray | None = None
) -> dict[str, KVPlan]:
    """Plans at ``plan``'s number of full KV heads to judge it against: ``n_random`` uniform
    random sets (``random_u{i}``), ``n_random`` with ``plan``'s per-layer counts of full heads
    (``random_l{i}``), ``all_stream``, ``all_full`` and, given the scores the plan was ranked
    by, the ``anti`` plan (the lowest-scored heads full). Seeded; every plan distinct from
    ``plan`` where the grid allows."""
    rng = np.random.default_rng(seed)
    pool = plan.streamable
    chosen = [h for h in pool if h in plan.full]
    k = len(chosen)
    out: dict[str, KVPlan] = {}
    for i in range(n_random):
        pick: list[int] = rng.choice(len(pool), size=k, replace=False).tolist() if k else []
        out[f"random_u{i}"] = plan.replace(
            [pool[j] for j in pick], "random_uniform", seed=seed, i=i
        )
    per_layer: dict[int, int] = {}
    for lay, _ in chosen:
        per_layer[lay] = per_layer.get(lay, 0) + 1
    for i in range(n_random):
        full = []
        for lay, c in per_layer.items():
            heads = [h for h in pool if h[0] == lay]
            full += [heads[j] for j in rng.choice(len(heads), size=c, replace=False)]
        out[f"random_l{i}"] = plan.replace(full, "random_layer_matched", seed=seed, i=i)
    out["all_stream"] = plan.replace([], "all_stream")
    out["all_full"] = plan.replace(pool, "all_full")
    if scores is not None:
        order = _order(-_without(scores, plan.native))
        out["anti"] = plan.replace(order[:k], "anti")
    return out


PLAN_ANALYSIS = "kv_plan"
"""Analysis name of a stored plan (derived from stored scores, not a registry entry)."""


def save_plan(store: Any, plan: KVPlan) -> str:
    """Store ``plan`` as a run of ``kv_plan`` keyed by its content (``plan_id``): table
    ``heads`` (layer, kv_head, policy), the plan JSON in the manifest; returns the run id."""
    import pandas as pd

    from workbench import __version__
    from workbench.types import RunKey

    fingerprint = data_hash = ""
    if plan.sources:
        source = store.load(plan.sources[0])
        fingerprint, data_hash = source.key["model_fingerprint"], source.key["data_hash"]
    key = RunKey(
        model=plan.model, model_fingerprint=fingerprint, analysis=PLAN_ANALYSIS,
        params={"plan_id": plan.plan_id, "rule": plan.rule}, task="kv_plan",
        data_hash=data_hash, code_version=f"{__version__}+{PLAN_ANALYSIS}.1",
    )  # fmt: skip
    rows = [
        {"layer": lay, "kv_head": g, "policy": "full" if (lay, g) in plan.full else "stream"}
        for lay in range(plan.grid[0])
        for g in range(plan.grid[1])
    ]
    return str(
        store.put(key, {"heads_policy": pd.DataFrame(rows)}, {"plan": plan.to_dict()}).run_id
    )


def load_plan(store: Any, run_id: str) -> KVPlan:
    """The plan stored by :func:`save_plan` under ``run_id`` (a prefix is enough)."""
    stored = store.load(run_id)
    body = stored.info.get("plan")
    if stored.key.get("analysis") != PLAN_ANALYSIS or body is None:
        raise WorkbenchError(
            f"run {stored.run_id} is a {stored.key.get('analysis')} run, not a KV plan",
            "give the run id save_plan returned",
        )
    return KVPlan.from_dict(body)

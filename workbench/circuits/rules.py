"""Circuits from stored per-head scores (torch-free): the rules and their union.

A :class:`~workbench.types.Circuit` (in ``workbench.types``) is a frozen set of components of one
model with roles, its derivation and its faithfulness. Rules over any stored per-head score
``s[l, h]`` (``|s|`` with ``absolute=True``; NaN cells, e.g. heads a path-patching run did not
send from, are never chosen; ties are broken by (layer, head) order):

- ``top_k``:     the ``k`` heads with the largest score (``1 <= k <= #scored heads``);
- ``threshold``: every head with score ``> threshold``;
- ``top_share``: the top ``ceil(share * #scored heads)`` heads (Merullo et al. 2023 take the top
  2 % of heads per path-patching stage; a stage is one run, and :func:`union` joins stages);
- ``minimal_faithful``: the smallest top-``k`` set (by score order) whose faithfulness reaches a
  stated share; it needs the model: :mod:`workbench.circuits.faithfulness`.

"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.circuits.io import circuit_to_dict
from workbench.errors import WorkbenchError
from workbench.types import (
    Circuit,
    Component,
    Derivation,
    Head,
    canonical_json,
)

if TYPE_CHECKING:
    from workbench.store import ResultStore

__all__ = ["RULES", "derive_circuit", "run_scores", "select_heads", "union"]

RULES = ("top_k", "threshold", "top_share")


def _ranked(scores: np.ndarray, absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the scored cells, best first (stable: ties by layer, head), and keys."""
    key = np.abs(scores) if absolute else scores
    flat = key.ravel()
    scored = np.flatnonzero(np.isfinite(flat))
    order = scored[np.argsort(-flat[scored], kind="stable")]
    return order, flat


def select_heads(
    scores: Any,
    rule: str,
    *,
    k: int | None = None,
    threshold: float | None = None,
    share: float | None = None,
    absolute: bool = False,
) -> list[Head]:
    """The heads a rule picks from a ``[n_layers, n_heads]`` score matrix, best first."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise WorkbenchError(
            f"scores must be a [n_layers, n_heads] matrix, got shape {s.shape}", "pass a matrix"
        )
    order, flat = _ranked(s, absolute)
    n_scored = len(order)
    if n_scored == 0:
        raise WorkbenchError("no head has a finite score", "check the source run")
    if rule == "top_k":
        if k is None or not isinstance(k, int | np.integer) or k < 1:
            raise WorkbenchError(f"top_k needs a whole k >= 1, got {k!r}", "pass k=10, say")
        if k > n_scored:
            raise WorkbenchError(
                f"k = {k} is larger than the number of heads scored ({n_scored})",
                f"choose k <= {n_scored}",
            )
        chosen = order[:k]
    elif rule == "top_share":
        if share is None or not 0 < share <= 1:
            raise WorkbenchError(
                f"top_share needs 0 < share <= 1, got {share!r}", "pass share=0.02 (the top 2%)"
            )
        chosen = order[: max(1, math.ceil(share * n_scored - 1e-9))]
    elif rule == "threshold":
        if threshold is None or not math.isfinite(threshold):
            raise WorkbenchError("threshold needs a finite threshold", "pass threshold=0.1, say")
        chosen = order[flat[order] > threshold]
        if len(chosen) == 0:
            raise WorkbenchError(
                f"no head scores above {threshold:g} (the largest is {flat[order[0]]:.4g})",
                "lower the threshold",
            )
    else:
        raise WorkbenchError(f"unknown circuit rule '{rule}'", f"choose from {', '.join(RULES)}")
    n_heads = s.shape[1]
    return [Head(int(i // n_heads), int(i % n_heads)) for i in chosen]


def run_scores(
    store: ResultStore, run_id: str, metric: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """A stored run's ``[n_layers, n_heads]`` score matrix of ``metric`` and facts about it."""
    stored = store.load(run_id)
    heads = stored.tables.get("heads")
    if heads is None or heads.empty:
        raise WorkbenchError(f"run {stored.run_id} has no per-head scores", "use a per-head run")
    if stored.head_axis == "kv_head":
        raise WorkbenchError(
            f"run {stored.run_id} scores KV heads, not query heads",
            "derive circuits from a per-query-head run (activation patching of z or q)",
        )
    metrics = list(dict.fromkeys(heads["metric"]))
    metric = metric or metrics[0]
    if metric not in metrics:
        raise WorkbenchError(
            f"run {stored.run_id} has no metric '{metric}'", f"metrics: {', '.join(metrics)}"
        )
    rows = heads[heads["metric"] == metric]
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    mat = np.full((n_layers, n_heads), np.nan)
    mat[rows["layer"].to_numpy(), rows["head"].to_numpy()] = rows["value"].to_numpy()
    key = stored.key
    info = {
        "run_id": stored.run_id,
        "model": key["model"],
        "analysis": key["analysis"],
        "task": key["task"],
        "metric": metric,
        "model_fingerprint": key["model_fingerprint"],
        "data_hash": key["data_hash"],
    }
    return mat, info


def derive_circuit(
    store: ResultStore,
    run_id: str,
    rule: str = "top_k",
    *,
    metric: str | None = None,
    k: int | None = None,
    threshold: float | None = None,
    share: float | None = None,
    absolute: bool = False,
    role: str | None = None,
) -> Circuit:
    """The circuit a rule picks from a stored run's per-head scores (module docstring).

    Every chosen head gets ``role`` (default: ``"<metric> (<task>)"``).
    """
    scores, info = run_scores(store, run_id, metric)
    heads = select_heads(scores, rule, k=k, threshold=threshold, share=share, absolute=absolute)
    params = {"k": k, "threshold": threshold, "share": share, "absolute": absolute}
    derivation = Derivation(
        rule=rule,
        params_json=canonical_json({n: v for n, v in params.items() if v is not None}),
        source_run=info["run_id"],
        analysis=info["analysis"],
        metric=info["metric"],
        task=info["task"],
    )
    label = role or f"{info['metric']} ({info['task']})"
    return Circuit.of(info["model"], heads, derivation, scores.shape, {h: label for h in heads})


def union(circuits: Iterable[Circuit], *, allow_cross_model: bool = False) -> Circuit:
    """One circuit holding every component of ``circuits`` (e.g. the stages of path patching);
    roles are joined with ``" + "`` where a component has several."""
    cs = list(circuits)
    if not cs:
        raise WorkbenchError("union of no circuits", "give at least one circuit")
    models = {c.model for c in cs}
    if len(models) > 1 and not allow_cross_model:
        raise WorkbenchError(
            f"circuits of different models ({', '.join(sorted(models))})",
            "join circuits of one model",
        )
    roles: dict[Component, list[str]] = {}
    for c in cs:
        for comp, r in c.roles:
            roles.setdefault(comp, []).append(r)
    derivation = Derivation(
        rule="union",
        params_json=canonical_json({"parts": [circuit_to_dict(c) for c in cs]}),
        source_run=",".join(c.derivation.source_run for c in cs),
        task=",".join(dict.fromkeys(c.derivation.task for c in cs)),
    )
    return Circuit.of(
        cs[0].model,
        frozenset().union(*(c.components for c in cs)),
        derivation,
        cs[0].grid,
        {comp: " + ".join(dict.fromkeys(r)) for comp, r in roles.items()},
    )

"""Circuits from stored per-head scores (torch-free): rules, union, JSON, the store.

A :class:`~workbench.types.Circuit` (in ``workbench.types``) is a frozen set of components of one
model with roles, its derivation and its faithfulness. Rules over any stored per-head score
``s[l, h]`` (``|s|`` with ``absolute=True``; NaN cells, e.g. heads a path-patching run did not
send from, are never chosen; ties are broken by (layer, head) order):

- ``top_k``:     the ``k`` heads with the largest score (``1 <= k <= #scored heads``);
- ``threshold``: every head with score ``> threshold``;
- ``top_share``: the top ``ceil(share * #scored heads)`` heads (Merullo et al. 2023 take the top
  2 % of heads per path-patching stage; a stage is one run, and :func:`union` joins stages);
- ``minimal_faithful``: the smallest top-``k`` set (by score order) whose faithfulness reaches a
  stated share; it needs the model: :mod:`workbench.methods.circuit_faithfulness`.

Storage: :func:`save_circuit` writes a circuit through :meth:`ResultStore.put` as a run of the
derived analysis ``"circuit"`` (not a registry entry: nothing to compute from a model), keyed by
the source run's model fingerprint and data hash plus the rule and its parameters; its table
``components`` lists ``kind, layer, head, role, score``; ``manifest["extra"]["circuit"]`` holds
the circuit as JSON (:func:`circuit_to_dict`). :func:`load_circuit` reads it back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.types import (
    MLP,
    Circuit,
    Component,
    Derivation,
    Edge,
    Head,
    RunKey,
    canonical_json,
    component_sort_key,
    sha256_hex,
)

if TYPE_CHECKING:
    from workbench.store import ResultStore

__all__ = [
    "RULES",
    "circuit_from_dict",
    "circuit_to_dict",
    "derive_circuit",
    "load_circuit",
    "run_scores",
    "save_circuit",
    "select_heads",
    "union",
]

RULES = ("top_k", "threshold", "top_share")
CIRCUIT_ANALYSIS = "circuit"


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
    if stored.manifest.get("extra", {}).get("head_axis") == "kv_head":
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


def _comp_to(c: Component) -> dict[str, Any]:
    if isinstance(c, Head):
        return {"kind": "head", "layer": c.layer, "head": c.head}
    if isinstance(c, MLP):
        return {"kind": "mlp", "layer": c.layer}
    sender, receiver = _comp_to(c.sender), _comp_to(c.receiver)
    return {"kind": "edge", "sender": sender, "receiver": receiver, "via": c.via}


def _comp_from(d: Mapping[str, Any]) -> Component:
    kind = d.get("kind")
    if kind == "head":
        return Head(int(d["layer"]), int(d["head"]))
    if kind == "mlp":
        return MLP(int(d["layer"]))
    if kind == "edge":
        s, r = _comp_from(d["sender"]), _comp_from(d["receiver"])
        if isinstance(s, Edge) or isinstance(r, Edge):
            raise WorkbenchError("an edge joins heads or MLPs, not edges", "fix the circuit JSON")
        return Edge(s, r, str(d.get("via", "")))
    raise WorkbenchError(f"unknown component kind {kind!r}", "use head, mlp or edge")


def circuit_to_dict(c: Circuit) -> dict[str, Any]:
    """Plain JSON-able form of a circuit (inverse: :func:`circuit_from_dict`)."""
    d = c.derivation
    return {
        "model": c.model,
        "grid": list(c.grid),
        "components": [_comp_to(x) for x in c.sorted_components()],
        "roles": [[_comp_to(x), r] for x, r in c.roles],
        "derivation": {
            "rule": d.rule,
            "params": d.params,
            "source_run": d.source_run,
            "analysis": d.analysis,
            "metric": d.metric,
            "task": d.task,
        },
        "faithfulness": c.faithfulness,
    }


def circuit_from_dict(data: Mapping[str, Any]) -> Circuit:
    try:
        d = data["derivation"]
        derivation = Derivation(
            rule=str(d["rule"]),
            params_json=canonical_json(d.get("params", {})),
            source_run=str(d.get("source_run", "")),
            analysis=str(d.get("analysis", "")),
            metric=str(d.get("metric", "")),
            task=str(d.get("task", "")),
        )
        grid = (int(data["grid"][0]), int(data["grid"][1]))
        comps = [_comp_from(x) for x in data["components"]]
        roles = {_comp_from(x): str(r) for x, r in data.get("roles", [])}
        faith = data.get("faithfulness")
        return Circuit.of(
            str(data["model"]), comps, derivation, grid, roles,
            None if faith is None else float(faith),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise WorkbenchError(
            f"malformed circuit JSON ({e})", "write it with circuit_to_dict"
        ) from None


def circuit_json(c: Circuit) -> str:
    return json.dumps(circuit_to_dict(c), indent=1)


def save_circuit(
    store: ResultStore,
    circuit: Circuit,
    scores: Any | None = None,
    extra_key: Mapping[str, Any] | None = None,
) -> str:
    """Store ``circuit`` as a run of the derived analysis ``"circuit"``; return its run id.

    The key is the source run's model fingerprint and data hash plus the rule, the source run,
    the metric and a hash of the whole circuit JSON (components, roles, derivation parameters,
    faithfulness), so re-deriving the same circuit finds the stored one;
    ``scores`` (a ``[n_layers, n_heads]`` matrix) fills the ``score`` column.
    """
    import pandas as pd

    from workbench import __version__

    src = circuit.derivation.source_run.split(",")[0]
    fingerprint, data_hash = "", ""
    if src:
        stored = store.get(store.resolve(src))
        if stored is not None:
            fingerprint = str(stored.key["model_fingerprint"])
            data_hash = str(stored.key["data_hash"])
    body = circuit_to_dict(circuit)
    key = RunKey(
        model=circuit.model,
        model_fingerprint=fingerprint,
        analysis=CIRCUIT_ANALYSIS,
        params={
            "rule": circuit.derivation.rule,
            "source_run": circuit.derivation.source_run,
            "metric": circuit.derivation.metric,
            "circuit_sha256": sha256_hex(canonical_json(body))[:16],
            **dict(extra_key or {}),
        },
        task=circuit.derivation.task or "-",
        data_hash=data_hash,
        code_version=f"{__version__}+circuit.1",
    )
    s = None if scores is None else np.asarray(scores, dtype=np.float64)
    roles = circuit.role_map
    rows = []
    for comp in circuit.sorted_components():
        score = np.nan
        if isinstance(comp, Head) and s is not None:
            score = float(s[comp.layer, comp.head])
        rows.append(
            {
                "kind": type(comp).__name__.lower(),
                "component": str(comp),
                "layer": comp.layer if isinstance(comp, Head | MLP) else -1,
                "head": comp.head if isinstance(comp, Head) else -1,
                "role": roles.get(comp, ""),
                "score": score,
            }
        )
    stored = store.put(key, {"components": pd.DataFrame(rows)}, {"circuit": body})
    return stored.run_id


def load_circuit(store: ResultStore, run_id: str) -> Circuit:
    """The circuit stored by :func:`save_circuit` under ``run_id`` (a prefix is enough)."""
    stored = store.load(run_id)
    body = stored.manifest.get("extra", {}).get("circuit")
    if stored.key.get("analysis") != CIRCUIT_ANALYSIS or body is None:
        raise WorkbenchError(
            f"run {stored.run_id} is a {stored.key.get('analysis')} run, not a circuit",
            "give the run id save_circuit returned",
        )
    return circuit_from_dict(body)


def sorted_heads(c: Circuit) -> list[Head]:
    return sorted(c.heads, key=component_sort_key)

"""Circuits as JSON and in the results store (torch-free).

Storage: :func:`save_circuit` writes a circuit through :meth:`ResultStore.put` as a run of the
derived analysis ``"circuit"`` (not a registry entry: nothing to compute from a model), keyed by
the source run's model fingerprint and data hash plus the rule and its parameters; its table
``components`` lists ``kind, layer, head, role, score``; ``manifest["extra"]["circuit"]`` holds
the circuit as JSON (:func:`circuit_to_dict`). :func:`load_circuit` reads it back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
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
    "CIRCUIT_ANALYSIS",
    "circuit_from_dict",
    "circuit_json",
    "circuit_to_dict",
    "load_circuit",
    "save_circuit",
    "sorted_heads",
]

CIRCUIT_ANALYSIS = "circuit"
"""Analysis name of a stored circuit (derived from a stored run, not a registry entry)."""


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
    if src:  # a circuit imported from JSON may name a source run this store does not hold
        with contextlib.suppress(WorkbenchError):
            source = store.load(src)
            fingerprint = str(source.key["model_fingerprint"])
            data_hash = str(source.key["data_hash"])
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

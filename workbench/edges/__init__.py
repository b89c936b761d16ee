"""Edge-level circuits: the GQA-native edge graph (:mod:`~workbench.edges.graph`), EAP and
EAP-IG scores (:mod:`~workbench.edges.eap`) and exact edge patching, the oracle
(:mod:`~workbench.edges.exact`). Every method scores the change of the metric when that edge
alone carries the corrupted value, with sign (:mod:`~workbench.edges.common`).

Importing this package does not import torch; the functions load their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workbench.edges.graph import (
    EdgeGraph,
    GraphEdge,
    Receiver,
    Sender,
    build_graph,
    edge_graph,
    edge_list,
)
from workbench.edges.interop import (
    from_auto_circuit,
    from_eap_ig_json,
    load_json,
    save_json,
    to_auto_circuit,
    to_eap_ig_json,
)
from workbench.edges.stored import export_run, run_circuit, run_scores

if TYPE_CHECKING:
    from workbench.edges.ablate import EdgeAblator
    from workbench.edges.circuit import EdgeCircuit, edge_circuit
    from workbench.edges.common import EdgeScores
    from workbench.edges.eap import eap_ig_scores, eap_scores, edge_attribution
    from workbench.edges.exact import exact_edge_patching

__all__ = [
    "EdgeAblator",
    "EdgeCircuit",
    "EdgeGraph",
    "EdgeScores",
    "GraphEdge",
    "Receiver",
    "Sender",
    "build_graph",
    "eap_ig_scores",
    "eap_scores",
    "edge_attribution",
    "edge_circuit",
    "edge_graph",
    "edge_list",
    "exact_edge_patching",
    "export_run",
    "from_auto_circuit",
    "from_eap_ig_json",
    "load_json",
    "run_circuit",
    "run_scores",
    "save_json",
    "to_auto_circuit",
    "to_eap_ig_json",
]

_LAZY = {
    "EdgeAblator": "workbench.edges.ablate",
    "EdgeCircuit": "workbench.edges.circuit",
    "edge_circuit": "workbench.edges.circuit",
    "EdgeScores": "workbench.edges.common",
    "eap_scores": "workbench.edges.eap",
    "eap_ig_scores": "workbench.edges.eap",
    "edge_attribution": "workbench.edges.eap",
    "exact_edge_patching": "workbench.edges.exact",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench.edges' has no attribute {name!r}")

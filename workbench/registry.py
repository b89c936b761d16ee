"""The one registry of analyses. The CLI, batch specs, the runner and the app all go through it.

Each analysis is a package under ``workbench/analyses/<name>/`` whose torch-free ``__init__``
holds its parameter dataclass and its registry entry ``ENTRY`` (a
:class:`~workbench.types.Analysis`: what it computes, and everything generic code asks of it).
Adding an analysis is its package plus one line in ``_PACKAGES`` below. Listing the registry
or answering from the store never imports torch: an entry's function is imported on first call.
"""

from __future__ import annotations

from workbench.analyses import (
    act_search,
    activation_patching,
    attention_sinks,
    attribution_patching,
    causal_validation,
    conflict_heads,
    direct_logit_attribution,
    duo_gates,
    edge_circuits,
    head_detectors,
    intervention_eval,
    kv_head_scores,
    kv_plan_eval,
    logit_lens,
    moa_influence,
    pasta_profile,
    path_patching,
    retrieval_heads,
)
from workbench.errors import WorkbenchError
from workbench.types import Analysis

__all__ = ["REGISTRY", "Analysis", "get_analysis", "register"]

REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    if analysis.name in REGISTRY:
        raise ValueError(f"analysis {analysis.name!r} registered twice")
    REGISTRY[analysis.name] = analysis
    return analysis


def get_analysis(name: str) -> Analysis:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WorkbenchError(
            f"unknown analysis '{name}'", f"known analyses: {', '.join(sorted(REGISTRY))}"
        ) from None


_PACKAGES = (
    head_detectors,
    direct_logit_attribution,
    logit_lens,
    attribution_patching,
    path_patching,
    activation_patching,
    attention_sinks,
    retrieval_heads,
    causal_validation,
    kv_head_scores,
    moa_influence,
    kv_plan_eval,
    duo_gates,
    conflict_heads,
    pasta_profile,
    act_search,
    intervention_eval,
    edge_circuits,
)
for _package in _PACKAGES:
    register(_package.ENTRY)

"""Causal validation: parameters, stored inputs and registry entry (torch-free;
``compute.py`` ablates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from workbench.errors import WorkbenchError
from workbench.types import Analysis


def source_scores(run: str, metric: str, store: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """``[n_layers, n_heads]`` scores of ``metric`` (empty: the run's first) of the stored run
    ``run`` (id or unique prefix) in ``store``, read only; one-line WorkbenchError when the run
    or metric is missing."""
    from workbench.circuits import run_scores

    return run_scores(store, run, metric or None)


def source_inputs(params: ValidationParams, store: Any) -> dict[str, Any]:
    """The stored inputs of a causal validation, read by the runner from the store it holds
    (the registry entry's ``inputs``): the source run's scores and facts."""
    return {"source": source_scores(params.source_run, params.source_metric, store)}


@dataclass(frozen=True)
class ValidationParams:
    """Ablate the top-k heads of a stored per-head score, and random k-sets as a control.

    The source run is read when the analysis runs (so a spec can score heads and validate them
    in one go), before anything is computed: a missing run or metric, or ``k`` above the
    number of scored heads, is a one-line error and nothing is stored."""

    source_run: str = field(
        default="", metadata={"help": "the stored per-head run (run id or a unique prefix)"}
    )
    source_metric: str = field(
        default="", metadata={"help": "its metric to rank heads by (default: its first)"}
    )
    ks: tuple[int, ...] = field(
        default=(1, 2, 4, 8), metadata={"help": "numbers of heads to ablate"}
    )
    n_random: int = field(
        default=5, metadata={"help": "random head sets per k (set i uses seed + i)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the first random set"})
    ablation: Literal["zero", "mean"] = field(
        default="zero",
        metadata={"help": "zero, or mean (over the task's prompts; needle: over positions)"},
    )
    absolute: bool = field(default=False, metadata={"help": "rank heads by |score|"})
    max_new_tokens: int = field(
        default=48, metadata={"help": "needle tasks: most tokens generated per answer"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompt tasks: prompts per forward"})

    def validate(self) -> None:
        if not self.source_run.strip():
            raise WorkbenchError(
                "causal_validation: source_run is empty", "name a stored per-head run id"
            )
        if not self.ks or any(k < 1 for k in self.ks):
            raise WorkbenchError(
                f"causal_validation: ks must be whole numbers >= 1, got {list(self.ks)}",
                "use ks = [1, 2, 4, 8]",
            )
        if self.n_random < 0:
            raise WorkbenchError("causal_validation: n_random must be >= 0", "use n_random = 5")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise WorkbenchError(
                "causal_validation: max_new_tokens and batch_size must be >= 1", "use the defaults"
            )


def _load() -> Any:
    from workbench.analyses.causal_validation.compute import causal_validation

    return causal_validation


ENTRY = Analysis(
    name="causal_validation",
    description="task metric with the top-k heads of a stored per-head score ablated, "
    "against random k-head sets (needle recall, or logit difference for prompt tasks)",
    params_cls=ValidationParams,
    loader=_load,
    default_task="needle",
    task_kind="any",
    version="2",  # needle recall by stemmed ROUGE-1 (rouge-score)
    inputs=source_inputs,
    checks=("kv_cache",),
    tasks=("needle",),
    reference="Wu et al. 2024 (masking retrieval heads); Wang et al. 2022 (ablation)",
)

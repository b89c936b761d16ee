"""ACT attention calibration searched head by head (Yu et al. 2024, "Unveiling and Harnessing
Hidden Attention Sinks", GATECH-EIC/ACT): parameters and registry entry (torch-free;
``compute.py`` runs the search and the held-out evaluation, ``scoring.py`` the per-prompt
scores and the noise-floor rule)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.types import Analysis

EVAL_TASKS = ("label_choice", "factual", "ioi", "induction", "colored_objects",
              "knowledge_conflict")  # fmt: skip
"""Tasks the chosen set can be evaluated on (built inside the analysis with default params)."""


@dataclass(frozen=True)
class ActSearchParams:
    """ACT (sink columns ``s_j > tau`` but the first scaled by ``beta``) on one head at a time
    over the run's prompts (the calibration split), the heads passing the noise floor kept, and
    the kept set applied together on held-out prompts of ``eval_tasks`` against random sets of
    the same size and against calibrating every searched head."""

    tau: float = field(default=0.1, metadata={"help": "sink threshold on the column score s_j"})
    beta: float = field(default=0.4, metadata={"help": "scale of the sink columns' weight"})
    layers: tuple[int, ...] = field(
        default=(), metadata={"help": "layers searched (empty: every layer)"}
    )
    heads: tuple[int, ...] = field(
        default=(), metadata={"help": "head indices searched in each layer (empty: every head)"}
    )
    n_boot: int = field(
        default=1000, metadata={"help": "paired bootstrap resamples of the calibration prompts"}
    )
    alpha: float = field(
        default=0.05,
        metadata={"help": "noise floor: at most this share of resamples may lose (one-sided)"},
    )
    n_random: int = field(
        default=20, metadata={"help": "random head sets of the chosen set's size (>= 1)"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the bootstrap and the random sets"})
    eval_tasks: tuple[str, ...] = field(
        default=("label_choice", "factual", "ioi", "induction"),
        metadata={"help": "held-out tasks the chosen set is evaluated on (label_choice: test)"},
    )
    batch_tokens: int = field(
        default=32768, metadata={"help": "rows x positions per batched block call"}
    )

    def validate(self) -> None:
        if not (0.0 < self.beta <= 1.0):
            raise WorkbenchError(
                f"act_search: beta must be in (0, 1], got {self.beta:g}", "use beta = 0.4 (ACT)"
            )
        if not (0.0 < self.tau < 1.0):
            raise WorkbenchError(
                f"act_search: tau must be in (0, 1), got {self.tau:g}", "use tau = 0.1 (ACT)"
            )
        if self.n_random < 1:
            raise WorkbenchError(
                f"act_search: n_random must be >= 1, got {self.n_random}", "use n_random = 20"
            )
        if self.n_boot < 100:
            raise WorkbenchError(
                f"act_search: n_boot must be >= 100, got {self.n_boot}", "use n_boot = 1000"
            )
        if not (0.0 < self.alpha < 0.5):
            raise WorkbenchError(
                f"act_search: alpha must be in (0, 0.5), got {self.alpha:g}", "use alpha = 0.05"
            )
        if self.batch_tokens < 1:
            raise WorkbenchError("act_search: batch_tokens must be >= 1", "use 32768")
        bad = [x for x in (*self.layers, *self.heads) if x < 0]
        if bad:
            raise WorkbenchError(
                f"act_search: layers and heads are indices >= 0, got {bad}", "fix the scope"
            )
        unknown = [t for t in self.eval_tasks if t not in EVAL_TASKS]
        if unknown:
            raise WorkbenchError(
                f"act_search: cannot evaluate on {unknown}", f"use some of {', '.join(EVAL_TASKS)}"
            )


def _load() -> Any:
    from workbench.analyses.act_search.compute import act_search

    return act_search


ENTRY = Analysis(
    name="act_search",
    description="ACT attention calibration (sink columns s_j > tau but the first scaled by beta) "
    "searched one head at a time on calibration prompts, heads kept above a paired-bootstrap "
    "noise floor, the kept set applied together on held-out tasks against random sets of the "
    "same size and against calibrating every head",
    params_cls=ActSearchParams,
    loader=_load,
    default_task="label_choice",
    task_kind="groups",
    chooses_heads=True,
    variant_params=("beta", "tau"),
    tasks=("label_choice", "factual", "ioi", "knowledge_conflict"),
    reference="Yu et al. 2024 (ACT, GATECH-EIC/ACT)",
)

"""An intervention on chosen heads against random heads: zero ablation, ACT calibration or PASTA
steering, on any prompt task; parameters, stored inputs and registry entry (torch-free;
``compute.py`` runs it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.heads import parse_heads
from workbench.types import Analysis

INTERVENTIONS = ("zero", "act", "pasta")


@dataclass(frozen=True)
class InterventionEvalParams:
    """Chosen heads (typed, or a stored run's chosen list), the intervention and its strength."""

    heads: str = field(default="", metadata={"help": "heads to act on, e.g. 'L3H4, L20H1'"})
    heads_run: str = field(
        default="",
        metadata={"help": "a stored run whose chosen heads to use (conflict_heads, act_search, "
                  "pasta_profile)"},
    )  # fmt: skip
    heads_key: str = field(
        default="",
        metadata={"help": "which of that run's chosen lists (e.g. memory or context)"},
    )
    intervention: Literal["zero", "act", "pasta"] = field(
        default="zero", metadata={"help": "zero ablation, ACT calibration or PASTA steering"}
    )
    tau: float = field(default=0.1, metadata={"help": "ACT: sink column threshold"})
    beta: float = field(default=0.4, metadata={"help": "ACT: kept share of a sink's weight"})
    alpha: float = field(default=0.01, metadata={"help": "PASTA: weight outside the highlight"})
    span: str = field(
        default="context",
        metadata={"help": "PASTA highlight: 'context' (knowledge_conflict) or 'start:stop'"},
    )
    n_random: int = field(default=20, metadata={"help": "random head sets of the same size"})
    random_pool: Literal["uniform", "layer_matched"] = field(
        default="uniform", metadata={"help": "random heads from any layer, or the chosen layers"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the random head sets"})
    batch_tokens: int = field(default=16384, metadata={"help": "rows x positions per block call"})

    def validate(self) -> None:
        if self.heads.strip():
            parse_heads(self.heads, "intervention_eval")
        if not (self.heads.strip() or self.heads_run.strip()):
            raise WorkbenchError(
                "intervention_eval: no heads given", "set heads (e.g. 'L3H4, L20H1') or heads_run"
            )
        for name, value in (("beta", self.beta), ("alpha", self.alpha)):
            if not 0.0 < value <= 1.0:
                raise WorkbenchError(
                    f"intervention_eval: {name} must be in (0, 1], got {value}",
                    f"e.g. {name} = {0.4 if name == 'beta' else 0.01}",
                )
        if not 0.0 < self.tau < 1.0:
            raise WorkbenchError(f"intervention_eval: tau must be in (0, 1), got {self.tau}",
                                 "e.g. tau = 0.1")  # fmt: skip
        if self.span != "context" and not re.match(r"^\d+:\d+$", self.span.strip()):
            raise WorkbenchError(
                f"intervention_eval: span '{self.span}' is not 'context' or 'start:stop'",
                "e.g. span = '3:9' (token positions, stop exclusive)",
            )
        if self.n_random < 1:
            raise WorkbenchError("intervention_eval: n_random must be >= 1", "use n_random = 20")


def heads_inputs(params: InterventionEvalParams, store: Any) -> dict[str, Any]:
    """The stored chosen heads of ``heads_run`` (its ``info["chosen"]``: a list, or lists by
    key), as ``"L3H4"`` strings; typed ``heads`` are added to them."""
    chosen: list[str] = []
    if params.heads_run.strip():
        res = store.load(params.heads_run.strip())
        found = res.info.get("chosen")
        if isinstance(found, dict):
            if params.heads_key not in found:
                raise WorkbenchError(
                    f"run {res.run_id} has chosen lists {sorted(found)}, not '{params.heads_key}'",
                    f"set heads_key to one of {sorted(found)}",
                )
            found = found[params.heads_key]
        if not isinstance(found, list) or not found:
            raise WorkbenchError(
                f"run {res.run_id} ({res.key.get('analysis')}) lists no chosen heads",
                "give a run of an analysis that chooses heads (conflict_heads, act_search, ...)",
            )
        chosen = [str(h) for h in found]
    return {"stored_heads": chosen}


def _load() -> Any:
    from workbench.analyses.intervention_eval.compute import intervention_eval

    return intervention_eval


ENTRY = Analysis(
    name="intervention_eval",
    description="an intervention on chosen heads (zero ablation, ACT calibration, PASTA "
    "steering) on a task: accuracy, logit difference and the incorrect-answer rate with and "
    "without it, against random head sets of the same size (percentile, p-value)",
    params_cls=InterventionEvalParams,
    loader=_load,
    default_task="knowledge_conflict",
    task_kind="groups",
    inputs=heads_inputs,
    variant_params=("intervention",),
    chooses_heads=True,
    reference="Jin et al. 2024 (PH3); Yu et al. 2024 (ACT); Zhang et al. 2024 (PASTA)",
)

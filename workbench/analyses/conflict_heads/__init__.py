"""Memory heads and context heads under knowledge conflicts (PH3, Jin et al. 2024; JUICE's
sign-consistency criterion, Li et al. 2025); parameters and registry entry (torch-free;
``compute.py`` scores the heads and evaluates the pruning plans)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.types import Analysis, RoleRule

SCORES = ("path", "dla", "ablation")


@dataclass(frozen=True)
class ConflictHeadsParams:
    """Per-head scores on logit(o_m) - logit(o_c) (signed toward memory), roles, and PH3's
    pruning plans chosen on the select split and tested on the test split."""

    rank_by: Literal["path", "dla", "ablation"] = field(
        default="path",
        metadata={"help": "the score that ranks heads for pruning (PH3: path patching)"},
    )
    consistent_only: bool = field(
        default=True,
        metadata={"help": "prune only heads whose sign agrees across formats (JUICE)"},
    )
    k_grid: tuple[int, ...] = field(
        default=(1, 2, 4, 8, 16),
        metadata={"help": "pruning sizes k tried on the select split"},
    )
    n_random: int = field(default=20, metadata={"help": "random k-head sets on the test split"})
    seed: int = field(default=0, metadata={"help": "seeds the random head sets"})
    role_threshold: float = field(
        default=0.1, metadata={"help": "|score| (logits) above which a head gets a role"}
    )
    max_select: int = field(
        default=16,
        metadata={"help": "select-split prompts per format the per-head scores use (cost)"},
    )
    require_known: bool = field(
        default=True,
        metadata={"help": "use only records whose question alone the model answers with o_m"},
    )
    batch_tokens: int = field(
        default=16384, metadata={"help": "rows x positions per batched block call"}
    )

    def validate(self) -> None:
        if not self.k_grid or any(k < 1 for k in self.k_grid):
            raise WorkbenchError(
                f"conflict_heads: k_grid must be sizes >= 1, got {list(self.k_grid)}",
                "use e.g. k_grid = [1, 2, 4, 8, 16]",
            )
        if self.n_random < 1:
            raise WorkbenchError(
                f"conflict_heads: n_random must be >= 1, got {self.n_random}", "use n_random = 20"
            )
        if self.max_select < 1:
            raise WorkbenchError("conflict_heads: max_select must be >= 1", "use 16")
        if self.batch_tokens < 1:
            raise WorkbenchError("conflict_heads: batch_tokens must be >= 1", "use 16384")


def _load() -> Any:
    from workbench.analyses.conflict_heads.compute import conflict_heads

    return conflict_heads


_SRC = "Jin et al. 2024 (PH3); Li et al. 2025 (JUICE)"

ENTRY = Analysis(
    name="conflict_heads",
    description="knowledge conflicts: per head, path patching to the logits, DLA and zero "
    "ablation on logit(memory) - logit(context), sign consistency across prompt formats; "
    "memory / context / mixed roles; PH3 pruning plans against random head sets",
    params_cls=ConflictHeadsParams,
    loader=_load,
    default_task="knowledge_conflict",
    task_kind="groups",
    version="1",
    roles=(
        RoleRule("memory head", "memory_score", ">", 0.1, "conflict_heads", _SRC),
        RoleRule("context head", "context_score", ">", 0.1, "conflict_heads", _SRC),
        RoleRule("mixed conflict head", "mixed_score", ">", 0.1, "conflict_heads", _SRC),
    ),
    variant_params=("rank_by",),
    chooses_heads=True,
    tasks=("knowledge_conflict",),
    reference=_SRC,
)

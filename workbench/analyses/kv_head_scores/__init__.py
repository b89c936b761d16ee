"""Per-KV-head scores for KV-cache plans (RazorAttention, Tang et al. 2024): parameters and
registry entry (torch-free; ``compute.py`` scores, ``reference.py`` is the plain loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.types import Analysis, RoleRule


@dataclass(frozen=True)
class KVHeadScoreParams:
    """RazorAttention's echo and induction scores on repeated random tokens, per query head and
    pooled per KV head (max, as the paper; mean too)."""

    batch_size: int = field(default=1, metadata={"help": "sequences per forward pass"})

    def validate(self) -> None:
        if self.batch_size < 1:
            raise WorkbenchError("kv_head_scores: batch_size must be >= 1", "set batch_size = 1")


def _load() -> Any:
    from workbench.analyses.kv_head_scores.compute import kv_head_scores

    return kv_head_scores


ENTRY = Analysis(
    name="kv_head_scores",
    description="RazorAttention echo and induction scores per query head on tokens repeated R "
    "times, and per KV head (max and mean over the heads sharing it)",
    params_cls=KVHeadScoreParams,
    loader=_load,
    default_task="repeated",
    tasks=("repeated",),
    roles=(RoleRule("echo head", "echo", ">", 0.3, "kv_head_scores", "Tang et al. 2024"),),
    reference="Tang et al. 2024 (RazorAttention)",
)

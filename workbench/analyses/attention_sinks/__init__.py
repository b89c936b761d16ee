"""Attention sinks: parameters and registry entry (torch-free; ``compute.py`` the statistics,
``reference.py`` their plain loops, ``figures.py`` the sink plots)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.types import Analysis, RoleRule


@dataclass(frozen=True)
class SinkParams:
    """Attention sinks (Gu et al. 2024), drains and peaks, active/dormant heads (Guo et al. 2024).

    The BOS policy is the run's (``prepend_bos`` of the spec or call); the result's info says
    whether position 0 is BOS.
    """

    epsilon: float = field(
        default=0.3,
        metadata={"help": "a head is a sink for position k when its importance alpha_k > epsilon"},
    )
    row_entropy_max: float = field(
        default=0.3,
        metadata={"help": "dormant: mean normalised row entropy below this (Guo et al.)"},
    )
    col_entropy_min: float = field(
        default=0.9,
        metadata={"help": "dormant: max normalised column entropy above this (Guo et al.)"},
    )
    hidden_min_queries: int = field(
        default=8,
        metadata={"help": "hidden sinks: only positions seen by at least this many queries"},
    )
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass"})

    def validate(self) -> None:
        if not 0.0 < self.epsilon < 1.0:
            raise WorkbenchError(
                f"attention_sinks: epsilon must be in (0, 1), got {self.epsilon}",
                "use e.g. epsilon = 0.3 (Gu et al. 2024)",
            )
        for name in ("row_entropy_max", "col_entropy_min"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise WorkbenchError(
                    f"attention_sinks: {name} must be in [0, 1] (a normalised entropy), got {v}",
                    "use the defaults row_entropy_max = 0.3, col_entropy_min = 0.9",
                )
        if self.hidden_min_queries < 1:
            raise WorkbenchError(
                "attention_sinks: hidden_min_queries must be >= 1", "use hidden_min_queries = 8"
            )
        if self.batch_size < 1:
            raise WorkbenchError("attention_sinks: batch_size must be >= 1", "use batch_size = 8")


def _load() -> Any:
    from workbench.analyses.attention_sinks.compute import attention_sinks

    return attention_sinks


ENTRY = Analysis(
    name="attention_sinks",
    description="Sink_k (share of heads with importance alpha_k > epsilon) per position, "
    "per-head sink share, hidden sinks, value drains, residual peaks, dormant heads per domain",
    params_cls=SinkParams,
    loader=_load,
    default_task="texts",
    roles=(RoleRule("sink head", "sink_share", ">", 0.5, None, "Xiao et al. 2023"),),
    tasks=("texts",),
    head_page="Sink statistics",
    reference="Gu et al. 2024; Guo et al. 2024 (active-dormant); Yu et al. 2024 (hidden sinks)",
)

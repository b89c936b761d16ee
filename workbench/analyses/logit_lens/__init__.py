"""The logit lens: its parameters and registry entry (torch-free; ``compute.py`` computes it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.params import check_batch
from workbench.types import Analysis

LENS_METRICS = ("logit_diff", "prob", "rank")


@dataclass(frozen=True)
class LogitLensParams:
    """Logit lens: the residual stream after each layer through the final norm and unembedding."""

    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})

    def validate(self) -> None:
        check_batch("logit_lens", self.batch_size)


def _load() -> Any:
    from workbench.analyses.logit_lens.compute import logit_lens

    return logit_lens


ENTRY = Analysis(
    name="logit_lens",
    description="logit difference, probability and rank of the answer read from the "
    "residual stream after each layer (final norm + unembedding)",
    params_cls=LogitLensParams,
    loader=_load,
    default_task="ioi",
    reference="nostalgebraist 2020 (logit lens)",
)

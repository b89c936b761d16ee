"""Attribution patching: parameters and registry entry (torch-free; ``compute.py`` computes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.circuits.agreement import record_agreement
from workbench.errors import WorkbenchError
from workbench.types import DIRECTIONS, METRICS, Agreement, Analysis


@dataclass(frozen=True)
class AttributionParams:
    """Attribution patching (Nanda 2023; Syed et al. 2023): a first-order estimate of every
    activation-patching effect from two forwards and one backward."""

    metric: str = field(
        default="logit_diff",
        metadata={
            "help": "logit_diff, norm_logit_diff, prob, loss or kl (read at the last position)"
        },
    )
    direction: Literal["denoising", "noising"] = field(
        default="denoising",
        metadata={
            "help": "denoising: gradient on the corrupted run times (clean - corrupt); "
            "noising: gradient on the clean run times (corrupt - clean)"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "prompts per forward/backward pass"})

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise WorkbenchError(
                f"attribution_patching: unknown metric '{self.metric}'",
                f"choose from {', '.join(METRICS)}",
            )
        if self.direction not in DIRECTIONS:
            raise WorkbenchError(
                f"attribution_patching: unknown direction '{self.direction}'",
                "choose denoising or noising",
            )
        if self.batch_size < 1:
            raise WorkbenchError(
                "attribution_patching: batch_size must be >= 1", "set batch_size = 16"
            )


def _load() -> Any:
    from workbench.analyses.attribution_patching.compute import attribution_patching

    return attribution_patching


def head_effects(result: Any) -> Any:
    """Its per-head ``z`` estimate: already an effect (the change of the metric)."""
    return result.matrix(result.metrics[0]).to_numpy(dtype=float)


ENTRY = Analysis(
    name="attribution_patching",
    description="first-order estimate of every patching effect (head z, resid_pre, "
    "attn_out, mlp_out per layer x position) from two forwards and one backward",
    params_cls=AttributionParams,
    loader=_load,
    default_task="ioi",
    variant_params=("direction",),
    after_store=record_agreement,
    agreement=Agreement(partner="activation_patching", role="estimate", effects=head_effects),
    reference="Nanda 2023; Syed et al. 2023 (Attribution patching outperforms ACDC)",
)

"""Parameters of activation patching (torch-free, so the CLI can list them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from workbench.errors import WorkbenchError

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")
PATCH_METRICS = ("logit_diff", "norm_logit_diff", "prob", "loss", "kl")


@dataclass(frozen=True)
class ActivationPatchingParams:
    """Activation patching (Wang et al. 2022; Heimersheim & Nanda 2024)."""

    component: Literal["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"] = field(
        default="z",
        metadata={
            "help": "activation to patch: resid_pre (per layer x position), attn_out, mlp_out "
            "(per layer), z, q, pattern (per query head), k, v (per KV head)"
        },
    )
    per_position: bool = field(
        default=False,
        metadata={"help": "patch one position at a time (resid_pre is always per position)"},
    )
    direction: Literal["denoising", "noising"] = field(
        default="denoising",
        metadata={
            "help": "denoising: run corrupted, write in the clean activation; "
            "noising: run clean, write in the corrupted one"
        },
    )
    metric: Literal["logit_diff", "norm_logit_diff", "prob", "loss", "kl"] = field(
        default="logit_diff", metadata={"help": "metric at the final position"}
    )
    batch_tokens: int = field(
        default=2048,
        metadata={
            "help": "recomputed tokens (patched sequences x positions) per forward; bounds memory"
        },
    )
    positions: Literal["from_first_diff", "all"] = field(
        default="from_first_diff",
        metadata={
            "help": "from_first_diff: positions before the first clean/corrupt difference get "
            "the baseline without computing (exact); all: compute every position"
        },
    )
    layers: tuple[int, ...] = field(
        default=(), metadata={"help": "layers to patch (empty: all layers)"}
    )

    @property
    def is_per_position(self) -> bool:
        return self.per_position or self.component == "resid_pre"

    def validate(self) -> None:
        if self.component not in COMPONENTS:
            raise WorkbenchError(
                f"activation_patching: unknown component '{self.component}'",
                f"choose from {', '.join(COMPONENTS)}",
            )
        if self.direction not in ("denoising", "noising"):
            raise WorkbenchError(
                f"activation_patching: unknown direction '{self.direction}'",
                "choose denoising or noising",
            )
        if self.metric not in PATCH_METRICS:
            raise WorkbenchError(
                f"activation_patching: unknown metric '{self.metric}'",
                f"choose from {', '.join(PATCH_METRICS)}",
            )
        if self.positions not in ("from_first_diff", "all"):
            raise WorkbenchError(
                f"activation_patching: unknown positions '{self.positions}'",
                "choose from_first_diff or all",
            )
        if self.batch_tokens < 1:
            raise WorkbenchError(
                "activation_patching: batch_tokens must be >= 1", "set batch_tokens = 2048"
            )
        if any(int(layer) < 0 for layer in self.layers):
            raise WorkbenchError(
                f"activation_patching: negative layer in layers={list(self.layers)}",
                "give layer indices from 0",
            )

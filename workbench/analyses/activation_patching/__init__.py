"""Activation patching: parameters and registry entry (torch-free; the package's modules:
``compute.py`` the analysis, ``resume.py`` the exact resume-at-layer engine it runs on,
``components.py`` what a component's patch indexes, ``reference.py`` the slow plain loop)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.circuits.agreement import record_agreement
from workbench.errors import WorkbenchError
from workbench.hooks import HEAD_COMPONENTS, KV_COMPONENTS
from workbench.types import METRICS, Agreement, Analysis, Metric

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")


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
    metric: Metric = field(default="logit_diff", metadata={"help": "metric at the final position"})
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
        if self.metric not in METRICS:
            raise WorkbenchError(
                f"activation_patching: unknown metric '{self.metric}'",
                f"choose from {', '.join(METRICS)}",
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


def _load() -> Any:
    from workbench.analyses.activation_patching.compute import activation_patching

    return activation_patching


def head_axis(params: Mapping[str, Any]) -> str:
    """KV heads for ``k``/``v``, query heads for ``z``/``q``/``pattern``, none per layer."""
    component = params.get("component", "z")
    if component in KV_COMPONENTS:
        return "kv_head"
    return "head" if component in HEAD_COMPONENTS else "none"


def is_head_sweep(params: Mapping[str, Any]) -> bool:
    """A ``z`` sweep over every head and layer, all positions at once: what attribution
    patching estimates per head."""
    return (
        params.get("component") == "z"
        and not params.get("per_position")
        and not params.get("layers")
        and params.get("positions", "from_first_diff") == "from_first_diff"
    )


def head_effects(result: Any) -> Any:
    """Per-head effect ``metric(patched) - metric(base run)`` of a head sweep
    (:func:`is_head_sweep`): the stored value minus the baseline in its info."""
    params = result.key["params"]
    mat = result.matrix(result.metrics[0]).to_numpy(dtype=float)
    info = result.manifest.get("extra", {})
    denoise = params.get("direction", "denoising") == "denoising"
    return mat - float(info["baseline_corrupted" if denoise else "baseline_clean"])


ENTRY = Analysis(
    name="activation_patching",
    description="exact activation patching (denoising/noising) per layer, head, KV head or "
    "position; resumes at the patched layer, batches variants, skips the identical prefix",
    params_cls=ActivationPatchingParams,
    loader=_load,
    default_task="ioi",
    checks=("resume",),
    variant_params=("component", "direction"),
    head_axis=head_axis,
    after_store=record_agreement,
    agreement=Agreement(
        partner="attribution_patching",
        role="reference",
        effects=head_effects,
        comparable=is_head_sweep,
    ),
    reference="Wang et al. 2022; Heimersheim & Nanda 2024; TransformerLens patching",
)

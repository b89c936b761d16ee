"""The one registry of analyses. The CLI, batch specs and the app all go through it.

An entry names a pure function ``(model, prompts, params) -> AnalysisOutput``, its parameter
schema (a frozen dataclass with defaults) and the task it runs on by default. The function is
referenced by module and attribute and imported on first call, so listing the registry or
answering from the store never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workbench import params as P
from workbench.errors import WorkbenchError
from workbench.methods.attribution_schemas import AttributionParams, PathPatchingParams
from workbench.methods.dla_schemas import DLAParams, LogitLensParams
from workbench.methods.patching.schemas import ActivationPatchingParams
from workbench.methods.retrieval.schemas import RetrievalParams
from workbench.methods.schemas import HeadDetectorParams
from workbench.methods.sinks_schemas import SinkParams
from workbench.methods.validation_schemas import ValidationParams, source_inputs
from workbench.types import RoleRule


@dataclass(frozen=True)
class Analysis:
    name: str
    description: str
    params_cls: type
    module: str
    function: str
    default_task: str
    task_kind: str = "prompts"  # "prompts" (PromptSet) or "needle" (NeedleSet)
    version: str = "1"
    reference: str = ""
    checks: tuple[str, ...] = ()
    """Self-checks of library internals its fast paths rely on (``models.selfcheck.CHECKS``):
    run before it computes, and a recorded failure keeps its stored results from being served."""
    roles: tuple[RoleRule, ...] = ()
    """Role labels it gives heads in the atlas (``workbench.atlas``)."""
    variant_params: tuple[str, ...] = ()
    """Parameters that change what its scores mean: they enter its atlas column names."""
    tasks: tuple[str, ...] = ()
    """The tasks offered for it (the app's Run page); empty: every prompt-pair task."""
    head_page: str = ""
    """Title of its section on the app's Head page (its stored rows of that head), if any."""
    after_store: Callable[[Any, Any], Any] | None = None
    """``(store, stored result)``: run by the runner after a fresh result of it is stored."""
    inputs: Callable[[Any, Any], dict[str, Any]] | None = None
    """``(params, store) -> keyword arguments``: what it reads from the results store, resolved
    by the runner from the store it holds and passed to the function (torch-free)."""

    def load(self) -> Callable[..., Any]:
        fn = getattr(importlib.import_module(self.module), self.function)
        return fn  # type: ignore[no-any-return]

    def parse_params(self, values: dict[str, Any] | None) -> Any:
        return P.from_mapping(self.params_cls, values, where=f"analysis '{self.name}'")

    def describe_params(self) -> list[dict[str, Any]]:
        return P.describe(self.params_cls)


def _record_agreement(store: Any, stored: Any) -> Any:
    """After-store hook of attribution and exact patching (imported on use: torch-free)."""
    from workbench.compare import record_agreement

    return record_agreement(store, stored)


REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    if analysis.name in REGISTRY:
        raise ValueError(f"analysis {analysis.name!r} registered twice")
    REGISTRY[analysis.name] = analysis
    return analysis


def get_analysis(name: str) -> Analysis:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WorkbenchError(
            f"unknown analysis '{name}'", f"known analyses: {', '.join(sorted(REGISTRY))}"
        ) from None


register(
    Analysis(
        name="head_detectors",
        description="previous-token, duplicate-token and induction scores per head "
        "(share of attention on the expected positions)",
        params_cls=HeadDetectorParams,
        module="workbench.methods.detectors",
        function="head_detectors",
        default_task="induction",
        roles=(
            RoleRule(
                "induction head", "induction", ">", 0.4, "head_detectors", "Olsson et al. 2022"
            ),
            RoleRule("previous-token head", "previous_token", ">", 0.4, "head_detectors"),
            RoleRule("duplicate-token head", "duplicate_token", ">", 0.4, "head_detectors"),
        ),
        reference="TransformerLens head_detector; Olsson et al. 2022",
    )
)

register(
    Analysis(
        name="direct_logit_attribution",
        description="each head's, MLP's and the embeddings' direct effect on the final-position "
        "logit difference (final norm scale frozen; components sum to the logit difference)",
        params_cls=DLAParams,
        module="workbench.methods.dla",
        function="direct_logit_attribution",
        default_task="ioi",
        head_page="Direct logit attribution",
        reference="Elhage et al. 2021; Wang et al. 2022 (IOI)",
    )
)
register(
    Analysis(
        name="logit_lens",
        description="logit difference, probability and rank of the answer read from the "
        "residual stream after each layer (final norm + unembedding)",
        params_cls=LogitLensParams,
        module="workbench.methods.dla",
        function="logit_lens",
        default_task="ioi",
        reference="nostalgebraist 2020 (logit lens)",
    )
)
register(
    Analysis(
        name="attribution_patching",
        description="first-order estimate of every patching effect (head z, resid_pre, "
        "attn_out, mlp_out per layer x position) from two forwards and one backward",
        params_cls=AttributionParams,
        module="workbench.methods.attribution",
        function="attribution_patching",
        default_task="ioi",
        variant_params=("direction",),
        after_store=_record_agreement,
        reference="Nanda 2023; Syed et al. 2023 (Attribution patching outperforms ACDC)",
    )
)
register(
    Analysis(
        name="path_patching",
        description="each sender head's effect through chosen receivers only (logits or "
        "later heads' q/k/v), other heads frozen",
        params_cls=PathPatchingParams,
        module="workbench.methods.path_patching",
        function="path_patching",
        default_task="ioi",
        checks=("resume",),
        variant_params=("receivers", "direction"),
        reference="Wang et al. 2022 (IOI); Goldowsky-Dill et al. 2023",
    )
)
register(
    Analysis(
        name="activation_patching",
        description="exact activation patching (denoising/noising) per layer, head, KV head or "
        "position; resumes at the patched layer, batches variants, skips the identical prefix",
        params_cls=ActivationPatchingParams,
        module="workbench.methods.patching",
        function="activation_patching",
        default_task="ioi",
        checks=("resume",),
        variant_params=("component", "direction"),
        after_store=_record_agreement,
        reference="Wang et al. 2022; Heimersheim & Nanda 2024; TransformerLens patching",
    )
)
register(
    Analysis(
        name="attention_sinks",
        description="Sink_k (share of heads with importance alpha_k > epsilon) per position, "
        "per-head sink share, hidden sinks, value drains, residual peaks, dormant heads per domain",
        params_cls=SinkParams,
        module="workbench.methods.sinks",
        function="attention_sinks",
        default_task="texts",
        roles=(RoleRule("sink head", "sink_share", ">", 0.5, None, "Xiao et al. 2023"),),
        tasks=("texts",),
        head_page="Sink statistics",
        reference="Gu et al. 2024; Guo et al. 2024 (active-dormant); Yu et al. 2024 (hidden sinks)",
    )
)
register(
    Analysis(
        name="retrieval_heads",
        description="retrieval score per query head on needle-in-a-haystack samples: copy hits "
        "of the argmax key while decoding (faithful) or teacher-forced (fast)",
        params_cls=RetrievalParams,
        module="workbench.methods.retrieval.analysis",
        function="retrieval_heads",
        default_task="needle",
        task_kind="needle",
        version="2",  # the paper's span, first-token scoring, stemmed ROUGE-1
        checks=("kv_cache",),
        roles=(RoleRule("retrieval head", "retrieval_score", ">", 0.1, None, "Wu et al. 2024"),),
        tasks=("needle",),
        reference="Wu et al. 2024 (Retrieval Head Mechanistically Explains Long-Context "
        "Factuality)",
    )
)
register(
    Analysis(
        name="causal_validation",
        description="task metric with the top-k heads of a stored per-head score ablated, "
        "against random k-head sets (needle recall, or logit difference for prompt tasks)",
        params_cls=ValidationParams,
        module="workbench.methods.validation",
        function="causal_validation",
        default_task="needle",
        task_kind="any",
        version="2",  # needle recall by stemmed ROUGE-1 (rouge-score)
        inputs=source_inputs,
        checks=("kv_cache",),
        tasks=("needle",),
        reference="Wu et al. 2024 (masking retrieval heads); Wang et al. 2022 (ablation)",
    )
)

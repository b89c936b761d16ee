"""Attribution patching (Nanda 2023; Syed et al. 2023 "Attribution patching outperforms ACDC").

A first-order Taylor estimate of every activation-patching effect at once. For an activation
``a`` (a head's ``z``, a residual stream ``resid_pre``, an ``attn_out`` or ``mlp_out``) and a
metric ``M`` read at the final position:

- denoising (default): ``effect(a) ~ (a_clean - a_corrupt) . dM/da |_corrupted run``
  (estimates patching the clean ``a`` into the corrupted run)
- noising: ``effect(a) ~ (a_corrupt - a_clean) . dM/da |_clean run``
  (estimates patching the corrupted ``a`` into the clean run)

Cost: one forward on the source run (no grad) and one forward + ONE backward on the base run,
for every component, layer, head and position together. The gradient reaches every hook point
through a zero "delta" leaf added at the hook (``a + delta`` with ``delta = 0`` requires grad),
so ``dM/d delta = dM/da`` without touching the frozen parameters. The backward is taken of
``sum_prompts M_i``; prompts are independent, so each prompt's gradient is its own and the dot
product is summed over the feature dimension only, keeping per-prompt values (mean, stderr).

Reported cells (per prompt, then mean and stderr over prompts):

- head ``z``: ``sum_{pos, d_head} delta_a * grad`` (all positions; head metric
  ``attribution``) and per position (table ``heads_by_pos``)
- ``resid_pre``, ``attn_out``, ``mlp_out``: per layer x position (table ``grid``) and per
  layer summed over positions (table ``layers``)

``norm_logit_diff`` divides the logit-difference estimate by ``LD_clean - LD_corrupt`` (mean
baselines), the derivative of the normalised metric. The estimate is exact for effects linear in
``a`` and fails where they are not (attention softmax saturation, LayerNorm scale): compare with
exact patching (:func:`agreement`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench import metrics as M
from workbench.analyses.attribution_patching import AttributionParams
from workbench.hooks import hook_name, hooked, record
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, HeadMetric, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

LAYER_KINDS = ("resid_pre", "attn_out", "mlp_out")


def _names(n_layers: int) -> list[tuple[str, int, str]]:
    kinds = ("z", *LAYER_KINDS)
    return [(k, layer, hook_name(k, layer)) for k in kinds for layer in range(n_layers)]


def _cache(model: LoadedModel, tokens: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Every hooked activation of one run (detached copies) and the final-position logits."""
    points = [(kind, layer) for kind, layer, _ in _names(model.n_layers)]
    rec = record(model.bridge, tokens, points, logits="last")
    assert rec.logits is not None
    return rec.by_name(), rec.logits


def _metric(
    name: str,
    logits: Float[Tensor, "batch vocab"],
    correct: Tensor,
    incorrect: Tensor,
    clean_logits: Tensor | None,
) -> Tensor:
    return M.per_prompt(name, logits, correct, incorrect, clean_logits)


def attribution_scores(
    model: LoadedModel,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    correct: Int[Tensor, " batch"],
    incorrect: Int[Tensor, " batch"],
    metric: str = "logit_diff",
    direction: str = "denoising",
) -> dict[str, Tensor]:
    """Per-prompt attribution estimates (raw metric units; see module docstring).

    Returns ``z``: ``[batch, layer, pos, head]`` and ``resid_pre`` / ``attn_out`` /
    ``mlp_out``: ``[batch, layer, pos]``, plus ``base_metric``/``source_metric``: ``[batch]``
    and ``clean_ld``/``corrupt_ld``: ``[batch]`` (logit differences of both runs).
    """
    source_tokens, base_tokens = (clean, corrupt) if direction == "denoising" else (corrupt, clean)
    source, source_logits = _cache(model, source_tokens)
    clean_logits = source_logits if direction == "denoising" else None

    deltas: dict[str, Tensor] = {}
    base: dict[str, Tensor] = {}

    def add_delta(name: str) -> Any:
        def fn(act: Tensor, hook: Any) -> Tensor:
            base[name] = act.detach().clone()
            d = torch.zeros_like(act, requires_grad=True)
            deltas[name] = d
            return act + d

        return fn

    names = _names(model.n_layers)
    with torch.enable_grad(), hooked(model.bridge, [(n, add_delta(n)) for _, _, n in names]):
        logits = model.bridge(base_tokens, prepend_bos=False)[:, -1]
        if direction == "noising" and metric == "kl":
            clean_logits = logits.detach()
        values = _metric(metric, logits, correct, incorrect, clean_logits)
        grads = torch.autograd.grad(values.sum(), [deltas[n] for _, _, n in names])
    grad_of = {n: g for (_, _, n), g in zip(names, grads, strict=True)}

    out: dict[str, list[Tensor]] = {k: [] for k in ("z", *LAYER_KINDS)}
    for kind, _layer, n in names:
        term = (source[n] - base[n]) * grad_of[n]
        out[kind].append(term.sum(-1))  # z: [b, pos, head]; others: [b, pos]
    result = {k: torch.stack(v, dim=1) for k, v in out.items()}
    base_logits = logits.detach()
    result["base_metric"] = values.detach()
    result["source_metric"] = _metric(metric, source_logits, correct, incorrect, clean_logits)
    lds = (
        M.logit_diff(source_logits, correct, incorrect),
        M.logit_diff(base_logits, correct, incorrect),
    )
    result["clean_ld"], result["corrupt_ld"] = lds if direction == "denoising" else lds[::-1]
    return result


def _long(arr: np.ndarray, dims: tuple[str, ...], **const: Any) -> list[dict[str, Any]]:
    """Per-prompt array ``[n, *dims]`` to long-form rows with mean, stderr and n."""
    mean, se = mean_stderr(arr)
    rows = []
    for idx in np.ndindex(*mean.shape):
        row = dict(const)
        row.update({d: int(i) for d, i in zip(dims, idx, strict=True)})
        row.update(value=float(mean[idx]), stderr=float(se[idx]), n=int(arr.shape[0]))
        rows.append(row)
    return rows


def attribution_patching(
    model: LoadedModel, prompts: PromptSet, params: AttributionParams
) -> AnalysisOutput:
    """Attribution patching of every head, residual stream, attention and MLP output."""
    import pandas as pd

    params.validate()
    parts: list[dict[str, Tensor]] = []
    bs = params.batch_size
    for i in range(0, prompts.n, bs):
        sl = slice(i, i + bs)
        parts.append(
            attribution_scores(
                model,
                prompts.clean[sl],
                prompts.corrupt[sl],
                prompts.correct[sl],
                prompts.incorrect[sl],
                metric=params.metric,
                direction=params.direction,
            )
        )
    res = {k: torch.cat([p[k] for p in parts]).double().cpu().numpy() for k in parts[0]}
    clean_ld, corrupt_ld = float(res["clean_ld"].mean()), float(res["corrupt_ld"].mean())
    scale = 1.0
    if params.metric == "norm_logit_diff":
        # d/dLD of (LD - LD_corrupt) / (LD_clean - LD_corrupt); raises when undefined
        scale = float(M.normalise(torch.tensor(corrupt_ld + 1.0), clean_ld, corrupt_ld))
    z = res["z"] * scale  # [n, layer, pos, head]
    mean, se = mean_stderr(z.sum(2))
    metric_name = params.metric
    grid = []
    layers = []
    for kind in LAYER_KINDS:
        arr = res[kind] * scale
        grid += _long(arr, ("layer", "pos"), component=kind, metric=metric_name)
        layers += _long(arr.sum(2), ("layer",), component=kind, metric=metric_name)
    heads_by_pos = _long(z.transpose(0, 1, 3, 2), ("layer", "head", "pos"), metric=metric_name)
    cols = ["component", "layer", "pos", "metric", "value", "stderr", "n"]
    return AnalysisOutput(
        head_metrics={"attribution": HeadMetric(mean=mean, stderr=se, n=prompts.n)},
        tables={
            "grid": pd.DataFrame(grid, columns=cols),
            "layers": pd.DataFrame(layers, columns=[c for c in cols if c != "pos"]),
            "heads_by_pos": pd.DataFrame(
                heads_by_pos, columns=["layer", "head", "pos", "metric", "value", "stderr", "n"]
            ),
        },
        info={
            "metric": metric_name,
            "direction": params.direction,
            "clean_logit_diff": clean_ld,
            "corrupt_logit_diff": corrupt_ld,
            "base_metric": float(res["base_metric"].mean()),
            "source_metric": float(res["source_metric"].mean()),
            "method": "attribution patching: (a_source - a_base) . dM/da on the base run",
        },
    )

"""The logit lens (nostalgebraist 2020): the residual stream after each layer read through the
final norm (its own scale) and the unembedding: per layer, ``logit[correct] - logit[incorrect]``,
``softmax[correct]`` and the rank ``1 + #{v : logit[v] > logit[correct]}`` of the answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.analyses.logit_lens import LENS_METRICS, LogitLensParams
from workbench.forward.unembed import (
    final_components,
    original,
    prompt_batches,
    softcap,
    unembed,
)
from workbench.metrics import answer_prob, logit_diff
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def answer_rank(
    logits: Float[Tensor, "batch vocab"], correct: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """1 + the number of tokens with a strictly higher logit than the correct one."""
    target = logits.gather(-1, correct[:, None])
    return (logits > target).sum(-1).float() + 1.0


def lens_logits(
    model: LoadedModel, resid: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "batch vocab"]:
    """The residual stream through the final norm (its own scale) and the unembedding."""
    with torch.no_grad():
        normed = original(model.bridge.ln_final)(resid.to(model.bridge.W_U.dtype)).float()
        return unembed(model, normed)


def logit_lens(model: LoadedModel, prompts: PromptSet, params: LogitLensParams) -> AnalysisOutput:
    """Per layer: logit difference, probability and rank of the correct answer read from the
    residual stream after that layer (module docstring). ``tables["logit_lens"]``: layer,
    metric, value, stderr, n."""
    vals: dict[str, list[Tensor]] = {k: [] for k in LENS_METRICS}
    final_err = 0.0
    for tokens, correct, incorrect in prompt_batches(prompts, params.batch_size):
        comps = final_components(model, tokens)
        per_layer: dict[str, list[Tensor]] = {k: [] for k in LENS_METRICS}
        for layer in range(model.n_layers):
            lg = lens_logits(model, comps.resid_post[:, layer])
            per_layer["logit_diff"].append(logit_diff(lg, correct, incorrect))
            per_layer["prob"].append(answer_prob(lg, correct))
            per_layer["rank"].append(answer_rank(lg, correct))
        final_err = max(final_err, float((lg - comps.logits).abs().max()))
        for k, v in per_layer.items():
            vals[k].append(torch.stack(v, 1))
    n = prompts.n
    rows = []
    for k, v in vals.items():
        m, se = mean_stderr(torch.cat(v).double().numpy())
        for layer in range(model.n_layers):
            rows.append(
                dict(layer=layer, metric=k, value=float(m[layer]), stderr=float(se[layer]), n=n)
            )
    return AnalysisOutput(
        tables={"logit_lens": pd.DataFrame(rows)},
        info={
            "last_layer_max_abs_error_vs_model_logits": final_err,
            "final_logit_softcapping": softcap(model),
            "n_prompts": n,
        },
    )

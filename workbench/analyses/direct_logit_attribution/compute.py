"""Direct logit attribution and the logit lens, at the final position.

Direct logit attribution (Elhage et al. 2021; Wang et al. 2022): the residual stream at the
final position is the sum of what every component wrote into it, and with the final norm's
scale ``s`` frozen at its actual value the logits are linear in it, so each component ``c`` has
the direct effect ``DLA(c) = N(c) . (W_U[:, correct] - W_U[:, incorrect])`` and the components
(with the constant ``final_bias``) sum exactly to the logit difference; the decomposition, the
norms written out and the soft-cap are :mod:`workbench.forward.unembed`'s docstring.
:func:`direct_logit_attribution` reports the identity's largest deviation in
``info["identity"]``.

The logit lens (nostalgebraist 2020) reads the residual stream after each layer
(``hook_resid_post``) through the final norm *with its own scale* and the unembedding (and the
soft-cap, if any); after the last layer it gives the model's logits.

TransformerLens's ``tools/analysis/direct_logit_attribution`` needs
``enable_compatibility_mode()`` (folded norms) on a ``TransformerBridge``; this module reads the
unfolded weights and applies the norms explicitly, so it needs no compatibility mode. In 4.3
the tool raises on a bridge without it; the cache methods underneath it (``stack_head_results``
+ ``logit_attrs``) used directly are silently wrong once the final norm has learned weights.
With compatibility mode TL agrees per head on Llama; on GPT-2 its heads differ from ours by
each head's value-bias share (TL folds ``b_V @ W_O`` into the output bias; ours is what
``hook_z`` carries), and on Gemma 3 its per-head results ignore the post-attention norm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.analyses.direct_logit_attribution import DLAParams
from workbench.forward.unembed import (
    attribute,
    final_components,
    final_norm,
    prompt_batches,
    softcap,
)
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, HeadMetric, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def direct_logit_attribution(
    model: LoadedModel, prompts: PromptSet, params: DLAParams
) -> AnalysisOutput:
    """DLA of every component on ``prompts.clean`` (module docstring); mean and stderr over
    prompts. ``tables["components"]``: component, layer, head (``<NA>`` where not a head or
    not a layer), value, stderr, n."""
    parts: dict[str, list[Tensor]] = {}
    for tokens, correct, incorrect in prompt_batches(prompts, params.batch_size):
        res = attribute(model, final_components(model, tokens), correct, incorrect)
        for k, v in res.items():
            parts.setdefault(k, []).append(v)
    arr = {k: torch.cat(v).double().numpy() for k, v in parts.items()}
    n = prompts.n
    rows: list[dict[str, Any]] = []

    def add(component: str, layer: Any, head: Any, values: np.ndarray) -> None:
        m, se = mean_stderr(values)
        rows.append(dict(component=component, layer=layer, head=head, value=float(m)))
        rows[-1].update(stderr=float(se), n=n)

    add("embed", pd.NA, pd.NA, arr["embed"])
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            add("head", layer, head, arr["heads"][:, layer, head])
        add("attn_bias", layer, pd.NA, arr["attn_bias"][:, layer])
        add("mlp", layer, pd.NA, arr["mlp"][:, layer])
    add("final_bias", pd.NA, pd.NA, arr["final_bias"])
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    table["head"] = table["head"].astype("Int64")
    head_mean, head_se = mean_stderr(arr["heads"])
    err = np.abs(arr["total"] - arr["target"])
    return AnalysisOutput(
        head_metrics={"dla": HeadMetric(head_mean, head_se, n)},
        tables={"components": table},
        info={
            "identity": {
                "mean_logit_diff": float(arr["target"].mean()),
                "mean_sum_of_components": float(arr["total"].mean()),
                "max_abs_error": float(err.max()),
                "target": "pre-softcap logits" if softcap(model) else "logits",
            },
            "final_norm": final_norm(model).kind,
            "final_logit_softcapping": softcap(model),
            "n_prompts": n,
        },
    )

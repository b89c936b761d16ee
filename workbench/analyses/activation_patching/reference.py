"""The slow, obvious patching loop: one full forward per patch index (the test oracle).

For each layer ``l`` and index ``ix``: run the full model on the base tokens with one hook at
``l`` that writes the donor's slice ``ix`` into a copy of the activation, read the final-position
logits, apply the metric. No resumption, no batching of variants, no skipped positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from workbench.forward.components import Index, write_patch
from workbench.hooks import hook_name, hooked

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def reference_sweep(
    model: LoadedModel,
    base_tokens: Int[Tensor, "batch pos"],
    donor_tokens: Int[Tensor, "batch pos"],
    component: str,
    layer_indices: dict[int, list[Index]],
    metric: Callable[[Tensor], Tensor],
) -> dict[tuple[int, Index], Tensor]:
    """Per-prompt metric of every patch, one full forward each."""
    bridge = model.bridge
    names = [hook_name(component, layer) for layer in layer_indices]
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(
            donor_tokens, prepend_bos=False, names_filter=lambda n: n in names
        )
    out: dict[tuple[int, Index], Tensor] = {}
    for layer, indices in layer_indices.items():
        name = hook_name(component, layer)
        donor = cache[name]
        for ix in indices:

            def hook(act: Tensor, hook: Any, ix: Index = ix, donor: Tensor = donor) -> Tensor:
                return write_patch(component, act, donor, ix)

            with torch.inference_mode(), hooked(bridge, [(name, hook)]):
                logits = bridge(base_tokens, prepend_bos=False)
            out[(layer, ix)] = metric(logits[:, -1])
    return out

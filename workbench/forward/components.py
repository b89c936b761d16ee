"""Which activation each component is, its layout, and how one patch index is written.

=============  ==============  ==========  ==============================================
component      hook kind       layout      index
=============  ==============  ==========  ==============================================
``resid_pre``  ``resid_pre``   ``b p d``   (layer, pos)
``attn_out``   ``attn_out``    ``b p d``   layer, or (layer, pos)
``mlp_out``    ``mlp_out``     ``b p d``   layer, or (layer, pos)
``z``, ``q``   ``z``, ``q``    ``b p h d`` (layer, head), or (layer, head, pos)
``k``, ``v``   ``k``, ``v``    ``b p h d`` (layer, KV head), or (..., pos); GQA: h = KV heads
``pattern``    ``pattern``     ``b h q k`` (layer, head), or (layer, head, query pos)
=============  ==============  ==========  ==============================================

A patch index is ``Index(head, pos)``: ``head = -1`` for per-layer components, ``pos = -1`` for
"all positions". For ``pattern`` the position is the query (destination) position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from workbench.hooks import HEAD_COMPONENTS, KV_COMPONENTS

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

LAYER_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True, order=True)
class Index:
    """One patched slice within a layer: ``head`` (-1: none) and ``pos`` (-1: all positions)."""

    head: int = -1
    pos: int = -1


def n_head_slots(model: LoadedModel, component: str) -> int:
    """Heads along the component's head axis: KV heads for k/v, query heads for z/q/pattern."""
    if component in KV_COMPONENTS:
        return model.n_kv_heads
    if component in HEAD_COMPONENTS:
        return model.n_heads
    return 0


def layer_indices(
    model: LoadedModel, component: str, per_position: bool, positions: Sequence[int]
) -> list[Index]:
    """Every patch index of one layer (positions: the ones to compute)."""
    n_h = n_head_slots(model, component)
    heads = list(range(n_h)) if n_h else [-1]
    if not per_position:
        return [Index(h, -1) for h in heads]
    return [Index(h, p) for h in heads for p in positions]


def patch_mask(
    component: str, indices: Sequence[Index], act_shape: Sequence[int], device: Any = None
) -> Tensor:
    """Boolean mask ``[V, 1, *act_shape[1:]]``: True where variant ``v`` takes the donor value
    (built on the CPU, returned on ``device``)."""
    mask = torch.zeros((len(indices), 1, *act_shape[1:]), dtype=torch.bool)
    for v, ix in enumerate(indices):
        pos = slice(None) if ix.pos < 0 else ix.pos
        if component == "pattern":
            mask[v, 0, ix.head, pos] = True
        elif component in LAYER_COMPONENTS:
            mask[v, 0, pos] = True
        else:
            mask[v, 0, pos, ix.head] = True
    return mask if device is None else mask.to(device)


def write_patch(component: str, act: Tensor, donor: Tensor, ix: Index) -> Tensor:
    """The obvious single patch (reference path): ``act`` with slice ``ix`` taken from ``donor``."""
    out = act.clone()
    pos = slice(None) if ix.pos < 0 else ix.pos
    if component == "pattern":
        out[:, ix.head, pos] = donor[:, ix.head, pos]
    elif component in LAYER_COMPONENTS:
        out[:, pos] = donor[:, pos]
    else:
        out[:, pos, ix.head] = donor[:, pos, ix.head]
    return out


def first_diff_position(clean: Tensor, corrupt: Tensor) -> int:
    """First position where any prompt's clean and corrupted tokens differ (seq_len if none)."""
    diff = (clean != corrupt).any(0)
    return int(diff.nonzero()[0, 0]) if bool(diff.any()) else int(clean.shape[1])

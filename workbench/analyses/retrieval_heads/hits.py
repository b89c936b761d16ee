"""Where a retrieval head's copies are counted: a sample's scored span, and its copy hits.

A head *copies* at decoding step ``t`` when its attention argmax ``a_t`` lies in the span
``[start, end)`` and the token there is the one generated (``tokens[a_t] == target_t``); its
score on a sample is the share of span tokens copied (Wu et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.analyses.retrieval_heads.span import scored_span

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import NeedleSample


def copy_hits(
    argmax: Int[Tensor, "layer head step"],
    tokens: Int[Tensor, " pos"],
    targets: Int[Tensor, " step"],
    span: tuple[int, int],
) -> Float[Tensor, "layer head"]:
    """``sum_t [start <= argmax_t < end and tokens[argmax_t] == targets_t] / (end - start)``;
    all zero for an empty span (the authors' search found none: ``(-1, -1)``)."""
    start, end = span
    if end <= start:
        return torch.zeros(argmax.shape[:-1], dtype=torch.float64)
    inside = (argmax >= start) & (argmax < end)
    same = tokens[argmax.clamp(0, int(tokens.shape[0]) - 1)] == targets
    return (inside & same).sum(dim=-1).double() / (end - start)


def sample_spans(
    model: LoadedModel, samples: Sequence[NeedleSample], how: str
) -> list[tuple[int, int]]:
    """The span each sample's hits are counted in (:func:`.span.scored_span`)."""

    def encode(text: str) -> list[int]:
        return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])

    return [
        scored_span(
            model.codec.decode, encode, s.context.tolist(), s.needle_span, s.real_needle, how
        )
        for s in samples
    ]

"""Decode mode of a KV-cache plan: DuoAttention's needle protocol with real eviction.

The context is prefilled in chunks with the plan in mask mode, the dropped entries are deleted
from the KV cache (:meth:`workbench.streaming.StreamAttention.evict`), and the rest of the
prompt and the answer are fed one token at a time (``workbench.streaming`` has the formulas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.streaming import StreamAttention

if TYPE_CHECKING:
    from workbench.circuits.kvplans import KVPlan
    from workbench.models.loading import LoadedModel


@dataclass
class Decoded:
    """Decode mode's outputs: ``logits[i]`` predicts the token after fed position ``start + i``;
    ``tokens`` are the greedy tokens generated (empty when ``max_new_tokens`` is 0)."""

    start: int
    logits: Float[Tensor, "steps vocab"]
    tokens: list[int]


@torch.no_grad()
def decode_with_eviction(
    model: LoadedModel,
    plan: KVPlan,
    context: Int[Tensor, " pos"],
    *,
    feed_last: int = 50,
    max_new_tokens: int = 0,
    chunk: int = 512,
    stop: Callable[[list[int]], bool] | None = None,
    forced: Int[Tensor, " ans"] | None = None,
) -> Decoded:
    """DuoAttention's protocol (module docstring): prefill ``context[:-feed_last]`` in chunks of
    ``chunk`` tokens, evict, feed the rest one token at a time, then ``forced`` tokens (teacher
    forcing) or greedy tokens up to ``max_new_tokens`` (stopping where ``stop(tokens)`` says)."""
    n = int(context.shape[0])
    feed_last = max(1, min(int(feed_last), n - 1))
    split = n - feed_last
    ids = context.to(model.device)
    with StreamAttention(model, plan, mode="decode") as s:
        cache = None
        for start in range(0, split, chunk):
            piece = ids[start : min(split, start + chunk)][None]
            _, cache = model.bridge(
                piece, prepend_bos=False, return_type="logits_and_cache", use_cache=True,
                past_key_values=cache, logits_to_keep=1,
            )  # fmt: skip
        s.start_decoding()
        logits: list[Tensor] = []
        pos = split

        def step(tok: int) -> None:
            nonlocal cache, pos
            s.evict(cache, pos)
            out, cache = model.bridge(
                torch.tensor([[tok]], device=model.device), prepend_bos=False,
                return_type="logits_and_cache", use_cache=True, past_key_values=cache,
            )  # fmt: skip
            logits.append(out[0, -1].float())
            pos += 1

        for tok in [int(t) for t in ids[split:]] + [
            int(t) for t in (forced if forced is not None else [])
        ]:
            step(tok)
        generated: list[int] = []
        while len(generated) < max_new_tokens:
            tok = int(logits[-1].argmax())
            generated.append(tok)
            if (stop is not None and stop(generated)) or len(generated) == max_new_tokens:
                break
            step(tok)
    return Decoded(split, torch.stack(logits), generated)

"""Decode mode of a KV-cache plan: DuoAttention's needle protocol with real eviction.

The context is prefilled in chunks with the plan in mask mode, the dropped entries are deleted
from the KV cache (:func:`evict`), and the rest of the prompt and the answer are fed one token
at a time (``workbench.forward.streaming`` has the formulas).

Where every KV head of a layer streams, its dropped entries are physically removed: the layer
becomes a :class:`CompactLayer` holding ``sink + window`` positions, which reports the absolute
length so the model's positions stay those of the whole sequence. In a layer that keeps some
KV head full, one ``[batch, kv_head, pos, d]`` tensor serves all its heads, so the streaming
heads' entries are zeroed and masked instead (no memory saved there). ``Decoded`` reports the
bytes the cache holds against those of the unmodified cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from workbench.errors import WorkbenchError
from workbench.forward.streaming import StreamAttention

if TYPE_CHECKING:
    from workbench.forward.plan import KVPlan
    from workbench.models.loading import LoadedModel


@dataclass
class Decoded:
    """Decode mode's outputs: ``logits[i]`` predicts the token after fed position ``start + i``;
    ``tokens`` are the greedy tokens generated (empty when ``max_new_tokens`` is 0);
    ``cache_bytes`` the keys and values the KV cache holds at the end, ``full_cache_bytes``
    what it would hold unmodified (its layers at their own lengths, evicted entries counted)."""

    start: int
    logits: Float[Tensor, "steps vocab"]
    tokens: list[int]
    cache_bytes: int = 0
    full_cache_bytes: int = 0

    @property
    def cache_fraction(self) -> float:
        """``cache_bytes / full_cache_bytes``: what the plan really keeps."""
        return self.cache_bytes / self.full_cache_bytes if self.full_cache_bytes else 1.0


class CompactLayer(DynamicLayer):
    """A ``DynamicLayer`` whose evicted entries are gone: it holds the sink and the window, and
    ``get_seq_length() = held + removed``, the absolute length, which the model's positions and
    its mask sizes are read from (a single query's mask row is all visible, so the bridge's cut
    of the mask to the keys it holds is exact)."""

    removed: int = 0

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.removed


def _compact(cache: Any, layer: int) -> CompactLayer:
    entry = cache.layers[layer]
    if isinstance(entry, CompactLayer):
        return entry
    new = CompactLayer()
    new.__dict__.update(entry.__dict__)
    new.removed = 0
    cache.layers[layer] = new
    return new


def _layout_error(layer: int, n: int) -> WorkbenchError:
    return WorkbenchError(
        f"layer {layer}'s KV cache is not a plain [batch, kv_head, pos, d] tensor of {n} "
        "positions (a changed transformers cache layout?)",
        "use the pinned transformers version",
    )


def evict(s: StreamAttention, cache: Any, next_pos: int) -> None:
    """Delete from ``cache`` every streaming entry the query at ``next_pos`` drops (positions
    ``sink .. next_pos - window``), adding them to the compensation sums: removed where every
    KV head of the layer streams, zeroed (and masked by the scores hook) elsewhere."""
    plan = s.plan
    stop = max(plan.sink, next_pos - plan.window + 1)  # first position still kept
    for layer, st in s.layers.items():
        entry = cache.layers[layer]
        keys, values = getattr(entry, "keys", None), getattr(entry, "values", None)
        removed = entry.removed if isinstance(entry, CompactLayer) else 0
        if (
            keys is None
            or values is None
            or getattr(entry, "is_sliding", False)
            or keys.dim() != 4
            or int(keys.shape[2]) != next_pos - removed
        ):
            raise _layout_error(layer, next_pos)
        start = plan.sink + st.evicted
        if stop <= start:
            continue
        lo, hi = start - removed, stop - removed  # where positions [start, stop) are held
        g = torch.tensor(st.kv_heads, device=keys.device)
        k_gone = keys[:, g, lo:hi].float().sum(2)  # [b, g, d]
        v_gone = values[:, g, lo:hi].float().sum(2)
        n_kv = int(keys.shape[1])
        if st.ksum is None or st.vsum is None:
            st.ksum = keys.new_zeros((keys.shape[0], n_kv, keys.shape[-1]), dtype=torch.float)
            st.vsum = values.new_zeros(st.ksum.shape, dtype=torch.float)
        st.ksum[:, g] += k_gone
        st.vsum[:, g] += v_gone
        if st.all_heads and type(entry) in (DynamicLayer, CompactLayer):
            held = _compact(cache, layer)
            held.keys = torch.cat([keys[:, :, :lo], keys[:, :, hi:]], 2)
            held.values = torch.cat([values[:, :, :lo], values[:, :, hi:]], 2)
            held.removed += hi - lo
            st.compact = True
        else:
            for h in st.kv_heads:
                keys[:, h, lo:hi] = 0
                values[:, h, lo:hi] = 0
        st.evicted = stop - plan.sink
    if int(cache.get_seq_length()) != next_pos:
        raise WorkbenchError(
            f"after the eviction the KV cache reports {int(cache.get_seq_length())} positions, "
            f"not {next_pos} (a changed transformers cache?): positions would be wrong",
            "use the pinned transformers version",
        )


def cache_bytes(cache: Any) -> tuple[int, int]:
    """(bytes of keys and values ``cache`` holds, bytes it would hold with nothing removed)."""
    held = full = 0
    for entry in cache.layers:
        keys, values = getattr(entry, "keys", None), getattr(entry, "values", None)
        if keys is None or values is None or keys.dim() != 4:
            continue
        per_pos = (keys[:, :, :1].numel() * keys.element_size()
                   + values[:, :, :1].numel() * values.element_size())  # fmt: skip
        n = int(keys.shape[2])
        held += per_pos * n
        full += per_pos * (n + (entry.removed if isinstance(entry, CompactLayer) else 0))
    return held, full


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
            evict(s, cache, pos)
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
        held, full = cache_bytes(cache)
    return Decoded(split, torch.stack(logits), generated, held, full)

"""Prefill with a shared-prefix KV cache, greedy decoding, and attention argmax inside hooks.

Three pieces shared by the faithful and fast retrieval scores and by causal validation:

- :func:`prefilled`: yields each sample's KV cache after its context, in an order that lets
  samples reuse the cache of the prefix they share. Samples are sorted by (length, needle,
  haystack, depth); a *base* cache holds the prefix sample ``i`` shares with sample ``i + 1``
  (for depths of one haystack: the haystack before the shallower needle), extended as the depth
  grows and dropped when a sample no longer starts with it; each sample copies the base and
  prefills only the rest of its context. Chunks of ``chunk`` tokens bound the transient
  ``chunk x T`` attention maps of the prefill; only the last position's logits are computed.
- :class:`ArgmaxRecorder`: hooks on ``hook_pattern`` that reduce each layer's attention to
  ``argmax_k A[h, q, k]`` for all heads at once (one tensor op per layer), as absolute key
  positions; nothing of size ``T x T`` is kept.
- :func:`greedy_answers`: greedy decoding with the KV cache (no hooks), the answers' text and
  their ROUGE-1 recall against ``real_needle``.

Reusing the prefix is exact up to floating-point summation order: keys and values of a token
depend only on the tokens before it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.hooks import hook_name
from workbench.methods.retrieval.rouge import rouge1_recall
from workbench.types import NeedleSample

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


@torch.no_grad()
def forward_step(
    model: LoadedModel, ids: Int[Tensor, " pos"], cache: Any | None, keep: int = 1
) -> tuple[Float[Tensor, "keep vocab"], Any]:
    """One forward of ``ids`` after ``cache``; the logits of the last ``keep`` positions and
    the extended cache (``cache`` itself is extended in place by the model)."""
    kwargs: dict[str, Any] = {"use_cache": True, "logits_to_keep": keep}
    if cache is not None:
        kwargs["past_key_values"] = cache
    logits, cache = model.bridge(
        ids[None], prepend_bos=False, return_type="logits_and_cache", **kwargs
    )
    return logits[0], cache


def _extend(
    model: LoadedModel, ids: Int[Tensor, " pos"], cache: Any | None, chunk: int
) -> tuple[Float[Tensor, " vocab"] | None, Any]:
    logits = None
    for start in range(0, int(ids.shape[0]), chunk):
        out, cache = forward_step(model, ids[start : start + chunk], cache)
        logits = out[-1]
    return logits, cache


def _lcp(a: Tensor, b: Tensor) -> int:
    n = min(int(a.shape[0]), int(b.shape[0]))
    diff = (a[:n] != b[:n]).nonzero()
    return n if diff.numel() == 0 else int(diff[0, 0])


def processing_order(samples: Sequence[NeedleSample]) -> list[int]:
    """Indices sorted so that samples sharing a prefix are neighbours, shallow depth first."""
    return sorted(
        range(len(samples)),
        key=lambda i: (
            int(samples[i].context.shape[0]),
            samples[i].needle,
            samples[i].haystack,
            samples[i].depth_percent,
            i,
        ),
    )


@dataclass
class Prefilled:
    """A sample's KV cache after its whole context, and the last position's logits."""

    index: int
    cache: Any
    last_logits: Float[Tensor, " vocab"]
    reused: int  # context tokens read from a shared prefix's cache, not recomputed


def prefilled(
    model: LoadedModel, samples: Sequence[NeedleSample], *, chunk: int = 512, reuse: bool = True
) -> Iterator[Prefilled]:
    """Each sample's prefilled cache, in :func:`processing_order` (module doc)."""
    order = processing_order(samples)
    base_ids: Tensor | None = None
    base_cache: Any = None
    for pos, i in enumerate(order):
        ctx = samples[i].context
        share = 0
        if reuse and pos + 1 < len(order):
            share = min(_lcp(ctx, samples[order[pos + 1]].context), int(ctx.shape[0]) - 1)
        if base_ids is not None and _lcp(ctx, base_ids) < int(base_ids.shape[0]):
            base_ids, base_cache = None, None
        have = 0 if base_ids is None else int(base_ids.shape[0])
        if share > have:
            _, base_cache = _extend(model, ctx[have:share], base_cache, chunk)
            base_ids, have = ctx[:share], share
        cache = copy.deepcopy(base_cache) if have else None
        logits, cache = _extend(model, ctx[have:], cache, chunk)
        assert logits is not None
        yield Prefilled(i, cache, logits, have)


class ArgmaxRecorder:
    """``hook_pattern`` hooks that keep, per layer, ``argmax_k`` of each query row for all heads.

    Set ``total`` (the number of keys the next forward attends over, cache included) before
    each forward; ``argmax()`` returns ``Int[Tensor, "layer head q"]`` absolute key positions
    (a sliding-window layer that sees only the last ``w`` keys is shifted by ``total - w``).
    While ``active`` is False the hooks do nothing.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.active = False
        self.total = 0
        self._out: list[Tensor | None] = [None] * n_layers

    def hooks(self) -> list[tuple[str, Any]]:
        return [(hook_name("pattern", la), self._make(la)) for la in range(self.n_layers)]

    def _make(self, layer: int) -> Any:
        def hook(pattern: Tensor, hook: Any) -> None:
            if self.active:
                idx = pattern[0].detach().argmax(dim=-1)  # [head, q]
                self._out[layer] = idx + (self.total - int(pattern.shape[-1]))

        return hook

    def argmax(self) -> Int[Tensor, "layer head q"]:
        if any(o is None for o in self._out):
            raise RuntimeError("a layer's attention pattern was not recorded")
        out = torch.stack([o for o in self._out if o is not None])
        self._out = [None] * self.n_layers
        return out


def copy_hits(
    argmax: Int[Tensor, "layer head step"],
    tokens: Int[Tensor, " pos"],
    targets: Int[Tensor, " step"],
    span: tuple[int, int],
) -> Float[Tensor, "layer head"]:
    """``sum_t [start <= argmax_t < end and tokens[argmax_t] == targets_t] / (end - start)``."""
    start, end = span
    inside = (argmax >= start) & (argmax < end)
    same = tokens[argmax.clamp(0, int(tokens.shape[0]) - 1)] == targets
    return (inside & same).sum(dim=-1).double() / (end - start)


def stop_ids(model: LoadedModel) -> frozenset[int]:
    """Token ids that end an answer: EOS (and the chat end-of-turn token if any)."""
    tok = model.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
        if tid is not None:
            ids.add(int(tid))
    return frozenset(int(i) for i in ids)


def is_stop(model: LoadedModel, token: int, stops: frozenset[int], so_far: str) -> bool:
    """EOS / end of turn, or a newline once the answer has some text (the reference code stops
    at a newline)."""
    return token in stops or ("\n" in model.codec.decode([token]) and bool(so_far.strip()))


def check_samples(
    model: LoadedModel,
    samples: Sequence[NeedleSample],
    *,
    answers: Sequence[Tensor] | None = None,
) -> None:
    """One-line errors for unusable samples: needle span outside the context or not holding
    the needle's tokens, or a context longer than the model's (plus the teacher-forced
    ``answers`` fed after it, or else one generated token)."""
    if not samples:
        raise WorkbenchError("the needle set has no samples", "give at least one depth and length")
    n_ctx = int(model.codec.n_ctx)
    for i, s in enumerate(samples):
        n = int(s.context.shape[0])
        start, end = s.needle_span
        if not 0 <= start < end <= n:
            raise WorkbenchError(
                f"sample {i}: needle span [{start}, {end}) is outside its {n}-token context",
                "build needle spans inside the context (the needle task does)",
            )
        got = model.codec.decode(s.context[start:end].tolist())
        if "".join(got.split()) != "".join(s.needle.split()):  # tokenizers differ in spacing
            raise WorkbenchError(
                f"sample {i}: needle {s.needle[:40]!r} not found in the tokenised context "
                f"(span [{start}, {end}) reads {got.strip()[:40]!r})",
                "check the needle text and its span",
            )
        extra = 1 if answers is None else int(answers[i].shape[0]) - 1
        if n + extra > n_ctx:
            raise WorkbenchError(
                f"sample {i}: context of {n} tokens (+{extra} answer tokens) exceeds the "
                f"model's context {n_ctx}",
                f"use context lengths <= {n_ctx - extra}",
            )
        if int(s.answer.shape[0]) < 1 or (answers is not None and int(answers[i].shape[0]) < 1):
            raise WorkbenchError(f"sample {i}: empty answer", "give real_needle some text")


@dataclass
class Decoded:
    """A greedy answer: ``tokens`` as generated (a final stop token included), the answer text
    (stop token left out), and, when recorded, the argmax key of every decoding step."""

    index: int
    tokens: list[int]
    text: str
    recall: float
    argmax: Tensor | None = None  # Int[Tensor, "layer head step"], step t predicts tokens[t]


def decode_sample(
    model: LoadedModel,
    pre: Prefilled,
    sample: NeedleSample,
    *,
    max_new_tokens: int,
    stops: frozenset[int],
    recorder: ArgmaxRecorder | None = None,
) -> Decoded:
    """Greedy decoding after a prefilled context (Wu et al.'s loop).

    ``g_0`` is the prefill's argmax; decoding step ``t >= 1`` feeds ``g_{t-1}`` and yields
    ``g_t``; with a ``recorder`` (its hooks attached by the caller) step ``t`` records the argmax
    key of the query at ``g_{t-1}``, as the reference scores the attentions of every step after
    the prefill. Stops after a stop token (:func:`is_stop`), after ``max_new_tokens`` tokens,
    or at the model's context length.
    """
    n = int(sample.context.shape[0])
    limit = min(max_new_tokens, int(model.codec.n_ctx) - n)
    tok, cache = int(pre.last_logits.argmax()), pre.cache
    gen, steps = [tok], []
    with torch.no_grad():
        while len(gen) < limit and not is_stop(model, tok, stops, model.codec.decode(gen[:-1])):
            if recorder is not None:
                recorder.total, recorder.active = n + len(gen), True
            logits, cache = forward_step(model, torch.tensor([tok]), cache)
            tok = int(logits[-1].argmax())
            gen.append(tok)
            if recorder is not None:
                recorder.active = False
                steps.append(recorder.argmax()[..., -1])
    body = gen[:-1] if is_stop(model, gen[-1], stops, model.codec.decode(gen[:-1])) else gen
    text = model.codec.decode(body).strip()
    argmax = torch.stack(steps, dim=-1) if steps else None
    return Decoded(pre.index, gen, text, rouge1_recall(sample.real_needle, text), argmax)


def greedy_answers(
    model: LoadedModel,
    samples: Sequence[NeedleSample],
    *,
    max_new_tokens: int,
    chunk: int = 512,
    reuse: bool = True,
) -> list[Decoded]:
    """Greedy answers (KV cache, no hooks of its own) and their ROUGE-1 recall, in sample
    order. Runs inside whatever intervention the caller holds (e.g. a head ablation)."""
    stops = stop_ids(model)
    out: dict[int, Decoded] = {}
    for pre in prefilled(model, samples, chunk=chunk, reuse=reuse):
        out[pre.index] = decode_sample(
            model, pre, samples[pre.index], max_new_tokens=max_new_tokens, stops=stops
        )
    return [out[i] for i in range(len(samples))]

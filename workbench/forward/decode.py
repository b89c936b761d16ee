"""Prefill with a shared-prefix KV cache, greedy decoding, and attention argmax inside hooks.

Three pieces shared by the faithful and fast retrieval scores and by causal validation:

- :func:`prefilled`: yields each sample's KV cache after its context, in an order that lets
  samples reuse the cache of the prefix they share. Samples are sorted by (length, needle,
  haystack, depth); a *base* cache holds the prefix sample ``i`` shares with sample ``i + 1``
  (for depths of one haystack: the haystack before the shallower needle), extended as the depth
  grows and dropped when a sample no longer starts with it; each sample copies the base and
  prefills only the rest of its context. Chunks of ``chunk`` tokens bound the transient
  ``chunk x T`` attention maps of the prefill; only the last position's logits are computed.
  With ``hold_last`` the prefill stops one token short, as Wu et al.'s code does
  (``model(input_ids[:, :-1])``), so the query that produces the first answer token is a
  decoding step and can be scored.
- :class:`ArgmaxRecorder`: hooks on ``hook_pattern`` that reduce each layer's attention to
  ``argmax_k A[h, q, k]`` for all heads at once (one tensor op per layer), as absolute key
  positions; nothing of size ``T x T`` is kept.
- :func:`decode_batch`: greedy decoding of samples of one length together (their caches
  stacked along the batch axis, one forward per step for all of them; a finished sample leaves
  the batch), recording each step's argmax; with ``lookahead`` each forward also verifies
  tokens drafted from the context (prompt lookup), keeping only greedy decoding's own tokens.
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
from workbench.forward.answers import rouge1_recall
from workbench.hooks import hook_name
from workbench.types import NeedleSample

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


@torch.no_grad()
def forward_batch(
    model: LoadedModel, ids: Int[Tensor, "batch pos"], cache: Any | None, keep: int = 1
) -> tuple[Float[Tensor, "batch keep vocab"], Any]:
    """One forward of equally long sequences ``ids`` (no padding, no mask) after ``cache``;
    the logits of the last ``keep`` positions and the extended cache (``cache`` itself is
    extended in place by the model)."""
    kwargs: dict[str, Any] = {"use_cache": True, "logits_to_keep": keep}
    if cache is not None:
        kwargs["past_key_values"] = cache
    logits, cache = model.bridge(ids, prepend_bos=False, return_type="logits_and_cache", **kwargs)
    return logits, cache


def forward_step(
    model: LoadedModel, ids: Int[Tensor, " pos"], cache: Any | None, keep: int = 1
) -> tuple[Float[Tensor, "keep vocab"], Any]:
    """:func:`forward_batch` of one sequence."""
    logits, cache = forward_batch(model, ids[None], cache, keep)
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
    """A sample's KV cache after its context, and the last position's logits; with
    ``hold_last`` the cache stops one token short and ``last_logits`` is None (the last
    context token is the first decoding step's input)."""

    index: int
    cache: Any
    last_logits: Float[Tensor, " vocab"] | None
    reused: int  # context tokens read from a shared prefix's cache, not recomputed


def prefilled(
    model: LoadedModel,
    samples: Sequence[NeedleSample],
    *,
    chunk: int = 512,
    reuse: bool = True,
    hold_last: bool = False,
) -> Iterator[Prefilled]:
    """Each sample's prefilled cache, in :func:`processing_order` (module doc)."""
    order = processing_order(samples)
    base_ids: Tensor | None = None
    base_cache: Any = None
    for pos, i in enumerate(order):
        full = samples[i].context
        ctx = full[:-1] if hold_last else full
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
        assert hold_last or logits is not None
        yield Prefilled(i, cache, None if hold_last else logits, have)


class ArgmaxRecorder:
    """``hook_pattern`` hooks that keep, per layer, ``argmax_k`` of each query row for all heads.

    Set ``total`` (the number of keys the next forward attends over, cache included) before
    each forward; ``argmax()`` returns ``Int[Tensor, "layer batch head q"]`` absolute key positions
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
                idx = pattern.detach().argmax(dim=-1)  # [batch, head, q]
                self._out[layer] = idx + (self.total - int(pattern.shape[-1]))

        return hook

    def argmax(self) -> Int[Tensor, "layer batch head q"]:
        if any(o is None for o in self._out):
            raise RuntimeError("a layer's attention pattern was not recorded")
        out = torch.stack([o for o in self._out if o is not None])
        self._out = [None] * self.n_layers
        return out


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


def answer_recall(
    model: LoadedModel, sample: NeedleSample, tokens: list[int], stops: frozenset[int]
) -> float:
    """ROUGE-1 recall of ``sample.real_needle`` in the decoded answer ``tokens`` (a final stop
    token left out): :func:`~workbench.forward.answers.rouge1_recall`."""
    last = bool(tokens) and is_stop(model, tokens[-1], stops, model.codec.decode(tokens[:-1]))
    body = tokens[:-1] if last else tokens
    return float(rouge1_recall(sample.real_needle, model.codec.decode(body).strip()))


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
        if n < 2:
            raise WorkbenchError(
                f"sample {i}: context of {n} token(s)", "give contexts of at least 2 tokens"
            )
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
    (stop token left out), and, when recorded, the argmax key of every decoding step.

    ``argmax[..., j]`` is the step that predicted ``tokens[j + first]``: ``first`` is 0 when
    the prefill was held one token short (the first answer token is a scored step), else 1.
    """

    index: int
    tokens: list[int]
    text: str
    recall: float
    argmax: Tensor | None = None  # Int[Tensor, "layer head step"]
    first: int = 1


def stack_caches(caches: Sequence[Any]) -> Any:
    """One cache holding ``caches`` (equal lengths) along the batch axis; reuses the first."""
    out = caches[0]
    if len(caches) > 1:
        for la, layer in enumerate(out.layers):
            layer.keys = torch.cat([c.layers[la].keys for c in caches])
            layer.values = torch.cat([c.layers[la].values for c in caches])
    return out


def lookup_draft(seq: Sequence[int], k: int, longest: int = 3) -> list[int]:
    """Prompt-lookup draft (Saxena 2023): the ``k`` tokens that followed the latest earlier
    occurrence of ``seq``'s last ``n``-gram, for ``n = longest .. 1``; [] when none occurs."""
    if k < 1:
        return []
    size = len(seq)
    for n in range(min(longest, size - 1), 0, -1):
        tail = list(seq[size - n :])
        for i in range(size - n - 1, -1, -1):
            if list(seq[i : i + n]) == tail:
                return list(seq[i + n : i + n + k])
    return []


def decode_batch(
    model: LoadedModel,
    pres: Sequence[Prefilled],
    samples: Sequence[NeedleSample],
    *,
    max_new_tokens: int,
    stops: frozenset[int],
    recorder: ArgmaxRecorder | None = None,
    lookahead: int = 0,
) -> list[Decoded]:
    """Greedy decoding after prefilled contexts of one length (Wu et al.'s loop, batched).

    A held prefill (``last_logits`` None) feeds the last context token first, so that step's
    query produces ``g_0`` and is recorded; otherwise ``g_0`` is the prefill's argmax. Each
    further step feeds ``g_{t-1}`` and yields ``g_t``. With a ``recorder`` (its hooks attached
    by the caller) every step records the argmax key of its query. A sample stops after a stop
    token (:func:`is_stop`), after ``max_new_tokens`` tokens, or at the model's context length;
    ``samples[j]`` belongs to ``pres[j]``; finished samples leave the batch.

    ``lookahead > 0`` verifies drafted tokens (:func:`lookup_draft` over the context and the
    answer so far) in the same forward: with fed tokens ``x_0`` (the last greedy token) and
    draft ``x_1..x_k``, query row ``i`` predicts ``p_i``, and ``p_0..p_{a-1}`` are greedy
    decoding's tokens where ``x_1..x_{a-1} == p_0..p_{a-2}`` (causal attention: row ``i`` sees
    only ``x_0..x_i``, so its query and attention are those of the plain step). The batch
    keeps ``min_j a_j`` tokens (the cache is cropped back to them); a sample's further verified
    tokens head its next draft. Same tokens and argmaxes as plain decoding, up to float
    summation order; fewer forwards when the model copies from its context.
    """
    n = int(samples[0].context.shape[0])
    if any(int(s.context.shape[0]) != n for s in samples):
        raise ValueError("decode_batch needs samples of one length")
    limit = min(max_new_tokens, int(model.codec.n_ctx) - n)
    held = pres[0].last_logits is None
    b = len(pres)
    cache = stack_caches([p.cache for p in pres]) if b > 1 else pres[0].cache
    if not all(_plain_layer(la) for la in getattr(cache, "layers", [None])):
        lookahead = 0  # e.g. sliding-window layers cannot be cropped back
    gen: list[list[int]] = [[] for _ in range(b)]
    steps: list[list[Tensor]] = [[] for _ in range(b)]
    pending: list[list[int]] = [[] for _ in range(b)]
    ctx = [s.context.tolist() for s in samples]
    if held:
        last = [c[-1] for c in ctx]
        seen = n - 1
    else:
        for j, p in enumerate(pres):
            assert p.last_logits is not None
            gen[j].append(int(p.last_logits.argmax()))
        last, seen = [g[-1] for g in gen], n
    alive = [j for j in range(b) if held or not _finished(model, gen[j], limit, stops)]
    if len(alive) < b:
        cache = _select(cache, alive, b)
    with torch.no_grad():
        while alive:
            room = min(lookahead, int(model.codec.n_ctx) - seen - 1)
            drafts = [
                (pending[j] + lookup_draft(ctx[j] + gen[j] + pending[j], room))[:room]
                for j in alive
            ]
            m = 1 + max(len(d) for d in drafts)
            rows = [
                [last[j], *d, *[last[j]] * (m - 1 - len(d))]
                for j, d in zip(alive, drafts, strict=True)
            ]
            if recorder is not None:
                recorder.total, recorder.active = seen + m, True
            ids = torch.tensor(rows, device=model.device)
            logits, cache = forward_batch(model, ids, cache, keep=m)
            preds = logits.argmax(dim=-1).tolist()  # [alive, m]
            arg = None
            if recorder is not None:
                recorder.active = False
                arg = recorder.argmax()  # [layer, alive, head, m]
            accepted = []
            for row, pred in zip(rows, preds, strict=True):
                a = 1
                while a < m and row[a] == pred[a - 1]:
                    a += 1
                accepted.append(a)
            keep = min(accepted)
            for pos, j in enumerate(alive):
                for i in range(keep):
                    gen[j].append(int(preds[pos][i]))
                    if arg is not None:
                        steps[j].append(arg[:, pos, :, i])
                    if _finished(model, gen[j], limit, stops):
                        break
                pending[j] = preds[pos][keep : accepted[pos]]
                last[j] = gen[j][-1]
            seen += keep
            if keep < m:
                _crop(cache, seen)
            still = [j for j in alive if not _finished(model, gen[j], limit, stops)]
            if still and len(still) < len(alive):  # drop finished samples from the batch
                cache = _select(cache, [alive.index(j) for j in still], len(alive))
            alive = still
    out = []
    for j, (p, s) in enumerate(zip(pres, samples, strict=True)):
        g = gen[j]
        body = g[:-1] if is_stop(model, g[-1], stops, model.codec.decode(g[:-1])) else g
        text = model.codec.decode(body).strip()
        argmax = torch.stack(steps[j], dim=-1) if steps[j] else None
        first = 0 if held else 1
        out.append(Decoded(p.index, g, text, rouge1_recall(s.real_needle, text), argmax, first))
    return out


def _plain_layer(layer: Any) -> bool:
    """A cache layer that keeps every key (no sliding window), as ``keys`` / ``values``."""
    return getattr(layer, "is_sliding", True) is False and hasattr(layer, "keys")


def _crop(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of every layer (plain layers only)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def _device(cache: Any) -> Any:
    """The device of a KV cache's tensors (the CPU for an empty one)."""
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if keys is not None and hasattr(keys, "device"):
            return keys.device
    return "cpu"


def _select(cache: Any, keep: list[int], size: int) -> Any:
    """``cache`` restricted to the batch rows ``keep`` (of ``size``)."""
    if keep != list(range(size)):
        cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=_device(cache)))
    return cache


def _finished(model: LoadedModel, gen: list[int], limit: int, stops: frozenset[int]) -> bool:
    return len(gen) >= limit or is_stop(model, gen[-1], stops, model.codec.decode(gen[:-1]))


def decode_sample(
    model: LoadedModel,
    pre: Prefilled,
    sample: NeedleSample,
    *,
    max_new_tokens: int,
    stops: frozenset[int],
    recorder: ArgmaxRecorder | None = None,
) -> Decoded:
    """:func:`decode_batch` of one sample."""
    (dec,) = decode_batch(
        model, [pre], [sample], max_new_tokens=max_new_tokens, stops=stops, recorder=recorder
    )
    return dec


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

"""Faithful retrieval-head scores (Wu et al. 2024): greedy decoding with a KV cache.

For a sample with scored span ``[s, e)`` in context ``x`` (``span``: by default the tokens of
``real_needle`` inside the needle, :mod:`.span`) and greedy tokens ``g_0, g_1, ...``: the
prefill stops one token short, as the authors' code does, so decoding step ``t >= 0`` feeds
``x[-1]`` (``t = 0``) or ``g_{t-1}`` and yields ``g_t``. For every layer ``l`` and query head
``h`` (grouped-query attention: per query head) let ``k*_t = argmax_k A^{l,h}[t, k]`` over all
keys (context and tokens generated so far). Then

    score_{l,h} = sum_{t >= 0} [s <= k*_t < e  and  g_t == x[k*_t]] / (e - s)

(the authors' "copy-paste" hit, the first answer token included; a span the authors' search
does not find scores 0). Decoding stops after ``max_new_tokens`` tokens (the authors: 50) or
at a stop token: EOS / end of turn, or a newline once the answer has text (the authors stop at
the Llama-2 newline token ``<0x0A>``; the step that yields the stop token is scored, as theirs
is). A sample counts when the ROUGE-1 recall (Porter stemming, :mod:`.rouge`) of its answer
against ``real_needle`` exceeds ``recall_threshold`` (0.5 in the paper); a head's retrieval
score is the mean over counted samples.

Speed, not definition: the argmax is taken inside ``hook_pattern`` hooks, one tensor op per
layer for all heads (no ``T x T`` map kept); samples of one context length are decoded
together, ``decode_batch`` at a time; each forward also verifies up to ``lookahead`` tokens
drafted from the context (prompt lookup), keeping only those greedy decoding would produce;
samples sharing a prefix reuse its KV cache (:mod:`.decode`). All of it is exact up to
floating-point summation order (tested against one-token-at-a-time decoding and against the
authors' loop, ``benchmarks/bench_retrieval.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.analyses.retrieval_heads import RetrievalParams
from workbench.analyses.retrieval_heads.hits import copy_hits, sample_spans
from workbench.forward.decode import (
    ArgmaxRecorder,
    Prefilled,
    decode_batch,
    prefilled,
    stop_ids,
)
from workbench.hooks import hooked
from workbench.types import NeedleSample

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


@dataclass
class SampleScore:
    """One sample's per-head score, its answer, ROUGE-1 recall, the scored span, and whether
    it counts (faithful: recall > threshold; fast: see :mod:`.fast`)."""

    index: int
    score: Float[Tensor, "layer head"]
    recall: float
    answer: str
    steps: int
    reused: int
    span: tuple[int, int]
    counted: bool


def faithful_scores(
    model: LoadedModel,
    samples: Sequence[NeedleSample],
    params: RetrievalParams,
    *,
    spans: Sequence[tuple[int, int]] | None = None,
) -> list[SampleScore]:
    """Per-sample faithful scores (module formula), in sample order; ``spans``: each sample's
    scored span if already computed (else :func:`.hits.sample_spans`)."""
    stops = stop_ids(model)
    if spans is None:
        spans = sample_spans(model, samples, params.span)
    recorder = ArgmaxRecorder(model.n_layers)
    out: dict[int, SampleScore] = {}
    batch: list[Prefilled] = []

    def flush() -> None:
        group = [samples[p.index] for p in batch]
        decoded = decode_batch(
            model, batch, group, max_new_tokens=params.max_new_tokens, stops=stops,
            recorder=recorder, lookahead=params.lookahead,
        )  # fmt: skip
        for pre, s, dec in zip(batch, group, decoded, strict=True):
            span = spans[pre.index]
            if dec.argmax is None:
                score = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
            else:
                dev = dec.argmax.device
                generated = torch.tensor(dec.tokens, dtype=torch.long, device=dev)
                tokens = torch.cat([s.context.to(dev), generated])
                targets = torch.tensor(dec.tokens[dec.first :], dtype=torch.long, device=dev)
                score = copy_hits(dec.argmax, tokens, targets, span)
            steps = 0 if dec.argmax is None else int(dec.argmax.shape[-1])
            counted = dec.recall > params.recall_threshold
            out[pre.index] = SampleScore(
                pre.index, score, dec.recall, dec.text, steps, pre.reused, span, counted
            )
        batch.clear()

    with hooked(model.bridge, recorder.hooks()):
        for pre in prefilled(
            model, samples, chunk=params.prefill_chunk, reuse=params.reuse_prefix, hold_last=True
        ):
            n = int(samples[pre.index].context.shape[0])
            if batch and (
                len(batch) == params.decode_batch
                or int(samples[batch[0].index].context.shape[0]) != n
            ):
                flush()
            batch.append(pre)
        if batch:
            flush()
    return [out[i] for i in range(len(samples))]

"""Faithful retrieval-head scores (Wu et al. 2024): greedy decoding with a KV cache.

For a sample with needle span ``[s, e)`` in context ``x`` and greedy tokens ``g_0, g_1, ...``,
decoding step ``t >= 1`` feeds ``g_{t-1}``; for every layer ``l`` and query head ``h``
(grouped-query attention: per query head) let ``k*_t = argmax_k A^{l,h}[t, k]`` over all keys
(context and tokens generated so far). Then

    score_{l,h} = sum_t [s <= k*_t < e  and  g_t == x[k*_t]] / (e - s)

(the reference code's "copy-paste" hit; like it, the prefill that produces ``g_0`` is not
scored). A sample counts when the ROUGE-1 recall of its answer against ``real_needle`` exceeds
``recall_threshold`` (0.5 in the paper); a head's retrieval score is the mean over counted
samples. The argmax is taken inside ``hook_pattern`` hooks, one tensor op per layer for all
heads; the ``1 x T`` rows of each step are reduced at once and no ``T x T`` map is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.hooks import hooked
from workbench.methods.retrieval.decode import (
    ArgmaxRecorder,
    copy_hits,
    decode_sample,
    prefilled,
    stop_ids,
)
from workbench.methods.retrieval.schemas import RetrievalParams
from workbench.types import NeedleSample

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


@dataclass
class SampleScore:
    """One sample's per-head score, its answer and its ROUGE-1 recall."""

    index: int
    score: Float[Tensor, "layer head"]
    recall: float
    answer: str
    steps: int
    reused: int


def faithful_scores(
    model: LoadedModel, samples: Sequence[NeedleSample], params: RetrievalParams
) -> list[SampleScore]:
    """Per-sample faithful scores (module formula), in sample order."""
    stops = stop_ids(model)
    recorder = ArgmaxRecorder(model.n_layers)
    out: dict[int, SampleScore] = {}
    with hooked(model.bridge, recorder.hooks()):
        for pre in prefilled(model, samples, chunk=params.prefill_chunk, reuse=params.reuse_prefix):
            s = samples[pre.index]
            dec = decode_sample(
                model,
                pre,
                s,
                max_new_tokens=params.max_new_tokens,
                stops=stops,
                recorder=recorder,
            )
            if dec.argmax is None:
                score = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
            else:
                tokens = torch.cat([s.context, torch.tensor(dec.tokens, dtype=torch.long)])
                targets = torch.tensor(dec.tokens[1:], dtype=torch.long)
                score = copy_hits(dec.argmax, tokens, targets, s.needle_span)
            steps = len(dec.tokens) - 1
            out[pre.index] = SampleScore(pre.index, score, dec.recall, dec.text, steps, pre.reused)
    return [out[i] for i in range(len(samples))]

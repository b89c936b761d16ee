"""Fast retrieval-head scores: teacher-forced, one forward over the answer tokens.

Instead of decoding, a reference answer ``a_0..a_{n-1}`` is fed after the context in one
forward. As in the faithful mode the prefill stops one token short, so the forward feeds
``x[-1], a_0, ..., a_{n-2}``; the pattern hook sees only those ``n`` query rows
(``[head, n, T+n-1]``; the context's rows were computed in the prefill, without hooks) and
reduces them to their argmax at once. With ``k*_t`` the argmax key of the query that predicts
``a_t`` and ``[s, e)`` the scored span (:mod:`.span`):

    score_{l,h} = sum_{t=0}^{n-1} [s <= k*_t < e  and  a_t == x[k*_t]] / (e - s)

The answer is ``real_needle`` tokenised as the task gives it (``fast_answer = "real_needle"``,
default) or the whole needle sentence, tokenised the same way (``fast_answer = "needle"``:
instruct models such as SmolLM2 tend to repeat the needle sentence).

**Which samples count.** Teacher forcing shows the model the right answer, so the predictions
``p_t = argmax logits(x, a_{<t})`` look right even where the model would answer otherwise. A
sample counts only when the forced answer *is* the model's own greedy continuation over the
answer tokens: ``p_t == a_t`` for every ``t`` (then greedy decoding would generate exactly
``a_0..a_{n-1}``; what it generates after that is not checked). ``recall`` in the samples table
is still the ROUGE-1 recall of the predictions' text against ``real_needle``.

**When it equals the faithful mode.** If greedy decoding generates exactly ``a_0..a_{n-1}``
followed by a stop token (EOS / end of turn / newline, which is not a needle token) within
``max_new_tokens``, every faithful step ``0..n-1`` feeds the same tokens as here, so queries,
argmaxes and targets are identical, and the step that yields the stop token cannot hit: both
modes give the same per-sample scores, and both count the sample. They differ where the
model's answer departs from the forced one (other wording, extra text such as SmolLM2's
restated "The best thing to do in San Francisco is to ..."): such samples are not counted here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from workbench.analyses.retrieval_heads import RetrievalParams
from workbench.analyses.retrieval_heads.faithful import SampleScore
from workbench.analyses.retrieval_heads.hits import copy_hits, sample_spans
from workbench.forward.answers import rouge1_recall
from workbench.forward.decode import (
    ArgmaxRecorder,
    forward_step,
    prefilled,
)
from workbench.hooks import hooked
from workbench.types import NeedleSample

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def forced_answers(model: LoadedModel, samples: Sequence[NeedleSample], which: str) -> list[Tensor]:
    """The teacher-forced answer of each sample: ``sample.answer`` or the needle sentence with
    the answer's leading space (if any)."""
    if which == "real_needle":
        return [s.answer.to(torch.long) for s in samples]
    out = []
    for s in samples:
        lead = " " if model.codec.decode(s.answer[:1].tolist()).startswith(" ") else ""
        ids = model.codec.encode(lead + s.needle.strip())
        out.append(torch.tensor(ids, dtype=torch.long, device=s.answer.device))
    return out


def fast_scores(
    model: LoadedModel,
    samples: Sequence[NeedleSample],
    params: RetrievalParams,
    *,
    spans: Sequence[tuple[int, int]] | None = None,
    answers: Sequence[Tensor] | None = None,
) -> list[SampleScore]:
    """Per-sample teacher-forced scores (module formula), in sample order; ``spans`` and
    ``answers``: each sample's scored span and forced answer if already computed (else
    :func:`.hits.sample_spans` and :func:`forced_answers`)."""
    recorder = ArgmaxRecorder(model.n_layers)
    if answers is None:
        answers = forced_answers(model, samples, params.fast_answer)
    if spans is None:
        spans = sample_spans(model, samples, params.span)
    out: dict[int, SampleScore] = {}
    with hooked(model.bridge, recorder.hooks()), torch.no_grad():
        for pre in prefilled(
            model, samples, chunk=params.prefill_chunk, reuse=params.reuse_prefix, hold_last=True
        ):
            s = samples[pre.index]
            ans = answers[pre.index]
            n_ans, n = int(ans.shape[0]), int(s.context.shape[0])
            fed = torch.cat([s.context[-1:], ans[:-1]])
            recorder.total, recorder.active = n + n_ans - 1, True
            logits, _ = forward_step(model, fed, pre.cache, keep=n_ans)
            recorder.active = False
            preds = logits.argmax(dim=-1).tolist()
            tokens = torch.cat([s.context, ans[:-1]])
            span = spans[pre.index]
            score = copy_hits(recorder.argmax()[:, 0], tokens, ans, span)
            text = model.codec.decode(preds).strip()
            recall = rouge1_recall(s.real_needle, text)
            counted = preds == ans.tolist()
            out[pre.index] = SampleScore(
                pre.index, score, recall, text, n_ans, pre.reused, span, counted
            )
    return [out[i] for i in range(len(samples))]

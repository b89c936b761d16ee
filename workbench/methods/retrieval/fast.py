"""Fast retrieval-head scores: teacher-forced, one forward over the answer tokens.

Instead of decoding, a reference answer ``a_0..a_{n-1}`` is fed
after the prefilled context in one forward of ``a_0..a_{n-2}``. The pattern hook sees only the
``n - 1`` query rows of those tokens (``[head, n-1, T+n-1]``; the context's rows were computed
in the prefill, without hooks) and reduces them to their argmax at once. With
``k*_t = argmax_k A^{l,h}[query at a_{t-1}, k]``:

    score_{l,h} = sum_{t=1}^{n-1} [s <= k*_t < e  and  a_t == x[k*_t]] / (e - s)

The answer is ``real_needle`` tokenised as the task gives it (``fast_answer = "real_needle"``,
default) or the whole needle sentence, tokenised the same way (``fast_answer = "needle"``:
instruct models such as SmolLM2 tend to repeat the needle sentence, and then the needle's
first words are copied too). Correctness is judged from the teacher-forced greedy
predictions ``p_0`` (the prefill's argmax) and ``p_t = argmax logits(a_{<t})``: the sample
counts when ROUGE-1 recall of their text against ``real_needle`` exceeds the threshold.

**When it equals the faithful mode.** If the model copies the needle greedily, i.e. greedy
decoding generates exactly ``a_0..a_{n-1}`` followed by a stop token (EOS / end of turn /
newline, which is not a needle token) within ``max_new_tokens``, then every faithful step
``1..n-1`` feeds the same tokens as here, so the queries, argmaxes and targets are identical,
and the faithful step that yields the stop token cannot hit. Both modes then give the same
per-sample scores and the same counted flag. They differ where the model's answer departs from
the forced answer (other wording, extra text, an early stop): SmolLM2 answers "The best thing
to do in San Francisco is to eat a sandwich ...", so with ``real_needle`` ("eat a sandwich
...") the faithful mode also scores the copied opening words and the word "to" shifts the
query tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from workbench.hooks import hooked
from workbench.methods.retrieval.decode import ArgmaxRecorder, copy_hits, forward_step, prefilled
from workbench.methods.retrieval.faithful import SampleScore
from workbench.methods.retrieval.rouge import rouge1_recall
from workbench.methods.retrieval.schemas import RetrievalParams
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
        out.append(torch.tensor(model.codec.encode(lead + s.needle.strip()), dtype=torch.long))
    return out


def fast_scores(
    model: LoadedModel, samples: Sequence[NeedleSample], params: RetrievalParams
) -> list[SampleScore]:
    """Per-sample teacher-forced scores (module formula), in sample order."""
    recorder = ArgmaxRecorder(model.n_layers)
    answers = forced_answers(model, samples, params.fast_answer)
    out: dict[int, SampleScore] = {}
    with hooked(model.bridge, recorder.hooks()), torch.no_grad():
        for pre in prefilled(model, samples, chunk=params.prefill_chunk, reuse=params.reuse_prefix):
            s = samples[pre.index]
            ans = answers[pre.index]
            n_ans, n = int(ans.shape[0]), int(s.context.shape[0])
            preds = [int(pre.last_logits.argmax())]
            score = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
            if n_ans > 1:
                recorder.total, recorder.active = n + n_ans - 1, True
                logits, _ = forward_step(model, ans[:-1], pre.cache, keep=n_ans - 1)
                recorder.active = False
                preds += logits.argmax(dim=-1).tolist()
                tokens = torch.cat([s.context, ans[:-1]])
                score = copy_hits(recorder.argmax(), tokens, ans[1:], s.needle_span)
            text = model.codec.decode(preds).strip()
            recall = rouge1_recall(s.real_needle, text)
            out[pre.index] = SampleScore(pre.index, score, recall, text, n_ans - 1, pre.reused)
    return [out[i] for i in range(len(samples))]

"""The registered ``retrieval_heads`` analysis: per-head retrieval scores on a needle set.

``mode = "faithful"`` (default) follows Wu et al. 2024 (:mod:`.faithful`); ``mode = "fast"``
is the teacher-forced variant (:mod:`.fast`, which states when the two agree). Either way a
head's score is the mean of its per-sample score over the counted samples (faithful: ROUGE-1
recall of the answer against ``real_needle`` > ``recall_threshold``; fast: the forced answer
is the model's greedy continuation); ``stderr`` is over those samples and ``n`` is their
number. Hits count inside ``span`` (default: ``real_needle`` located exactly, :mod:`.span`).
A run in which no sample counts, or (``span = "paper_search"``) no span is found, is an
error: there is nothing to score. The spans depend only on the samples and the tokenizer, so
they are computed once, before any prefill or decoding, and a run whose spans are all
``NOT_FOUND`` is refused then; samples whose span is not found still score 0 on every head
(``n_span_not_found`` in info).

Tables: ``samples`` (one row per sample: depth, length, the inserted needle's span
``needle_start``/``needle_end``, the scored span ``span_start``/``span_end``, ``real_needle``,
the model's ``answer``, its ``recall``, ``counted``) and ``sample_scores`` (sample, layer,
head, score: every sample's per-head score, counted or not). Info: ``share_above_0.1``
(retrieval heads per the paper's threshold over all heads), ``n_counted``, ``span``,
``linear_backend``, the shared-prefix tokens reused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.analyses.retrieval_heads import RetrievalParams
from workbench.analyses.retrieval_heads.hits import sample_spans
from workbench.analyses.retrieval_heads.span import NOT_FOUND
from workbench.errors import WorkbenchError
from workbench.forward.decode import check_samples
from workbench.forward.selfcheck import require
from workbench.models.backend import on_fast_linears, use_onednn
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, HeadMetric, NeedleSet

if TYPE_CHECKING:
    from workbench.analyses.retrieval_heads.faithful import SampleScore
    from workbench.models.loading import LoadedModel

RETRIEVAL_THRESHOLD = 0.1
"""Wu et al.: a head with retrieval score > 0.1 is a retrieval head."""


def score_samples(
    model: LoadedModel, prompts: NeedleSet, params: RetrievalParams
) -> list[SampleScore]:
    """Per-sample scores in the chosen mode, after checking the samples and their spans (both
    before any prefill or decoding)."""
    if not isinstance(prompts, NeedleSet):
        raise WorkbenchError(
            f"retrieval_heads needs a needle task, got task '{getattr(prompts, 'task', '?')}'",
            "use task = 'needle'",
        )
    if params.mode == "fast":
        from workbench.analyses.retrieval_heads.teacher_forced import fast_scores, forced_answers

        answers = forced_answers(model, prompts.samples, params.fast_answer)  # no decoding
        check_samples(model, prompts.samples, answers=answers)
        spans = _spans_or_refuse(model, prompts, params)
        return fast_scores(model, prompts.samples, params, spans=spans, answers=answers)
    check_samples(model, prompts.samples)
    spans = _spans_or_refuse(model, prompts, params)
    from workbench.analyses.retrieval_heads.faithful import faithful_scores

    return faithful_scores(model, prompts.samples, params, spans=spans)


def _spans_or_refuse(
    model: LoadedModel, prompts: NeedleSet, params: RetrievalParams
) -> list[tuple[int, int]]:
    """Each sample's scored span (:func:`.hits.sample_spans`); a one-line error when none is
    found (only ``span = "paper_search"`` can miss), before anything is decoded."""
    spans = sample_spans(model, prompts.samples, params.span)
    if all(sp == NOT_FOUND for sp in spans):
        raise WorkbenchError(
            f"retrieval_heads: span = '{params.span}' found no needle span in any of the "
            f"{len(spans)} samples (the authors' token-set search misses on this tokenizer)",
            "use span = 'real_needle' (located exactly)",
        )
    return spans


def _refuse_empty(scored: list[SampleScore], params: RetrievalParams) -> None:
    """One-line error when no sample counts: nothing to score (module doc)."""
    if not any(s.counted for s in scored):
        best = max(scored, key=lambda s: s.recall)
        rule = (
            "a sample counts when its forced answer is the model's own greedy continuation"
            if params.mode == "fast"
            else f"a sample counts when its answer's ROUGE-1 recall exceeds "
            f"{params.recall_threshold:g}"
        )
        answer = " ".join(best.answer.split())[:60]
        fix = (
            "use mode = 'faithful' (fast mode keeps only answers the model gives greedily)"
            if params.mode == "fast"
            else "use needles the model answers (or a larger max_new_tokens)"
        )
        raise WorkbenchError(
            f"retrieval_heads: no sample counts of {len(scored)} ({rule}); "
            f"nothing to score (best recall {best.recall:.2f}: {answer!r})",
            fix,
        )


@on_fast_linears
def retrieval_heads(
    model: LoadedModel, prompts: NeedleSet, params: RetrievalParams
) -> AnalysisOutput:
    """Retrieval score per (layer, query head): mean per-sample copy score over the samples
    answered correctly (module doc; Wu et al. 2024)."""
    import pandas as pd

    checks = require(model, "kv_cache")  # before anything is computed
    scored = score_samples(model, prompts, params)
    per = np.stack([s.score.numpy() for s in scored])  # [sample, layer, head]
    counted = np.array([s.counted for s in scored])
    n = int(counted.sum())
    _refuse_empty(scored, params)
    mean, stderr = mean_stderr(per[counted])
    samples = prompts.samples
    rows = [
        {
            "sample": i,
            "context_length": int(samples[i].context_length),
            "tokens": int(samples[i].context.shape[0]),
            "depth_percent": float(samples[i].depth_percent),
            "needle_start": int(samples[i].needle_span[0]),
            "needle_end": int(samples[i].needle_span[1]),
            "span_start": int(s.span[0]),
            "span_end": int(s.span[1]),
            "real_needle": samples[i].real_needle,
            "answer": s.answer,
            "recall": float(s.recall),
            "counted": bool(counted[i]),
            "steps": int(s.steps),
            "reused_tokens": int(s.reused),
            "score_sum": float(per[i].sum()),
        }
        for i, s in enumerate(scored)
    ]
    n_s, n_l, n_h = per.shape
    sample_scores = pd.DataFrame(
        {
            "sample": np.repeat(np.arange(n_s), n_l * n_h),
            "layer": np.tile(np.repeat(np.arange(n_l), n_h), n_s),
            "head": np.tile(np.arange(n_h), n_s * n_l),
            "score": per.ravel(),
        }
    )
    info: dict[str, Any] = {
        "mode": params.mode,
        "span": params.span,
        "n_samples": n_s,
        "n_counted": n,
        "n_span_not_found": sum(s.span == NOT_FOUND for s in scored),
        f"share_above_{RETRIEVAL_THRESHOLD:g}": float(np.mean(mean > RETRIEVAL_THRESHOLD)),
        "linear_backend": "onednn" if use_onednn() else "default",
        "recall_mean": float(np.mean([s.recall for s in scored])),
        "reused_prefix_tokens": int(sum(s.reused for s in scored)),
        "context_tokens": int(sum(int(s.context.shape[0]) for s in samples)),
        "self_checks": checks,
    }
    return AnalysisOutput(
        head_metrics={"retrieval_score": HeadMetric(mean, stderr, n)},
        tables={"samples": pd.DataFrame(rows), "sample_scores": sample_scores},
        info=info,
    )

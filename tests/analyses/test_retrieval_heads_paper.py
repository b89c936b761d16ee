"""Retrieval heads as the authors' code computes them (Wu et al. 2024): the needle span located
on a byte-level BPE tokenizer (and the authors' search failing there), the first answer token
scored, the fast mode's greedy filter, batched decoding, and runs with nothing to score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.analyses.test_retrieval_heads import copy_set
from workbench.analyses.retrieval_heads import RetrievalParams
from workbench.analyses.retrieval_heads.compute import retrieval_heads
from workbench.analyses.retrieval_heads.faithful import faithful_scores
from workbench.analyses.retrieval_heads.span import NOT_FOUND, locate_exact, paper_search
from workbench.analyses.retrieval_heads.teacher_forced import fast_scores
from workbench.errors import WorkbenchError
from workbench.types import NeedleSample, NeedleSet

NEEDLES = [
    ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
     "sunny day.", "eat a sandwich and sit in Dolores Park on a sunny day"),
    ("The secret ingredient in grandmother's apple pie is a spoonful of black pepper in the "
     "crust.", "a spoonful of black pepper in the crust"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (GPT-2 style: a leading space is part of the word) trained on
    a few sentences, in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [n for n, _ in NEEDLES] * 20 + [r for _, r in NEEDLES] * 20
    corpus += ["The bridge was old. The garden was green. It was a quiet day."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    return tok


def _enc(tok, text):
    return tok.encode(text).ids


def test_real_needle_span_is_exact_on_byte_level_bpe(bpe):
    def decode(ids):
        return bpe.decode(ids)

    for needle, real in NEEDLES:
        ids = _enc(bpe, " " + needle)
        a, b = locate_exact(decode, ids, real)
        got = decode(ids[a:b])
        assert got.strip() == real  # the span holds exactly real_needle's characters ...
        assert real not in decode(ids[a + 1 : b]) and real not in decode(ids[a : b - 1])
        assert got.startswith(" ")  # ... with the leading space the in-context word carries
    assert locate_exact(decode, _enc(bpe, " a b c"), "not there") == NOT_FOUND


def test_the_authors_span_search_misses_on_byte_level_bpe(bpe):
    """``find_needle_idx`` tokenises real_needle alone: its first word has no leading space,
    so its token set differs from the in-context one; with few repeated tokens the overlap
    falls under 0.9 and the search finds nothing, though the text is there."""
    hay = _enc(bpe, "The bridge was old. The garden was green.")
    needle, real = NEEDLES[1]
    prompt = hay + _enc(bpe, " " + needle) + hay
    assert _enc(bpe, real)[0] not in prompt  # "a" alone is not " a"
    assert paper_search(lambda t: _enc(bpe, t), prompt, real) == NOT_FOUND
    # the search itself works when the tokens match
    assert paper_search(lambda t: _enc(bpe, t), hay + _enc(bpe, real), real)[0] == len(hay)


def test_first_answer_token_is_scored(toy):
    """The toy's planted induction head copies every answer token from the span, the first
    one included (the authors' prefill stops one token short): its score is 5/5, not 4/5."""
    ns = copy_set(toy, n=4)
    layer, head = toy.extra["induction_head"]
    params = RetrievalParams(max_new_tokens=5)
    for scored in (faithful_scores(toy, ns.samples, params), fast_scores(toy, ns.samples, params)):
        for s in scored:
            assert s.span[1] - s.span[0] == 5 and s.steps == 5
            assert float(s.score[layer, head]) == pytest.approx(1.0)


def test_batched_decoding_equals_one_by_one(toy):
    samples = [copy_set(toy, n=1, seed=k).samples[0] for k in range(5)]  # one length
    ns = NeedleSet("copy", tuple(samples))
    one = faithful_scores(toy, ns.samples, RetrievalParams(max_new_tokens=7, decode_batch=1))
    many = faithful_scores(toy, ns.samples, RetrievalParams(max_new_tokens=7, decode_batch=3))
    for a, b in zip(one, many, strict=True):
        assert a.answer == b.answer and a.steps == b.steps
        np.testing.assert_allclose(a.score.numpy(), b.score.numpy(), atol=1e-12)


def _wrong_answer(s: NeedleSample) -> NeedleSample:
    from dataclasses import replace

    return replace(s, answer=s.answer.flip(0))


def test_fast_mode_counts_only_what_the_model_would_answer(toy):
    """Teacher forcing a wrong answer: the toy's predictions follow the forced prefix's copy,
    not the forced tokens, so the sample is not counted; the right answers are."""
    good = copy_set(toy, n=3).samples
    ns = NeedleSet("copy", (good[0], _wrong_answer(good[1]), good[2]))
    out = retrieval_heads(toy, ns, RetrievalParams(mode="fast"))
    assert out.tables["samples"]["counted"].tolist() == [True, False, True]
    assert out.info["n_counted"] == 2
    bad = NeedleSet("copy", tuple(_wrong_answer(s) for s in good))
    with pytest.raises(WorkbenchError, match="no sample counts") as err:
        retrieval_heads(toy, bad, RetrievalParams(mode="fast"))
    assert "\n" not in str(err.value)


def test_paper_search_finding_no_span_is_an_error(toy):
    s = copy_set(toy, n=1).samples[0]
    from dataclasses import replace

    ns = NeedleSet("copy", (replace(s, real_needle="t99 t98 t97"),))
    with pytest.raises(WorkbenchError, match="found no needle span"):
        retrieval_heads(toy, ns, RetrievalParams(span="paper_search"))


def test_run_never_answered_is_an_error_and_stores_nothing(load, store):
    """tiny-llama (random weights) never answers a needle: one-line error, twice (nothing was
    stored to serve the second time), and the store stays empty."""
    from workbench.runner import run_analysis

    for _ in range(2):
        with pytest.raises(WorkbenchError, match="no sample counts") as err:
            run_analysis(
                "retrieval_heads", load("tiny-llama"), "needle",
                params={"max_new_tokens": 4},
                task_params={"context_lengths": [90], "depth_percents": [50], "n_needles": 2},
                store=store,
            )  # fmt: skip
        assert "\n" not in str(err.value)
    assert store.list_runs().empty


def test_nan_everywhere_is_never_stored():
    from workbench.runner import _refuse_nan
    from workbench.types import AnalysisOutput, HeadMetric

    nan = np.full((2, 3), np.nan)
    with pytest.raises(WorkbenchError, match="NaN for every head"):
        _refuse_nan(AnalysisOutput(head_metrics={"m": HeadMetric(nan, nan, 0)}), "x")
    some = nan.copy()
    some[0, 0] = 1.0
    _refuse_nan(AnalysisOutput(head_metrics={"m": HeadMetric(some, nan, 1)}), "x")


# ---- SmolLM2 -----------------------------------------------------------------------------------


@pytest.mark.models
def test_smollm2_spans_exact_and_the_authors_search_misses(smollm2):
    """Every shipped needle: the exact span reads " " + real_needle; the authors' search
    finds the first needle's span (a repeated " a" keeps its set overlap at 11/12) and none of
    the others (the first word without its space is another token)."""
    from workbench.analyses.retrieval_heads.hits import sample_spans
    from workbench.tasks import build_task

    ns = build_task("needle", smollm2.codec, {"context_lengths": [300], "depth_percents": [50]})
    assert ns.n == 8  # every needle of the file by default
    exact = sample_spans(smollm2, ns.samples, "real_needle")
    paper = sample_spans(smollm2, ns.samples, "paper_search")
    for s, (a, b) in zip(ns.samples, exact, strict=True):
        assert smollm2.codec.decode(s.context[a:b].tolist()) == " " + s.real_needle
        assert s.needle_span[0] < a < b < s.needle_span[1]
    assert paper[0] == exact[0] and all(p == NOT_FOUND for p in paper[1:])


@pytest.mark.models
def test_smollm2_fast_filter_drops_what_greedy_decoding_does_not_say(smollm2):
    """SmolLM2 restates the question before the answer: teacher-forced predictions of
    real_needle read almost right (recall > 0.5, the old filter counted them), but greedy
    decoding does not produce them, so fast mode keeps none; faithful mode counts the sample."""
    from workbench.tasks import build_task

    ns = build_task(
        "needle", smollm2.codec,
        {"context_lengths": [200], "depth_percents": [50], "n_needles": 1},
    )  # fmt: skip
    (fast,) = fast_scores(smollm2, ns.samples, RetrievalParams(mode="fast"))
    (faithful,) = faithful_scores(smollm2, ns.samples, RetrievalParams(max_new_tokens=32))
    assert fast.recall > 0.5 and not fast.counted
    assert faithful.counted and faithful.answer.startswith("The best thing")
    assert torch.is_tensor(faithful.score) and float(faithful.score.max()) > 0.3


def test_lookup_draft():
    from workbench.forward.decode import lookup_draft

    seq = [1, 2, 3, 4, 5, 9, 2, 3]
    assert lookup_draft(seq, 2) == [4, 5]  # after the latest earlier "2 3"
    assert lookup_draft([7, 8, 9], 3) == []
    assert lookup_draft([5, 6, 5], 4) == [6, 5]
    assert lookup_draft(seq, 0) == []


@pytest.mark.parametrize("name", ["toy-induction", "tiny-llama"])
def test_lookahead_decoding_equals_one_token_at_a_time(load, name):
    """Drafts verified in one forward keep exactly greedy decoding's tokens and argmaxes."""
    model = load(name)
    if name == "toy-induction":
        samples = [copy_set(model, n=1, seed=k).samples[0] for k in range(3)]
    else:
        gen = torch.Generator().manual_seed(2)
        samples = []
        for _ in range(3):
            half = torch.randint(10, 200, (15,), generator=gen)
            ctx = torch.cat([half, half, half[:3]])  # repeats give the drafts something to find
            samples.append(NeedleSample(ctx, (15, 30), ctx[3:6], "", "", "x", 0.0, 33))
    ns = NeedleSet("t", tuple(samples))
    kw = {"max_new_tokens": 9, "span": "needle", "recall_threshold": 0.0}
    plain = faithful_scores(model, ns.samples, RetrievalParams(lookahead=0, **kw))
    ahead = faithful_scores(model, ns.samples, RetrievalParams(lookahead=4, decode_batch=2, **kw))
    for a, b in zip(plain, ahead, strict=True):
        assert a.answer == b.answer and a.steps == b.steps
        np.testing.assert_allclose(a.score.numpy(), b.score.numpy(), atol=1e-12)


# ---- spans before decoding ---------------------------------------------------------------------

_DECODING = {  # every entry point that prefills or decodes, patched where it is looked up
    "workbench.analyses.retrieval_heads.faithful": ("prefilled", "decode_batch"),
    "workbench.analyses.retrieval_heads.teacher_forced": ("prefilled", "forward_step"),
    "workbench.forward.decode": (
        "prefilled", "decode_batch", "decode_sample", "greedy_answers", "forward_batch",
        "forward_step",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class _NoParams:
    """The parameters of a task that ignores them."""


def _forbid_decoding(monkeypatch, called: list[str]) -> None:
    """Replace every entry point of :data:`_DECODING` by one that records its name in
    ``called`` and raises."""
    import importlib

    def forbidden(name):
        def call(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} called")

        return call

    for module, names in _DECODING.items():
        mod = importlib.import_module(module)
        for name in names:
            monkeypatch.setattr(mod, name, forbidden(f"{module}.{name}"))


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_paper_search_finding_no_span_is_refused_before_any_decoding(
    load, store, monkeypatch, mode
):
    """tiny-llama needle samples whose real_needle is nowhere in the context: the authors'
    search finds no span, and the run is refused with the one-line error before anything is
    prefilled or decoded (no decoding entry point called, no forward of the model at all),
    nothing stored."""
    from dataclasses import replace

    from workbench.analyses.retrieval_heads.hits import sample_spans
    from workbench.forward.selfcheck import require
    from workbench.runner import run_analysis
    from workbench.tasks import TASKS, build_task
    from workbench.tasks._common import TaskSpec

    tiny = load("tiny-llama")
    built = build_task(
        "needle", tiny.codec, {"context_lengths": [90], "depth_percents": [20, 80], "n_needles": 2}
    )
    missing = NeedleSet(
        "needle", tuple(replace(s, real_needle="zebra quantum xylophone") for s in built.samples)
    )
    assert missing.n == 4
    assert all(sp == NOT_FOUND for sp in sample_spans(tiny, missing.samples, "paper_search"))
    spec = TaskSpec("nospan", "needles without their answer", _NoParams, lambda codec, p: missing,
                    data_files=(), version="1")  # fmt: skip
    monkeypatch.setitem(TASKS, "nospan", spec)
    require(tiny, "kv_cache")  # the model's self-check (memoised) runs its forwards first
    called: list[str] = []
    _forbid_decoding(monkeypatch, called)

    def no_forward(module, args):
        called.append("bridge.forward")
        raise AssertionError("the model ran a forward")

    handle = tiny.bridge.register_forward_pre_hook(no_forward)
    try:
        params = {"mode": mode, "span": "paper_search", "max_new_tokens": 4}
        for _ in range(2):  # nothing stored to serve the second time
            with pytest.raises(WorkbenchError, match="found no needle span") as err:
                run_analysis("retrieval_heads", tiny, "nospan", params=params, store=store)
            assert "\n" not in str(err.value)
            assert "in any of the 4 samples" in str(err.value)
            assert "span = 'real_needle'" in str(err.value)  # the fix
        with pytest.raises(WorkbenchError, match="found no needle span"):
            retrieval_heads(tiny, missing, RetrievalParams(mode=mode, span="paper_search"))
    finally:
        handle.remove()
    assert called == []
    assert store.list_runs().empty


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_paper_search_missing_some_spans_scores_as_before(toy, mode):
    """One of three toy samples without its span: the run goes on, that sample scores 0 on
    every head, the others exactly as the scorer computing its own spans gives them."""
    from dataclasses import replace

    good = copy_set(toy, n=3).samples
    ns = NeedleSet("copy", (good[0], replace(good[1], real_needle="t99 t98 t97"), good[2]))
    params = RetrievalParams(mode=mode, span="paper_search", max_new_tokens=5)
    out = retrieval_heads(toy, ns, params)
    scorer = fast_scores if mode == "fast" else faithful_scores
    ref = scorer(toy, ns.samples, params)  # spans computed inside, as before
    assert out.info["n_span_not_found"] == 1
    rows = out.tables["samples"]
    assert (rows["span_start"][1], rows["span_end"][1]) == NOT_FOUND
    assert [(a, b) for a, b in zip(rows["span_start"], rows["span_end"], strict=True)] == [
        r.span for r in ref
    ]
    per = out.tables["sample_scores"]["score"].to_numpy().reshape(3, toy.n_layers, toy.n_heads)
    np.testing.assert_array_equal(per, np.stack([r.score.numpy() for r in ref]))
    assert not per[1].any() and per[0].max() > 0

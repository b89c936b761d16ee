"""Retrieval-head scoring (Wu et al. 2024): ROUGE-1, faithful and fast modes against slow
references (full forwards, per-head Python loops), the shared-prefix cache, the toy model's
planted head, bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from workbench.analyses.retrieval_heads import RetrievalParams
from workbench.analyses.retrieval_heads.compute import retrieval_heads
from workbench.analyses.retrieval_heads.faithful import faithful_scores
from workbench.analyses.retrieval_heads.teacher_forced import fast_scores
from workbench.errors import WorkbenchError
from workbench.forward.answers import rouge1_recall, rouge_tokens
from workbench.forward.decode import (
    ArgmaxRecorder,
    decode_sample,
    prefilled,
    stop_ids,
)
from workbench.hooks import hook_name, hooked
from workbench.types import NeedleSample, NeedleSet

# ---- ROUGE-1 recall --------------------------------------------------------------------------


def test_rouge_tokens_lowercase_words_porter_stemmed():
    assert rouge_tokens("Eats a Sandwiches, sitting in Dolores-Park!") == [
        "eat", "a", "sandwich", "sit", "in", "dolor", "park",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("reference", "answer", "expected"),
    [
        ("eat a sandwich", "EAT a sandwich.", 1.0),
        ("eat a sandwich", "a sandwich", 2 / 3),
        ("a a b", "a b", 2 / 3),  # multiset overlap is clipped
        ("a b", "a a a b b", 1.0),
        ("eat a sandwich", "", 0.0),
        ("", "anything", 0.0),
        ("sunny day", "The day was sunny", 1.0),  # order does not matter
        ("eat a sandwich", "eats sandwiches", 2 / 3),  # Porter stemming, as the paper's
        ("sit in the park", "sitting in parks", 3 / 4),
    ],
)
def test_rouge1_recall(reference, answer, expected):
    from rouge_score import rouge_scorer

    assert rouge1_recall(reference, answer) == pytest.approx(expected)
    paper = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, answer)
    assert rouge1_recall(reference, answer) == paper["rouge1"].recall


# ---- a synthetic copy task for the toy induction model ---------------------------------------


def copy_set(model, n: int = 5, needle_len: int = 6, seed: int = 0) -> NeedleSet:
    """``[bos] filler needle filler needle[0]`` -> answer ``needle[1:]``: distinct random
    symbols (ids 4..23), the needle at several depths; contexts of 16 + 2i tokens (n_ctx 64)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        pre = 2 * i
        perm = (torch.randperm(20, generator=gen) + 4).tolist()
        needle, filler = perm[:needle_len], perm[needle_len:]
        ids = [0, *filler[:pre], *needle, *filler[pre:8], needle[0]]
        answer = needle[1:]
        samples.append(
            NeedleSample(
                context=torch.tensor(ids),
                needle_span=(1 + pre, 1 + pre + needle_len),
                answer=torch.tensor(answer),
                needle=model.codec.decode(needle),
                question="",
                real_needle=model.codec.decode(answer),
                depth_percent=100 * pre / 8,
                context_length=len(ids),
            )
        )
    return NeedleSet("copy", tuple(samples))


def shared_prefix_set(model) -> NeedleSet:
    """Three toy samples sharing a 9-token prefix (the same filler before the needle)."""
    base = copy_set(model, n=1).samples[0]
    ctx = base.context.tolist()
    out = []
    for extra in ([], [ctx[1]], [ctx[1], ctx[2]]):
        ids = ctx[:9] + extra + ctx[9:]
        out.append(
            NeedleSample(
                torch.tensor(ids), base.needle_span, base.answer, base.needle, "",
                base.real_needle, float(len(extra)), len(ids),
            )
        )  # fmt: skip
    return NeedleSet("copy", tuple(out))


# ---- slow references: full forwards, no cache, per-head loops --------------------------------


def full_patterns(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's whole ``[head, q, k]`` attention pattern and the logits, one full forward."""
    pats: dict[int, torch.Tensor] = {}

    def make(layer):
        def hook(p, hook):
            pats[layer] = p[0].detach().clone()

        return hook

    hooks = [(hook_name("pattern", la), make(la)) for la in range(model.n_layers)]
    with torch.no_grad(), hooked(model.bridge, hooks):
        logits = model.bridge(tokens[None], prepend_bos=False)[0]
    return torch.stack([pats[la] for la in range(model.n_layers)]), logits


def slow_hits(model, pattern_rows, tokens, targets, span) -> np.ndarray:
    """Per-head Python loop over steps: the obvious copy-hit count / len(span)."""
    start, end = span
    score = np.zeros((model.n_layers, model.n_heads))
    for step, target in enumerate(targets):
        for la in range(model.n_layers):
            for h in range(model.n_heads):
                k = int(pattern_rows[step][la, h].argmax())
                if start <= k < end and int(tokens[k]) == int(target):
                    score[la, h] += 1 / (end - start)
    return score


def slow_faithful(model, sample, max_new_tokens, span):
    """Greedy decoding by full forwards; every step scored from the full pattern's last row,
    the one that produces the first answer token included (the paper's code)."""
    tokens = sample.context.clone()
    rows, gen = [], []
    for _ in range(max_new_tokens):
        pats, logits = full_patterns(model, tokens)
        rows.append(pats[:, :, -1])
        tok = int(logits[-1].argmax())
        gen.append(tok)
        tokens = torch.cat([tokens, torch.tensor([tok])])
    return gen, slow_hits(model, rows, tokens, gen, span)


def slow_fast(model, sample, span, answer=None):
    """Teacher forcing by one full forward over context + answer[:-1]; the query rows from the
    last context token on predict answer[0], answer[1], ..."""
    n = int(sample.context.shape[0])
    ans = sample.answer if answer is None else answer
    tokens = torch.cat([sample.context, ans[:-1]])
    pats, _ = full_patterns(model, tokens)
    rows = [pats[:, :, n - 1 + t] for t in range(int(ans.shape[0]))]
    return slow_hits(model, rows, tokens, ans.tolist(), span)


# ---- tests against the references ------------------------------------------------------------


@pytest.mark.parametrize("name", ["toy-induction", "tiny-llama"])
def test_decoding_argmax_matches_full_recompute(load, name):
    """Each cached decoding step's recorded argmax is the argmax of the full forward's pattern
    row (up to float ties), and the greedy tokens equal uncached greedy decoding."""
    model = load(name)
    if name == "toy-induction":
        sample = copy_set(model, n=1).samples[0]
    else:
        gen = torch.Generator().manual_seed(1)
        ctx = torch.randint(10, 200, (40,), generator=gen)
        sample = NeedleSample(ctx, (10, 20), ctx[10:14], "", "", "", 0.0, 40)
    rec = ArgmaxRecorder(model.n_layers)
    pre = next(prefilled(model, [sample], hold_last=True))
    assert pre.last_logits is None
    assert pre.cache.get_seq_length() == int(sample.context.shape[0]) - 1
    with hooked(model.bridge, rec.hooks()):
        dec = decode_sample(model, pre, sample, max_new_tokens=6, stops=frozenset(), recorder=rec)
    assert len(dec.tokens) == 6 and dec.argmax is not None and dec.first == 0
    assert dec.argmax.shape == (model.n_layers, model.n_heads, 6)  # the first token's step too
    tokens = torch.cat([sample.context, torch.tensor(dec.tokens)])
    n = int(sample.context.shape[0])
    for t in range(6):
        pats, logits = full_patterns(model, tokens[: n + t])
        assert int(logits[-1].argmax()) == dec.tokens[t]
        row = pats[:, :, -1]  # [layer, head, key]
        got = row.gather(-1, dec.argmax[..., t : t + 1])[..., 0]
        assert torch.all(got >= row.max(-1).values - 1e-5)
        exact = dec.argmax[..., t] == row.argmax(-1)
        assert exact.float().mean() > 0.9


@pytest.mark.parametrize("span", ["real_needle", "needle"])
def test_faithful_and_fast_equal_slow_references(toy, span):
    ns = copy_set(toy, n=3)
    params = RetrievalParams(max_new_tokens=5, span=span)
    faithful = faithful_scores(toy, ns.samples, params)
    fast = fast_scores(toy, ns.samples, params)
    for s, f, q in zip(ns.samples, faithful, fast, strict=True):
        want = s.needle_span if span == "needle" else (s.needle_span[0] + 1, s.needle_span[1])
        assert f.span == q.span == want  # real_needle = needle[1:], located exactly
        _, ref = slow_faithful(toy, s, 5, want)
        np.testing.assert_allclose(f.score.numpy(), ref, atol=1e-12)
        np.testing.assert_allclose(q.score.numpy(), slow_fast(toy, s, want), atol=1e-12)
        assert ref.max() > 0  # the copy task produces hits


def test_fast_equals_faithful_when_the_model_copies_greedily(toy):
    """Precondition (fast.py docstring): greedy decoding generates exactly the answer."""
    ns = copy_set(toy, n=5)
    params = RetrievalParams(max_new_tokens=5)
    faithful = retrieval_heads(toy, ns, RetrievalParams(mode="faithful", max_new_tokens=5))
    fast = retrieval_heads(toy, ns, RetrievalParams(mode="fast", max_new_tokens=5))
    stops = stop_ids(toy)
    for pre in prefilled(toy, ns.samples):
        s = ns.samples[pre.index]
        dec = decode_sample(toy, pre, s, max_new_tokens=params.max_new_tokens, stops=stops)
        assert dec.tokens == s.answer.tolist()
    f, q = faithful.head_metrics["retrieval_score"], fast.head_metrics["retrieval_score"]
    assert f.n == q.n == 5
    np.testing.assert_allclose(f.mean, q.mean, atol=1e-12)
    a, b = faithful.tables["sample_scores"], fast.tables["sample_scores"]
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-12)
    assert (faithful.tables["samples"]["recall"] == 1.0).all()


def test_toy_fast_mode_ranks_the_planted_induction_head_first(toy):
    out = retrieval_heads(toy, copy_set(toy, n=8, seed=3), RetrievalParams(mode="fast"))
    m = out.head_metrics["retrieval_score"]
    layer, head = toy.extra["induction_head"]
    assert int(np.argmax(m.mean)) == layer * toy.n_heads + head
    others = np.delete(m.mean.ravel(), layer * toy.n_heads + head)
    assert m.mean[layer, head] > 0.5 > others.max() + 0.2
    assert out.info["n_counted"] == 8 and out.info["share_above_0.1"] <= 2 / 8


def test_shared_prefix_cache_is_reused_and_exact(toy):
    ns = shared_prefix_set(toy)
    with_reuse = list(prefilled(toy, ns.samples, chunk=4, reuse=True))
    without = {p.index: p for p in prefilled(toy, ns.samples, reuse=False)}
    # s0 shares 9 tokens with s1, s1 shares 10 with s2: the base grows 9 -> 10
    assert [p.index for p in with_reuse] == [0, 1, 2]
    assert [p.reused for p in with_reuse] == [9, 10, 10]
    for p in with_reuse:
        q = without[p.index]
        assert q.reused == 0 and p.last_logits is not None and q.last_logits is not None
        torch.testing.assert_close(p.last_logits, q.last_logits, atol=1e-5, rtol=1e-5)
        assert p.cache.get_seq_length() == q.cache.get_seq_length()
    held = list(prefilled(toy, ns.samples, chunk=4, reuse=True, hold_last=True))
    assert [p.reused for p in held] == [9, 10, 10]  # the held last token is never shared
    assert [p.cache.get_seq_length() for p in held] == [len(s.context) - 1 for s in ns.samples]
    params = RetrievalParams(mode="fast")
    a = fast_scores(toy, ns.samples, params)
    b = fast_scores(toy, ns.samples, RetrievalParams(mode="fast", reuse_prefix=False))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.score, y.score)


@dataclass(frozen=True)
class CopyParams:
    n: int = 3


@pytest.fixture()
def copy_task(toy, monkeypatch):
    """The toy copy set registered as task 'copy', so it runs through the runner and store."""
    from workbench.tasks import TASKS
    from workbench.tasks._common import TaskSpec

    spec = TaskSpec("copy", "toy copy task", CopyParams, lambda codec, p: copy_set(toy, n=p.n),
                    data_files=(), version="1")  # fmt: skip
    monkeypatch.setitem(TASKS, "copy", spec)
    return "copy"


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_retrieval_run_is_stored_with_tables_and_info(toy, store, copy_task, mode):
    from workbench.runner import run_analysis

    kw = {"params": {"mode": mode, "max_new_tokens": 5}, "task_params": {"n": 3}, "store": store}
    r = run_analysis("retrieval_heads", toy, copy_task, **kw)
    assert set(r.heads["metric"]) == {"retrieval_score"}
    samples = r.tables["samples"]
    assert len(samples) == 3 and samples["counted"].all()
    assert {"needle_start", "needle_end", "span_start", "span_end", "real_needle"} <= set(samples)
    assert "needle" not in samples  # the column that held real_needle under a wrong name
    assert (samples["span_start"] == samples["needle_start"] + 1).all()  # real_needle = needle[1:]
    assert len(r.tables["sample_scores"]) == 3 * toy.n_layers * toy.n_heads
    info = r.manifest["extra"]
    assert info["n_counted"] == 3 and info["span"] == "real_needle" and info["mode"] == mode
    assert 0 < info["share_above_0.1"] < 1 and info["linear_backend"] in ("onednn", "default")
    assert run_analysis("retrieval_heads", toy, copy_task, **kw).from_store


# ---- bad input -------------------------------------------------------------------------------


def _with(sample: NeedleSample, **changes) -> NeedleSet:
    from dataclasses import replace

    return NeedleSet("copy", (replace(sample, **changes),))


def test_bad_samples_give_one_line_errors(toy):
    s = copy_set(toy, n=1).samples[0]
    with pytest.raises(WorkbenchError, match="outside its 16-token context"):
        retrieval_heads(toy, _with(s, needle_span=(12, 20)), RetrievalParams())
    with pytest.raises(WorkbenchError, match="not found in the tokenised context"):
        retrieval_heads(toy, _with(s, needle_span=(0, 6)), RetrievalParams(mode="fast"))
    long_ctx = s.context.repeat(5)  # 80 tokens
    with pytest.raises(WorkbenchError, match="exceeds the model's context 64"):
        retrieval_heads(toy, _with(s, context=long_ctx), RetrievalParams())
    with pytest.raises(WorkbenchError, match="needs a needle task"):
        from workbench.tasks import build_task

        retrieval_heads(toy, build_task("induction", toy.codec, {"seq_len": 5}), RetrievalParams())
    with pytest.raises(WorkbenchError, match="max_new_tokens"):
        from workbench.params import from_mapping

        from_mapping(RetrievalParams, {"max_new_tokens": 1})


@pytest.mark.parametrize(
    ("task_params", "match"),
    [
        ({"haystack_dir": "EMPTY"}, "no .txt files in haystack folder"),
        ({"context_lengths": [4096]}, "exceeds the model's context"),
    ],
)
def test_bad_needle_tasks_store_nothing(load, store, tmp_path, task_params, match):
    from workbench.runner import run_analysis

    if task_params.get("haystack_dir") == "EMPTY":
        (tmp_path / "empty").mkdir()
        task_params = {"haystack_dir": str(tmp_path / "empty"), "context_lengths": [90]}
    with pytest.raises(WorkbenchError, match=match) as err:
        run_analysis("retrieval_heads", load("tiny-llama"), "needle", task_params=task_params,
                     store=store)  # fmt: skip
    assert "\n" not in str(err.value)
    assert store.list_runs().empty


# ---- real model --------------------------------------------------------------------------------


@pytest.mark.models
def test_smollm2_retrieval_heads_paper_span_and_whole_needle(smollm2):
    """One 256-token sample: SmolLM2 answers it; scores are sparse under both spans; the
    paper's span (real_needle) is shorter, so each of its hits weighs more."""
    from workbench.tasks import build_task

    ns = build_task(
        "needle", smollm2.codec,
        {"context_lengths": [256], "depth_percents": [50], "n_needles": 1},
    )  # fmt: skip
    paper = retrieval_heads(smollm2, ns, RetrievalParams(max_new_tokens=32))
    whole = retrieval_heads(smollm2, ns, RetrievalParams(max_new_tokens=32, span="needle"))
    for out in (paper, whole):
        assert out.info["n_counted"] == 1 and out.tables["samples"]["recall"][0] > 0.5
        assert 0 < out.info["share_above_0.1"] < 0.15
    row = paper.tables["samples"].iloc[0]
    assert row["needle_start"] < row["span_start"] < row["span_end"] < row["needle_end"]
    assert paper.info["share_above_0.1"] >= whole.info["share_above_0.1"]
    top = [set(np.argsort(-o.head_metrics["retrieval_score"].mean.ravel())[:10])
           for o in (paper, whole)]  # fmt: skip
    assert len(top[0] & top[1]) >= 6


def test_forced_needle_answer_is_the_needle_as_tokenised_in_the_context(load):
    from workbench.analyses.retrieval_heads.teacher_forced import forced_answers
    from workbench.tasks import build_task

    tiny = load("tiny-llama")
    ns = build_task(
        "needle", tiny.codec, {"context_lengths": [90], "depth_percents": [50], "n_needles": 1}
    )
    s = ns.samples[0]
    (real,) = forced_answers(tiny, ns.samples, "real_needle")
    (whole,) = forced_answers(tiny, ns.samples, "needle")
    assert torch.equal(real, s.answer)
    assert whole.tolist() == s.context[s.needle_span[0] : s.needle_span[1]].tolist()
    (got,) = fast_scores(tiny, ns.samples, RetrievalParams(mode="fast", fast_answer="needle"))
    assert got.steps == len(whole)  # every forced token is a scored step, the first included


@pytest.mark.models
def test_gemma3_fast_mode_past_the_sliding_window_matches_full_forward(gemma3):
    """600 tokens (sliding window 512) prefilled in 256-token chunks: the fast scores equal the
    full-forward reference's (sliding layers' cached keys shifted to absolute positions)."""
    from workbench.tasks import build_task

    ns = build_task(
        "needle", gemma3.codec,
        {"context_lengths": [600], "depth_percents": [10], "n_needles": 1},
    )  # fmt: skip
    (got,) = fast_scores(gemma3, ns.samples, RetrievalParams(mode="fast", prefill_chunk=256))
    ref = slow_fast(gemma3, ns.samples[0], got.span)
    np.testing.assert_allclose(got.score.numpy(), ref, atol=1e-12)
    assert ref.max() > 0.3 and got.recall > 0.5

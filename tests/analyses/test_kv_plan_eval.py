"""Causal evaluation of KV-cache plans: the controls are what they claim, full attention is the
reference (KL 0, the unmodified model's own greedy answers), decode mode agrees with mask
mode, the percentile/p-value formulas, the exhaustive oracle, and bad input refused with
nothing stored."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from workbench.analyses.kv_plan_eval import KVPlanEvalParams
from workbench.analyses.kv_plan_eval.compute import _summary, evaluate
from workbench.circuits.kvplans import save_plan
from workbench.errors import WorkbenchError
from workbench.forward.decode import greedy_answers
from workbench.forward.plan import KVPlan
from workbench.runner import run_analysis
from workbench.tasks import build_task

NEEDLES = {"context_lengths": [64], "depth_percents": [50], "n_needles": 2}
SCORES = {"length": 7, "repeats": 3, "n_prompts": 2}


@pytest.fixture()
def scored(load, store):
    model = load("tiny-llama")
    return model, run_analysis("kv_head_scores", model, task_params=SCORES, store=store)


def _eval(model, store, scores_run, **params):
    base = {"scores_run": scores_run, "sink": 2, "window": 16, "n_random": 3,
            "max_new_tokens": 4}  # fmt: skip
    return run_analysis("kv_plan_eval", model, params={**base, **params}, task_params=NEEDLES,
                        store=store)  # fmt: skip


def test_plan_controls_and_full_attention_reference(scored, store):
    model, s = scored
    r = _eval(model, store, s.run_id)
    plans = r.tables["plans"].set_index("plan")
    n_full = int(plans.loc["plan", "n_full"])
    randoms = plans[plans.index.str.startswith("random_")]
    assert len(randoms) == 6 and (randoms["n_full"] == n_full).all()
    assert plans.loc["all_full", "kv_fraction"] == 1.0 and plans.loc["all_stream", "n_full"] == 0
    assert plans.loc["anti", "n_full"] == n_full
    assert plans.loc["all_full", "kl"] <= 1e-6  # the reference is full attention itself
    assert plans.loc["all_stream", "kl"] > 1e-3
    # layer-matched controls keep the plan's per-layer counts
    full = {tuple(h) for h in r.info["plan"]["full"]}
    want = Counter(lay for lay, _ in full)
    from workbench.circuits.kvplans import controls

    plan = KVPlan.from_dict(r.info["plan"])
    for name, c in controls(plan, 3, 0).items():
        if name.startswith("random_l"):
            assert Counter(lay for lay, _ in c.full) == want
    # the all-full plan's greedy answers are the unmodified model's (an independent decoder)
    samples = build_task("needle", model.codec, NEEDLES).samples
    own = [d.recall for d in greedy_answers(model, samples, max_new_tokens=4, reuse=False)]
    by = r.tables["samples"].set_index(["plan", "sample"])["recall"]
    assert [by[("all_full", i)] for i in range(len(samples))] == pytest.approx(own)
    summary = r.tables["summary"]
    assert set(summary["family"]) == {"uniform", "layer_matched", "both"}
    assert summary["percentile"].between(0, 100).all() and summary["p_value"].between(0, 1).all()
    assert r.info["kv_fraction"] == pytest.approx(plan.kv_fraction(64))


def test_percentile_and_p_value_follow_the_formula():
    means = pd.DataFrame(
        {"recall": [0.8, 0.2, 0.8, 0.9, 0.1], "logprob": [-1.0, -2.0, -3.0, -0.5, -4.0],
         "kl": [0.1, 0.5, 0.05, 0.2, 0.3], "ppl": [10.0, 12.0, 9.0, 11.0, 13.0]},
        index=["plan", "random_u0", "random_u1", "random_u2", "random_u3"],
    )  # fmt: skip
    s = _summary(means).set_index(["metric", "family"])
    # recall 0.8 vs [0.2, 0.8, 0.9, 0.1]: beats 2, ties 1 -> 62.5; as good or better: 2 -> 3/5
    assert s.loc[("recall", "uniform"), "percentile"] == pytest.approx(62.5)
    assert s.loc[("recall", "uniform"), "p_value"] == pytest.approx(3 / 5)
    # kl: lower is better; 0.1 vs [0.5, 0.05, 0.2, 0.3] beats 3 -> 75; p = (1 + 1) / 5
    assert s.loc[("kl", "uniform"), "percentile"] == pytest.approx(75.0)
    assert s.loc[("kl", "uniform"), "p_value"] == pytest.approx(2 / 5)


def test_decode_mode_agrees_with_mask_mode(load):
    model = load("tiny-llama")
    samples = build_task("needle", model.codec, NEEDLES).samples
    plans = {"one": KVPlan(model.name, (2, 2), frozenset({(1, 0)}), 2, 16),
             "none": KVPlan(model.name, (2, 2), frozenset(), 3, 12, weighted=False)}  # fmt: skip
    mask = KVPlanEvalParams(scores_run="x", max_new_tokens=4, feed_last=8)
    decode = dataclasses.replace(mask, mode="decode")
    ma, _ = evaluate(model, plans, samples, mask)
    mb, acct = evaluate(model, plans, samples, decode)
    ma, mb = (t.set_index(["plan", "sample"]) for t in (ma, mb))
    np.testing.assert_allclose(mb["logprob"], ma["logprob"], atol=1e-4)
    np.testing.assert_allclose(mb["kl"], ma["kl"], atol=1e-4)
    assert (mb["recall"] == ma["recall"]).all()
    assert ma["kl"].min() > 1e-4 and acct["tokens"] > 0
    # decode mode measures the cache it held: "none" streams every layer, "one" only layer 0
    held = mb["cache_fraction"].groupby("plan").mean()
    assert held["none"] < held["one"] < 1.0 and "cache_fraction" not in ma


def test_sharing_the_prefix_across_plans_is_exact(load):
    from workbench.analyses.kv_plan_eval.compute import _mask_sample, _prefix, _reference
    from workbench.forward.decode import stop_ids

    model = load("tiny-llama")
    sample = build_task("needle", model.codec, NEEDLES).samples[0]
    plan = KVPlan(model.name, (2, 2), frozenset({(0, 1)}), 2, 16)
    params = KVPlanEvalParams(scores_run="x", max_new_tokens=4)
    ref, stops = _reference(model, sample), stop_ids(model)
    alone, n_alone = _mask_sample(model, plan, sample, ref, params, stops)
    shared, n_shared = _mask_sample(model, plan, sample, ref, params, stops,
                                    (18, _prefix(model, sample, 18)))  # fmt: skip
    assert shared == pytest.approx(alone, rel=1e-5, abs=1e-6) and n_shared == n_alone - 18
    with pytest.raises(WorkbenchError, match="longer than sink"):
        _mask_sample(model, plan, sample, ref, params, stops, (19, _prefix(model, sample, 19)))


def _shared_vs_alone(model, sample, full, sink, window, p):
    from workbench.analyses.kv_plan_eval.compute import _mask_sample, _prefix, _reference
    from workbench.analyses.kv_plan_eval.shared import ContextRun, first_layer
    from workbench.forward.decode import stop_ids

    plan = KVPlan(model.name, (model.n_layers, model.n_kv_heads), frozenset(full), sink, window)
    params = KVPlanEvalParams(scores_run="x", max_new_tokens=4)
    ref, stops = _reference(model, sample), stop_ids(model)
    prefix = (p, _prefix(model, sample, p))
    alone, n_alone = _mask_sample(model, plan, sample, ref, params, stops, prefix)
    base = ContextRun(model, sample)
    assert base.ok
    shared, n_shared = _mask_sample(model, plan, sample, ref, params, stops, prefix, base)
    return plan, first_layer(model, plan), alone, shared, n_alone, n_shared


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_plans_resumed_at_their_first_streaming_layer_are_exact(load, name):
    """Layer sharing: a plan resumed at its first streaming layer from one full-attention run
    gives the same metrics as its own forward, and costs only the layers it recomputed."""
    model = load(name)
    sample = build_task("needle", model.codec, NEEDLES).samples[0]
    n, g = model.n_layers, model.n_kv_heads
    stream_layer = n - 1  # tiny-gemma3: its last layer is global
    full = {(lay, h) for lay in range(stream_layer) for h in range(g)}
    _, first, alone, shared, n_alone, n_shared = _shared_vs_alone(
        model, sample, full, 2, 8 if name == "tiny-gemma3" else 16, 8
    )
    assert first == stream_layer > 0
    assert shared == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert alone["kl"] > 1e-6  # the plan did change something
    ctx = int(sample.context.shape[0])
    assert n_alone - n_shared == pytest.approx((ctx - 8) * first / n)
    every = {(lay, h) for lay in range(n) for h in range(g)}  # all full: only the last block
    _, first, alone, shared, *_ = _shared_vs_alone(model, sample, every, 2, 16, 8)
    assert first == n - 1 and shared == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert alone["kl"] <= 1e-6


def test_evaluate_shares_layers_only_where_it_pays(load):
    model = load("tiny-llama")
    samples = build_task("needle", model.codec, NEEDLES).samples
    top = {(0, 0), (0, 1)}
    plans = {f"p{i}": KVPlan(model.name, (2, 2), frozenset(top | {(1, i % 2)}), 2, 16)
             for i in range(3)}  # fmt: skip
    params = KVPlanEvalParams(scores_run="x", max_new_tokens=4)
    on, acct_on = evaluate(model, plans, samples, params)
    off, acct_off = evaluate(model, plans, samples, params, layer_sharing=False)
    pd.testing.assert_frame_equal(on, off, rtol=1e-5, atol=1e-6)
    assert acct_on["shared_layer_runs"] == len(samples) and acct_off["shared_layer_runs"] == 0
    assert acct_on["tokens"] < acct_off["tokens"]
    low = {"a": KVPlan(model.name, (2, 2), frozenset({(1, 0)}), 2, 16)}  # L = 0: no gain
    assert evaluate(model, low, samples, params)[1]["shared_layer_runs"] == 0


@pytest.mark.models
def test_layer_sharing_is_exact_on_smollm2(smollm2):
    sample = build_task("needle", smollm2.codec, {**NEEDLES, "context_lengths": [160]}).samples[0]
    full = {(lay, h) for lay in range(12) for h in range(3)} | {(20, 1)}
    _, first, alone, shared, *_ = _shared_vs_alone(smollm2, sample, full, 4, 48, 40)
    assert first == 12 and shared == pytest.approx(alone, rel=1e-4, abs=1e-5)


def test_the_oracle_ranks_every_plan_and_every_rule(scored, store):
    model, s = scored
    r = _eval(model, store, s.run_id, n_random=1, oracle=True, curve=[1, 3], curve_random=1)
    oracle = r.tables["oracle"]
    n = r.info["n_streamable"]
    assert len(oracle) == 2**n and sorted(oracle["rank"]) == list(range(1, 2**n + 1))
    assert oracle.iloc[0]["recall"] == oracle["recall"].max()
    ranks = r.tables["rule_ranks"]
    assert set(ranks["score"]) == {"echo", "induction"} and set(ranks["k"]) == set(range(1, n))
    assert (ranks["rank_at_k"] >= 1).all() and (ranks["rank_at_k"] <= ranks["of"]).all()
    curve = r.tables["curve"]
    assert sorted(set(curve["k"])) == [1, 3] and set(curve["kind"]) == {"scored", "random"}


def test_the_oracle_on_gemma_covers_only_its_global_layers(load, store):
    model = load("tiny-gemma3")
    s = run_analysis("kv_head_scores", model, task_params=SCORES, store=store)
    r = _eval(model, store, s.run_id, n_random=1, oracle=True, window=8)
    plan = KVPlan.from_dict(r.info["plan"])
    assert plan.native and all(lay % 2 == 1 for lay, _ in plan.streamable)
    assert len(r.tables["oracle"]) == 2 ** len(plan.streamable)


def test_extra_runs_are_pooled_per_kv_head_and_rank_plans(scored, store):
    model, s = scored
    det = run_analysis("head_detectors", model, "induction",
                       task_params={"seq_len": 8, "n_prompts": 2}, store=store)  # fmt: skip
    r = _eval(model, store, s.run_id, extra_runs=[det.run_id], rule="top_k", k=1,
              metric="previous_token", n_random=1)  # fmt: skip
    prev = det.matrix("previous_token").to_numpy()
    best = np.unravel_index(np.argmax(prev.reshape(2, 2, 2).max(-1)), (2, 2))
    assert [tuple(h) for h in r.info["plan"]["full"]] == [tuple(int(x) for x in best)]
    assert (
        "previous_token" in set(r.tables["rule_ranks"]["score"])
        if "rule_ranks" in r.tables
        else True
    )


def test_bad_input_is_refused_and_nothing_stored(scored, store):
    model, s = scored
    before = len(store.list_runs())
    with pytest.raises(WorkbenchError, match="not shorter than"):
        _eval(model, store, s.run_id, window=64)
    with pytest.raises(WorkbenchError, match="budget"):
        _eval(model, store, s.run_id, rule="budget", budget=1.5)
    with pytest.raises(WorkbenchError):
        _eval(model, store, s.run_id, rule="lottery")
    other = save_plan(store, KVPlan("tiny-gpt2", (2, 4), frozenset()))
    before = len(store.list_runs())
    with pytest.raises(WorkbenchError, match=r"tiny-gpt2|grid"):
        _eval(model, store, "", plan_run=other)
    with pytest.raises(WorkbenchError, match="scores_run"):
        _eval(model, store, "")
    assert len(store.list_runs()) == before

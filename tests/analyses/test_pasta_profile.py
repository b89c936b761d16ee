"""PASTA profiling and evaluation: the batched profiling sweep equals one steered forward per
variant, alpha = 1 changes nothing, the chosen heads are the top-k of the fine pass over the
best layers, the JSON head configuration round-trips, the automatic highlight picks a context
sentence, the percentile/p-value formulas, and bad input refused with nothing stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.analyses.pasta_profile import (
    PastaParams,
    head_config,
    read_head_config,
    write_head_config,
)
from workbench.analyses.pasta_profile import compute as C
from workbench.analyses.pasta_profile.evaluate import batch_metric, percentile_p
from workbench.analyses.pasta_profile.highlight import (
    auto_spans,
    conflict_batch,
    needle_batches,
    sentences,
)
from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import steer_attention
from workbench.forward.head_sweep import final_logits, naive_sweep
from workbench.runner import run_analysis
from workbench.tasks import build_task
from workbench.types import Head

NEEDLES = {"context_lengths": [64], "depth_percents": [30, 70], "n_needles": 3}
FAST = {
    "n_random": 3,
    "top_layers": 1,
    "n_heads_chosen": 2,
    "profile_needles": 1,
    "max_new_tokens": 4,
    "conflict_format": "sentence",
}


def _run(model, store, **params):
    return run_analysis(
        "pasta_profile", model, params={**FAST, **params}, task_params=NEEDLES, store=store
    )


def _batches(model):
    [needle] = needle_batches(
        model.codec, build_task("needle", model.codec, NEEDLES).samples, "auto"
    )
    groups = build_task("knowledge_conflict", model.codec, {"split": "select"}).groups
    conflict = conflict_batch(max(groups, key=lambda g: g.n))
    return needle, conflict


def _check_sweep(model, batch, variants, alpha, atol):
    prof = C.Profiler(model, [batch], [batch.gold], alpha, 10**6)
    fast = prof.values(variants, "test")[0]
    metric = batch_metric(batch)
    slow = naive_sweep(
        model,
        batch.tokens,
        variants,
        lambda hs: steer_attention(model, hs, batch.gold, alpha=alpha),
        metric,
    )
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s.cpu(), atol=atol, rtol=1e-4)
    torch.testing.assert_close(prof.base[0], metric(final_logits(model, batch.tokens)).cpu())
    return prof, fast


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_profiling_sweep_equals_one_steered_forward_per_variant(load, name):
    model = load(name)
    coarse = [[Head(la, h) for h in range(model.n_heads)] for la in range(model.n_layers)]
    singles = [[Head(la, h)] for la in range(model.n_layers) for h in range(model.n_heads)]
    for batch in _batches(model):
        prof, fast = _check_sweep(model, batch, coarse + singles, 0.01, 2e-5)
        assert max(float((f - prof.base[0]).abs().max()) for f in fast) > 1e-3
        # the coarse pass's gains are the mean steered-minus-plain differences
        layers, _, chosen = C.profile(
            model, {batch.task: prof}, PastaParams(top_layers=1, n_heads_chosen=2)
        )
        want = [float((f - prof.base[0]).double().mean()) for f in fast[: model.n_layers]]
        np.testing.assert_allclose(layers[f"gain_{batch.task}"], want, atol=1e-6)
        assert len(chosen) == 2 and {h.layer for h in chosen} <= set(layers.layer[layers.best])


def test_alpha_one_changes_nothing(load, store):
    model = load("tiny-llama")
    r = _run(model, store, alpha=1.0)
    layers = r.tables["layers"]
    for t in ("needle", "conflict"):
        assert np.abs(layers[f"gain_{t}"]).max() < 1e-5
    gains = r.heads[r.heads.metric.str.startswith("pasta_gain")]["value"].dropna()
    assert len(gains) and np.abs(gains).max() < 1e-5
    ev = r.tables["eval"].set_index("condition")
    for metric in ("recall", "first_logprob", "context_rate", "memory_rate", "logit_diff"):
        assert ev[metric].to_numpy() == pytest.approx(ev.loc["none", metric], abs=1e-5)


def test_chosen_heads_are_the_top_k_of_the_fine_pass_over_the_best_layers(load, store):
    model = load("tiny-llama")
    params = {"top_layers": 1, "n_heads_chosen": 3, "n_random": 4, "target": "conflict",
              "needle_random": 2}  # fmt: skip
    r = _run(model, store, **params)
    layers = r.tables["layers"]
    best = layers.sort_values(["score", "layer"], ascending=[False, True]).head(1)["layer"]
    assert set(layers.layer[layers.best]) == set(best)
    fine = r.heads[(r.heads.metric == "pasta_score") & r.heads.value.notna()]
    assert set(fine.layer) == set(best) and len(fine) == model.n_heads
    top = fine.sort_values(["value", "layer", "head"], ascending=[False, True, True]).head(3)
    chosen = r.tables["chosen"]
    assert list(zip(chosen.layer, chosen["head"], strict=True)) == list(
        zip(top.layer, top["head"], strict=True)
    )
    gain = r.heads[r.heads.metric == "pasta_gain_conflict"].set_index(["layer", "head"]).value
    assert chosen.gain_conflict.tolist() == pytest.approx(
        [gain[(a, b)] for a, b in zip(chosen.layer, chosen["head"], strict=True)]
    )
    ev = r.tables["eval"]
    randoms = ev[ev.kind == "random"]
    assert len(randoms) == 4 and all(len(h.split()) == 3 for h in randoms.heads)
    assert "recall" in ev and "context_rate" in ev  # both tasks evaluated
    assert randoms.recall.notna().sum() == 2 and randoms.context_rate.notna().all()
    s = r.tables["summary"]
    n_random = s.groupby("metric").n_random.first()
    assert n_random["recall"] == 2 and n_random["context_rate"] == 4
    assert r.info["n_eval"]["needle"] == 6  # needles not profiled: every sample evaluated
    assert s.percentile.between(0, 100).all() and s.p_value.between(1 / 5, 1).all()


def test_head_config_round_trips(load, store, tmp_path):
    model = load("tiny-llama")
    r = _run(model, store, target="conflict", evaluate="conflict")
    cfg = head_config(r)
    assert cfg == r.info["head_config"]
    assert cfg["model"] == "tiny-llama" and cfg["alpha"] == 0.01
    heads = [
        Head(int(a), int(b))
        for a, b in zip(r.tables["chosen"].layer, r.tables["chosen"]["head"], strict=True)
    ]
    assert sum(len(v) for v in cfg["heads"].values()) == len(heads)
    path = write_head_config(cfg, tmp_path / "cfg" / "heads.json")
    back = read_head_config(path)
    assert back == {"model": "tiny-llama", "alpha": 0.01, "heads": sorted(heads)}
    assert json.loads(path.read_text()) == cfg
    assert head_config(back["heads"], back["alpha"], back["model"]) == cfg
    bare = read_head_config({"16": [7, 10], "22": [5]})  # PASTA's own file layout
    assert bare["heads"] == [Head(16, 7), Head(16, 10), Head(22, 5)] and bare["alpha"] is None
    # a user's own set, evaluated without profiling
    mine = _run(
        model, store, heads=[f"L{h.layer}H{h.head}" for h in heads], n_random=2, evaluate="conflict"
    )
    assert "layers" not in mine.tables and mine.info["head_config"]["heads"] == cfg["heads"]
    assert mine.info["source"] == "user heads"


def test_auto_highlight_picks_a_context_sentence(load):
    model = load("tiny-llama")
    needle, conflict = _batches(model)
    for batch in (needle, conflict):
        picks = auto_spans(model, batch)
        for r, (a, b) in enumerate(picks):
            lo, hi = batch.region[r]
            assert lo <= a < b <= hi
            assert (a, b) in sentences(model.codec, batch.tokens[r].tolist(), batch.region[r])
    s = needle.samples[0]
    region = model.codec.decode(s.context[needle.region[0][0] : needle.region[0][1]].tolist())
    assert "Question" not in region and s.needle.split()[0] in region
    assert needle.fallbacks == 0 and conflict.fallbacks == 0
    cands = sentences(model.codec, s.context.tolist(), needle.region[0])
    assert tuple(s.needle_span) in cands  # the needle is one sentence of the context


def test_percentile_and_p_value_follow_the_formula():
    # 0.8 vs [0.2, 0.8, 0.9, 0.1]: beats 2, ties 1 -> 62.5; as good or better: 2 -> 3/5
    assert percentile_p(0.8, np.array([0.2, 0.8, 0.9, 0.1]), 1.0) == pytest.approx((62.5, 3 / 5))
    # lower is better (memory rate): 0.1 vs [0.5, 0.05, 0.2, 0.3] beats 3 -> 75; p = 2 / 5
    assert percentile_p(0.1, np.array([0.5, 0.05, 0.2, 0.3]), -1.0) == pytest.approx((75, 2 / 5))


def test_bad_input_is_refused_and_nothing_stored(load, store, monkeypatch):
    model = load("tiny-llama")
    before = len(store.list_runs())
    cases = [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"n_random": 0}, "n_random must be"),
        ({"heads": ["L99H0"]}, "outside the model"),
        ({"heads": ["head 3"]}, "L<layer>H<head>"),
        ({"n_heads_chosen": 9}, "n_heads_chosen"),
        ({"needle_random": 9}, "needle_random"),
        ({"profile_needles": 9}, "no needle samples"),
    ]
    for params, match in cases:
        with pytest.raises(WorkbenchError, match=match) as err:
            _run(model, store, **params)
        assert "\n" not in str(err.value)
    real = C.needle_batches

    def outside(codec, samples, chat):
        out = real(codec, samples, chat)
        for b in out:
            b.gold = [(a, b.length + 3) for a, _ in b.gold]
        return out

    monkeypatch.setattr(C, "needle_batches", outside)
    with pytest.raises(WorkbenchError, match="outside its 64-token prompt") as err:
        _run(model, store)
    assert "\n" not in str(err.value)
    assert len(store.list_runs()) == before


@pytest.mark.models
def test_pasta_on_smollm2(smollm2, store):
    """Exact against steered forwards under GQA; steering the best heads to the context raises
    logit(o_c) - logit(o_m) on the profiling prompts (a small select split: 20% of records)."""
    kc = {"format": "sentence", "test_fraction": 0.8}
    groups = build_task("knowledge_conflict", smollm2.codec, {**kc, "split": "select"}).groups
    batch = conflict_batch(max(groups, key=lambda g: g.n))
    variants = [[Head(la, h)] for la in (0, 14, 29) for h in (0, 5)]
    variants.append([Head(3, 1), Head(20, 5), Head(29, 0)])
    _check_sweep(smollm2, batch, variants, 0.01, 1e-3)
    params = {"target": "conflict", "evaluate": "conflict", "conflict_format": "sentence",
              "conflict_test_fraction": 0.8, "top_layers": 1, "n_heads_chosen": 2,
              "n_random": 2}  # fmt: skip
    r = run_analysis("pasta_profile", smollm2, store=store, params=params,
                     task_params={"context_lengths": [96], "depth_percents": [50],
                                  "n_needles": 1})  # fmt: skip
    assert r.info["n_profile"]["conflict"] >= 4
    assert r.tables["chosen"]["gain_conflict"].iloc[0] > 0
    assert r.tables["layers"]["gain_conflict"].max() > 0
    assert r.tables["summary"].percentile.between(0, 100).all()

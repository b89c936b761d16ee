"""intervention_eval: the chosen condition equals the intervention's own context manager around
plain forwards (zero, ACT, PASTA), random sets are what they claim, heads come from a stored run,
and bad input is refused with nothing stored."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import calibrate_attention, steer_attention
from workbench.forward.interventions import ablate_heads
from workbench.heads import parse_heads, random_head_sets
from workbench.metrics import logit_diff
from workbench.runner import run_analysis
from workbench.stats import random_rank
from workbench.tasks import build_task
from workbench.types import Head

HEADS = "L1H2, L0H3"


def _plain(model, ps, context):
    with torch.no_grad(), context:
        logits = model.bridge(ps.clean, prepend_bos=False)[:, -1]
    top = logits.argmax(-1)
    return {"accuracy": float((top == ps.correct).float().mean()),
            "incorrect_rate": float((top == ps.incorrect).float().mean()),
            "logit_diff": float(logit_diff(logits, ps.correct, ps.incorrect).mean())}  # fmt: skip


@pytest.mark.parametrize("iv", ["zero", "act", "pasta"])
def test_chosen_condition_equals_plain_forwards(load, store, iv):
    model = load("tiny-llama")
    ps = build_task("ioi", model.codec, {"n_prompts": 8})
    heads = parse_heads(HEADS)
    params = {"heads": HEADS, "intervention": iv, "n_random": 3, "tau": 0.05, "beta": 0.3,
              "alpha": 0.05, "span": "2:6"}  # fmt: skip
    r = run_analysis("intervention_eval", model, "ioi", params=params,
                     task_params={"n_prompts": 8}, store=store)  # fmt: skip
    cond = r.tables["conditions"].set_index("condition")
    ctx = {"zero": ablate_heads(model, heads),
           "act": calibrate_attention(model, heads, tau=0.05, beta=0.3),
           "pasta": steer_attention(model, heads, [(2, 6)], alpha=0.05)}[iv]  # fmt: skip
    want = _plain(model, ps, ctx)
    none = _plain(model, ps, ablate_heads(model, []))
    for m, v in want.items():
        assert cond.loc["chosen", m] == pytest.approx(v, abs=1e-5)
        assert cond.loc["none", m] == pytest.approx(none[m], abs=1e-5)
    assert ("all_heads" in cond.index) == (iv != "zero")
    s = r.tables["summary"].set_index("metric")
    rand = cond[cond["kind"] == "random"]["logit_diff"].to_numpy()
    pct, p = random_rank(cond.loc["chosen", "logit_diff"], rand)
    assert s.loc["logit_diff", "percentile"] == pytest.approx(pct)
    assert s.loc["logit_diff", "p_value"] == pytest.approx(p)


def random_sets(model, chosen, n, pool, seed):
    every = [Head(la, h) for la in range(model.n_layers) for h in range(model.n_heads)]
    like = chosen if pool == "layer_matched" else None
    return random_head_sets(every, len(chosen), n, seed, like=like)


def test_random_sets_have_the_chosen_size_and_layers(load):
    model = load("tiny-llama")
    chosen = parse_heads("L0H1 L1H2 L1H3")
    for s in random_sets(model, chosen, 10, "uniform", 0):
        assert len(set(s)) == 3
    want = Counter(h.layer for h in chosen)
    for s in random_sets(model, chosen, 10, "layer_matched", 0):
        assert Counter(h.layer for h in s) == want and len(set(s)) == 3
    again = random_sets(model, chosen, 4, "uniform", 1)
    assert random_sets(model, chosen, 4, "uniform", 1) == again


def test_heads_from_a_stored_run(load, store):
    model = load("tiny-llama")
    src = run_analysis("conflict_heads", model, "knowledge_conflict",
                       params={"require_known": False, "n_random": 2, "k_grid": [1]},
                       store=store)  # fmt: skip
    key = next(iter(src.info["chosen"]))
    r = run_analysis("intervention_eval", model, "knowledge_conflict",
                     params={"heads_run": src.run_id, "heads_key": key, "n_random": 2},
                     store=store)  # fmt: skip
    assert r.info["chosen"] == src.info["chosen"][key]
    with pytest.raises(WorkbenchError, match="chosen lists"):
        params = {"heads_run": src.run_id, "heads_key": "nope"}
        run_analysis("intervention_eval", model, "knowledge_conflict", params=params, store=store)


def test_bad_input_is_refused_and_nothing_stored(load, store):
    model = load("tiny-llama")
    cases = [
        ({"heads": HEADS, "beta": 0.0, "intervention": "act"}, "beta must be in"),
        ({"heads": HEADS, "alpha": 1.5, "intervention": "pasta"}, "alpha must be in"),
        ({"heads": "L9H0"}, "outside the model"),
        ({"heads": "layer3"}, "not a head"),
        ({}, "no heads given"),
        ({"heads": HEADS, "intervention": "pasta", "span": "0:999"}, "outside its"),
        ({"heads": HEADS, "n_random": 0}, "n_random"),
    ]
    for params, match in cases:
        with pytest.raises(WorkbenchError, match=match):
            run_analysis("intervention_eval", model, "ioi", params=params,
                         task_params={"n_prompts": 4}, store=store)  # fmt: skip
    with pytest.raises(WorkbenchError, match="question_start"):
        run_analysis("intervention_eval", model, "ioi",
                     params={"heads": HEADS, "intervention": "pasta"},
                     task_params={"n_prompts": 4}, store=store)  # fmt: skip
    assert len(store.list_runs()) == 0

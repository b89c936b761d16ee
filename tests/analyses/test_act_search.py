"""ACT's per-head search: the batched sweep equals one calibrated forward per head, beta = 1
changes nothing, the chosen set is exactly the heads passing the stated noise-floor rule, the
random sets have its size, the summary follows the stated percentile and p-value, bad input is
a one-line error with nothing stored; SmolLM2 on a layer subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.analyses.act_search import ActSearchParams
from workbench.analyses.act_search.compute import (
    eval_task_params,
    groups_of,
    score_groups,
    search_scope,
)
from workbench.analyses.act_search.figures import eval_figure, gain_heatmap
from workbench.analyses.act_search.scoring import (
    answer_choices,
    choice_metric,
    correct,
    noise_floor,
)
from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import calibrate_attention
from workbench.forward.head_sweep import naive_sweep
from workbench.heads import random_head_sets
from workbench.runner import run_analysis
from workbench.stats import random_rank
from workbench.tasks import build_task
from workbench.types import Head

LENIENT = {"tau": 0.02, "beta": 0.1, "alpha": 0.3, "n_random": 5, "n_boot": 200,
           "eval_tasks": ["label_choice", "ioi"]}  # fmt: skip
SMALL = {"subtasks": ["sentiment", "question"], "shots": 1}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_search_equals_one_calibrated_forward_per_head(load, name):
    model = load(name)
    built = build_task("label_choice", model.codec, SMALL)
    groups = groups_of(built)[:3]
    params = ActSearchParams(tau=0.02, beta=0.1, batch_tokens=60)  # several waves per group
    scope = search_scope(model, params)
    variants = [[h] for h in scope] + [[Head(0, 1), Head(model.n_layers - 1, 0)]]
    base, fast, _ = score_groups(model, groups, variants, params, "test")
    slow = []
    for g in groups:
        metric = choice_metric(*answer_choices(g))
        ctx = lambda hs: calibrate_attention(model, hs, tau=0.02, beta=0.1)  # noqa: E731
        slow.append(torch.stack(naive_sweep(model, g.clean, variants, ctx, metric)))
    slow_t = torch.cat(slow, dim=1)
    torch.testing.assert_close(fast, slow_t, atol=2e-5, rtol=1e-5)
    assert (correct(fast) == correct(slow_t)).all()
    assert float((fast - base[None]).abs().max()) > 1e-3  # the calibration did something


def test_noise_floor_rule_on_known_gains():
    n = 40
    d_acc = np.zeros((4, n))
    d_lp = np.zeros((4, n))
    d_acc[1, :6], d_lp[1] = 1.0, 0.05  # six prompts fixed, none lost, log-prob up everywhere
    d_acc[2, :3], d_acc[2, 3:6], d_lp[2] = 1.0, -1.0, 0.05  # as many lost as fixed
    d_acc[3, :1], d_lp[3, :20], d_lp[3, 20:] = 1.0, 0.3, -0.3  # log-prob gain not stable
    out = noise_floor(d_acc, d_lp, 500, 0.05, 0)
    assert out["chosen"].tolist() == [False, True, False, False]
    assert out["acc_gain"][1] == pytest.approx(6 / 40) and out["acc_neg_share"][1] == 0
    assert out["acc_lo"][1] <= out["acc_gain"][1] <= out["acc_hi"][1]


def test_eval_task_params_hold_out():
    sel = {"split": "select", "shots": 2, "seed": 0}
    assert eval_task_params("label_choice", "label_choice", sel) == (
        {**sel, "split": "test"}, "test split")  # fmt: skip
    assert eval_task_params("label_choice", "label_choice", {**sel, "split": "test"})[0][
        "split"] == "select"  # fmt: skip
    assert "not held out" in eval_task_params("label_choice", "label_choice",
                                              {**sel, "split": "all"})[1]  # fmt: skip
    assert eval_task_params("ioi", "ioi", {"seed": 3, "n_prompts": 8}) == (
        {"seed": 4, "n_prompts": 8}, "other seed")  # fmt: skip
    assert eval_task_params("ioi", "label_choice", sel) == ({}, "other task")
    assert eval_task_params("label_choice", "ioi", {"seed": 0}) == (
        {"split": "test"}, "other task (test split)")  # fmt: skip
    kc = {"split": "all", "seed": 0, "format": "both"}
    assert eval_task_params("knowledge_conflict", "knowledge_conflict", kc)[0]["split"] == "test"
    assert eval_task_params("factual", "factual", {"source": "all"})[1].startswith("not held")


def test_search_chooses_by_the_stated_rule_and_controls_match(load, store):
    model = load("tiny-llama")
    res = run_analysis("act_search", model, params=LENIENT, store=store)  # 44 prompts, 2 shots
    info, search = res.manifest["extra"], res.tables["search"]
    assert len(search) == model.n_layers * model.n_heads == info["n_scope_heads"]
    alpha = LENIENT["alpha"]
    rule = ((search["acc_gain"] > 0) & (search["acc_neg_share"] <= alpha)
            & (search["logprob_nonpos_share"] <= alpha))  # fmt: skip
    assert (rule == search["chosen"]).all()
    chosen = [f"L{r.layer}H{r.head}" for r in search[rule].itertuples()]
    assert chosen and sorted(chosen) == sorted(info["chosen"]) and info["n_chosen"] == len(chosen)
    assert sorted(f"L{r.layer}H{r.head}" for r in res.tables["chosen"].itertuples()) == sorted(
        chosen)  # fmt: skip
    assert np.allclose(search["acc"], info["base_acc"] + search["acc_gain"])
    assert (search["acc_lo"] <= search["acc_hi"]).all()
    heads = res.tables["heads"]
    gain = heads[heads["metric"] == "acc_gain"].set_index(["layer", "head"])["value"]
    assert np.allclose(gain.loc[list(zip(search["layer"], search["head"], strict=True))],
                       search["acc_gain"])  # fmt: skip
    # random sets: n_random of the chosen set's size, inside the scope
    assert len(info["random_sets"]) == LENIENT["n_random"]
    assert all(len(set(s)) == len(s) == len(chosen) for s in info["random_sets"])
    ev = res.tables["eval"]
    assert set(ev["task"]) == {"label_choice", "ioi", "mean"}
    rand = ev[ev["condition"].str.startswith("random_")]
    assert len(rand) == 3 * LENIENT["n_random"] and (rand["set_size"] == len(chosen)).all()
    assert (ev[ev["condition"] == "all"]["set_size"] == len(search)).all()
    assert (ev[ev["condition"] == "base"][["acc_change", "logit_diff_change"]] == 0).all().all()
    held = {t["task"]: t for t in info["eval_tasks"]}
    assert held["label_choice"]["params"]["split"] == "test" and held["ioi"]["n_prompts"] == 16
    assert held["label_choice"]["params"]["shots"] == 2 and info["n_calibration"] == 44
    # the summary: percentile and p-value of the chosen set among the random sets
    for row in res.tables["summary"].itertuples():
        t = ev[ev["task"] == row.task].set_index("condition")
        r = t[t.index.str.startswith("random_")][row.metric].to_numpy()
        v = float(t.loc["chosen", row.metric])
        pct = 100 * ((r < v).sum() + 0.5 * (r == v).sum()) / r.size
        assert row.percentile == pytest.approx(pct) and row.chosen == pytest.approx(v)
        assert row.p_value == pytest.approx((1 + (r >= v).sum()) / (1 + r.size))
        assert row.all == pytest.approx(float(t.loc["all", row.metric]))
    assert info["search_cost_prompt_forwards"] < info["naive_search_prompt_forwards"]
    again = run_analysis("act_search", model, params=LENIENT, store=store)
    assert again.from_store and again.tables["search"].equals(search)
    gain_heatmap(search)
    eval_figure(ev)


def test_beta_one_changes_nothing(load, store):
    model = load("tiny-gemma3")
    res = run_analysis("act_search", model, params={"beta": 1.0, "tau": 0.02, "n_boot": 100,
                       "eval_tasks": ["ioi"]}, task_params=SMALL, store=store)  # fmt: skip
    search, ev = res.tables["search"], res.tables["eval"]
    assert (search["acc_gain"] == 0).all() and not search["chosen"].any()
    assert search["logprob_gain"].abs().max() < 1e-5
    assert search["vocab_logprob_gain"].abs().max() < 1e-5
    assert res.manifest["extra"]["chosen"] == [] and res.manifest["extra"]["random_sets"] == []
    assert set(ev["condition"]) == {"base", "chosen", "all"}
    assert (ev["acc_change"] == 0).all() and ev["logit_diff_change"].abs().max() < 1e-5
    summary = res.tables["summary"]
    assert (summary["n_random"] == 0).all() and summary["p_value"].isna().all()


def test_random_sets_and_rank():
    scope = [Head(la, h) for la in range(3) for h in range(4)]
    sets = random_head_sets(scope, 5, 7, seed=2)
    assert len(sets) == 7 and all(len(set(s)) == 5 and set(s) <= set(scope) for s in sets)
    assert sets == random_head_sets(scope, 5, 7, 2) and sets != random_head_sets(scope, 5, 7, 3)
    assert random_rank(0.5, [0.1, 0.5, 0.9, 0.2]) == (62.5, 3 / 5)


def test_bad_input_is_refused_and_nothing_stored(load, store):
    model = load("tiny-llama")
    cases = [
        ({"beta": 0.0}, "beta must be in (0, 1]"),
        ({"beta": 1.5}, "beta must be in (0, 1]"),
        ({"tau": 0.0}, "tau must be in (0, 1)"),
        ({"tau": 1.0}, "tau must be in (0, 1)"),
        ({"layers": [99]}, "outside the model"),
        ({"heads": [0, 99]}, "outside the model"),
        ({"layers": [-1]}, "indices >= 0"),
        ({"n_random": 0}, "n_random must be >= 1"),
        ({"eval_tasks": ["needle"]}, "cannot evaluate"),
    ]
    for params, part in cases:
        with pytest.raises(WorkbenchError) as e:
            run_analysis("act_search", model, params=params, store=store)
        msg = str(e.value)
        assert "\n" not in msg and part in msg, msg
    assert len(store.list_runs()) == 0


@pytest.mark.models
def test_search_on_smollm2_layer_subset(smollm2, store):
    params = {"layers": [2, 20], "n_random": 3, "n_boot": 200,
              "eval_tasks": ["label_choice", "ioi"]}  # fmt: skip
    task = {"subtasks": ["sentiment"], "shots": 0}
    res = run_analysis("act_search", smollm2, params=params, task_params=task, store=store)
    info, search = res.manifest["extra"], res.tables["search"]
    assert len(search) == 2 * smollm2.n_heads and set(search["layer"]) == {2, 20}
    assert info["n_calibration"] == 16
    rule = ((search["acc_gain"] > 0) & (search["acc_neg_share"] <= 0.05)
            & (search["logprob_nonpos_share"] <= 0.05))  # fmt: skip
    assert (rule == search["chosen"]).all()
    ev = res.tables["eval"]
    k = int(search["chosen"].sum())
    assert (ev[ev["condition"] == "chosen"]["set_size"] == k).all()
    if k:
        assert (ev[ev["condition"].str.startswith("random_")]["set_size"] == k).all()
    assert info["search_cost_prompt_forwards"] < info["naive_search_prompt_forwards"]

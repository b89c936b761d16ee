"""ACT's per-head search and the held-out evaluation of the chosen heads (Yu et al. 2024).

1. **Search.** On the run's prompts (the calibration set; by default ``label_choice``'s select
   split) every head ``h`` of the scope (``layers`` x ``heads``, default all) is calibrated
   alone (``attention_edits``: sink columns ``s_j > tau`` except the first scaled by ``beta``,
   the freed mass given back in proportion) and each prompt scored (``scoring``: correct iff
   gold beats every other answer choice; gold's log-prob among the choices). All heads run
   batched through :func:`workbench.forward.head_sweep.sweep_heads` (each resumes at its layer from
   one unmodified run per length group), never one forward per head.
2. **Noise floor.** The heads kept are those passing ``scoring.noise_floor``'s paired-bootstrap
   rule (accuracy gain > 0; accuracy gain negative in at most ``alpha`` of the ``n_boot``
   resamples; gold log-prob gain positive in all but ``alpha``).
3. **Evaluation.** The chosen set ``C`` (``k`` heads) is applied together on each of
   ``eval_tasks``, built here on the model's codec (:func:`eval_task_params`: the
   calibration's own task on the split it did not use, or with the next seed; other tasks with
   their defaults, on their test split where they have one), against the unmodified model,
   ``n_random`` uniform random ``k``-sets of the scope (seeded) and every head of the scope
   calibrated (``all``); all variants of a length group run in one ``sweep_heads`` call. Per
   task and condition: accuracy and the mean logit difference (``margin``: gold minus the best
   other choice). ``mean`` is the unweighted mean over the eval tasks (ACT's average accuracy).
   Each metric (larger is better) of ``C``, ``v``, is placed among the random sets'
   ``r_1..r_n``: ``percentile = 100 (#{r_i < v} + #{r_i = v} / 2) / n`` and
   ``p = (1 + #{r_i >= v}) / (1 + n)``.

Tables: ``search`` (per scope head: accuracy with it calibrated, gains, bootstrap intervals and
shares, ``chosen``), ``eval`` (task x condition), ``summary`` (task x metric: chosen against
random and all), ``chosen`` (the head list); head metrics ``acc_gain`` and ``logprob_gain``
(NaN outside the scope).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from workbench.analyses.act_search import ActSearchParams
from workbench.analyses.act_search.scoring import (
    SCORES,
    correct,
    noise_floor,
    score_prompts,
)
from workbench.errors import WorkbenchError
from workbench.heads import random_head_sets
from workbench.progress import steps
from workbench.stats import random_rank
from workbench.types import AnalysisOutput, Head, HeadMetric, PromptGroups, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

RULE = ("keep h iff mean_p d_h[p] > 0 and #{b: D*_hb < 0} <= alpha B and #{b: E*_hb <= 0} <= "
        "alpha B (d: change of correctness, E*: resampled mean change of gold's log-prob among "
        "the choices, B paired bootstrap resamples of the calibration prompts)")  # fmt: skip
FORMULAS = {
    "column_score": "s_j = sum_i A_ij / (N - j)",
    "sink_set": "S = {j: s_j > tau} minus its first column",
    "calibration": "A'_ij = beta A_ij (j in S), A_ij (1 - beta m_i) / (1 - m_i) otherwise, "
    "m_i = sum_{j in S} A_ij",
    "correct": "margin = z_gold - max_{other choices} z > 0",
    "logprob": "z_gold - logsumexp_{choices} z",
    "percentile": "100 (#{r < v} + #{r = v}/2) / n",
    "p_value": "(1 + #{r >= v}) / (1 + n)",
}


def groups_of(prompts: PromptSet | PromptGroups) -> tuple[PromptSet, ...]:
    if isinstance(prompts, PromptGroups):
        return prompts.groups
    if isinstance(prompts, PromptSet):
        return (prompts,)
    raise WorkbenchError(
        f"act_search needs prompt pairs, got {type(prompts).__name__}",
        "use label_choice, factual, ioi, induction or knowledge_conflict",
    )


def search_scope(model: LoadedModel, params: ActSearchParams) -> list[Head]:
    """The heads searched: ``layers`` x ``heads`` (empty: all), or a one-line error."""
    layers = sorted(set(params.layers)) or list(range(model.n_layers))
    heads = sorted(set(params.heads)) or list(range(model.n_heads))
    if layers[-1] >= model.n_layers or heads[-1] >= model.n_heads:
        raise WorkbenchError(
            f"act_search: the scope (layers {layers}, heads {heads}) is outside the model "
            f"({model.n_layers} layers, {model.n_heads} heads)",
            f"use layers 0..{model.n_layers - 1} and heads 0..{model.n_heads - 1}",
        )
    return [Head(la, h) for la in layers for h in heads]


def score_groups(
    model: LoadedModel,
    groups: Sequence[PromptSet],
    variants: Sequence[Sequence[Head]],
    params: ActSearchParams,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`scoring.score_prompts` per length group, prompts concatenated in group order:
    base ``[n, 3]``, variants ``[V, n, 3]``, total cost in forwards of one prompt."""
    bases, outs, cost = [], [], 0.0
    for g in steps(groups, desc=f"{desc}: length groups"):
        base, out, c = score_prompts(
            model, g, variants, params.tau, params.beta, params.batch_tokens, desc=desc
        )
        bases.append(base)
        outs.append(out)
        cost += c * g.n
    return torch.cat(bases), torch.cat(outs, dim=1), cost


SPLIT_TASKS = ("label_choice", "knowledge_conflict")
"""Eval tasks with a select/test split: evaluated on ``test`` unless calibrated on it."""


def eval_task_params(
    name: str, calib_task: str, calib_params: Mapping[str, Any]
) -> tuple[dict[str, Any], str]:
    """The held-out version of eval task ``name`` and how it is held out: another task with its
    defaults (its test split where it has one); the calibration's own task with the other split
    (its other parameters kept) or, without a split, the next seed."""
    if name != calib_task:
        if name in SPLIT_TASKS:
            return {"split": "test"}, "other task (test split)"
        return {}, "other task"
    own = dict(calib_params)
    split = own.get("split")
    if split in ("select", "test"):
        other = "test" if split == "select" else "select"
        return {**own, "split": other}, f"{other} split"
    if split == "all":
        return {**own, "split": "test"}, "not held out: the calibration used split all"
    if "seed" in own:
        return {**own, "seed": int(own["seed"]) + 1}, "other seed"
    return own, "not held out: the calibration's own prompts"


def act_search(
    model: LoadedModel, prompts: PromptSet | PromptGroups, params: ActSearchParams
) -> AnalysisOutput:
    groups = groups_of(prompts)
    scope = search_scope(model, params)
    t0 = time.perf_counter()
    base, per_head, cost = score_groups(model, groups, [[h] for h in scope], params, "ACT search")
    t1 = time.perf_counter()
    acc0 = correct(base)
    d_acc = correct(per_head) - acc0[None]
    d_lp = (per_head[..., 1] - base[None, :, 1]).double().numpy()
    rule = noise_floor(d_acc, d_lp, params.n_boot, params.alpha, params.seed)
    chosen = [h for h, keep in zip(scope, rule["chosen"], strict=True) if keep]
    t2 = time.perf_counter()
    randoms = random_head_sets(scope, len(chosen), params.n_random, params.seed) if chosen else []
    ev, ev_info = evaluate(model, prompts, params, scope, chosen, randoms)
    t3 = time.perf_counter()
    search = pd.DataFrame({
        "layer": [h.layer for h in scope], "head": [h.head for h in scope],
        "acc": correct(per_head).mean(1), **{k: v for k, v in rule.items() if k != "chosen"},
        "vocab_logprob_gain": (per_head[..., 2] - base[None, :, 2]).double().mean(1).numpy(),
        "chosen": rule["chosen"].astype(bool),
    })  # fmt: skip
    search = search.astype({"layer": "int64", "head": "int64"})
    chosen_table = search[search["chosen"]][["layer", "head", "acc_gain", "logprob_gain"]]
    chosen_table = chosen_table.sort_values(["acc_gain", "logprob_gain"], ascending=False)
    n = int(base.shape[0])
    info = {
        "calibration_task": prompts.task,
        "calibration_params": dict(prompts.meta.get("params", {})),
        "n_calibration": n,
        "n_length_groups": len(groups),
        "n_scope_heads": len(scope),
        "scope_layers": sorted({h.layer for h in scope}),
        "scope_heads": sorted({h.head for h in scope}),
        "base_acc": float(acc0.mean()),
        "base_logprob": float(base[:, 1].double().mean()),
        "base_acc_boot_interval": _interval(acc0, params),
        "n_positive_gain": int((rule["acc_gain"] > 0).sum()),
        "n_chosen": len(chosen),
        "chosen": [str(h) for h in chosen],
        "rule": RULE,
        "alpha": params.alpha,
        "n_boot": params.n_boot,
        "formulas": FORMULAS,
        "random_sets": [[str(h) for h in s] for s in randoms],
        "search_seconds": t1 - t0,
        "bootstrap_seconds": t2 - t1,
        "eval_seconds": t3 - t2,
        "search_cost_prompt_forwards": cost,
        "naive_search_prompt_forwards": float(len(scope) * n),
        **ev_info,
    }
    return AnalysisOutput(
        head_metrics=_head_metrics(model, scope, d_acc, d_lp),
        tables={"search": search, "eval": ev, "summary": summarize(ev),
                "chosen": chosen_table.reset_index(drop=True)},
        info=info,
    )  # fmt: skip


def _interval(acc: np.ndarray, params: ActSearchParams) -> list[float]:
    rng = np.random.default_rng(params.seed + 1)
    idx = rng.integers(0, acc.size, size=(params.n_boot, acc.size))
    boot = acc[idx].mean(1)
    return [float(np.quantile(boot, params.alpha)), float(np.quantile(boot, 1 - params.alpha))]


def _head_metrics(
    model: LoadedModel, scope: Sequence[Head], d_acc: np.ndarray, d_lp: np.ndarray
) -> dict[str, HeadMetric]:
    out = {}
    n = int(d_acc.shape[1])
    for name, d in (("acc_gain", d_acc), ("logprob_gain", d_lp)):
        mean = np.full((model.n_layers, model.n_heads), np.nan)
        se = np.full_like(mean, np.nan)
        for i, h in enumerate(scope):
            mean[h.layer, h.head] = d[i].mean()
            se[h.layer, h.head] = d[i].std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
        out[name] = HeadMetric(mean, se, n)
    return out


EVAL_COLUMNS = ("task", "condition", "set_size", "acc", "logit_diff", "acc_change",
                "logit_diff_change", "n_prompts")  # fmt: skip
SUMMARY_COLUMNS = ("task", "metric", "base", "chosen", "chosen_change", "all", "all_change",
                   "random_mean", "random_std", "percentile", "p_value", "n_random",
                   "set_size")  # fmt: skip


def evaluate(
    model: LoadedModel,
    prompts: PromptSet | PromptGroups,
    params: ActSearchParams,
    scope: Sequence[Head],
    chosen: Sequence[Head],
    randoms: Sequence[Sequence[Head]],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Accuracy and mean margin per eval task and condition (module docstring, step 3). With
    no head chosen, ``chosen`` is the unmodified model and there are no random sets."""
    from workbench.tasks import build_task

    named = [("chosen", list(chosen))] if chosen else []
    named += [("all", list(scope))]
    named += [(f"random_{i:02d}", list(r)) for i, r in enumerate(randoms)]
    rows: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    calib = dict(prompts.meta.get("params", {}))
    for name in steps(params.eval_tasks, desc="ACT evaluation: tasks"):
        tparams, held = eval_task_params(name, prompts.task, calib)
        built = build_task(name, model.codec, tparams)
        groups = [g.to(model.device) for g in groups_of(built)]  # type: ignore[arg-type]
        sets = [s for _, s in named]
        base, per, cost = score_groups(model, groups, sets, params, f"ACT evaluation: {name}")
        n = int(base.shape[0])
        tasks.append({"task": name, "params": dict(built.meta.get("params", {})),
                      "held_out": held, "n_prompts": n, "cost_prompt_forwards": cost})  # fmt: skip
        acc0, m0 = float(correct(base).mean()), float(base[:, 0].double().mean())
        conds = [("base", 0, acc0, m0)] + [("chosen", 0, acc0, m0)] * (not chosen)
        for (cond, heads), scores in zip(named, per, strict=True):
            conds.append((cond, len(heads), float(correct(scores).mean()),
                          float(scores[:, 0].double().mean())))  # fmt: skip
        for cond, size, acc, m in conds:
            rows.append({"task": name, "condition": cond, "set_size": size, "acc": acc,
                         "logit_diff": m, "acc_change": acc - acc0,
                         "logit_diff_change": m - m0, "n_prompts": n})  # fmt: skip
    ev = pd.DataFrame(rows, columns=list(EVAL_COLUMNS))
    if len(params.eval_tasks) > 1:  # ACT's average over tasks (unweighted)
        values = ["set_size", "acc", "logit_diff", "acc_change", "logit_diff_change"]
        mean = ev.groupby("condition", sort=False)[values].mean().reset_index()
        mean = mean.assign(task="mean", n_prompts=sum(t["n_prompts"] for t in tasks))
        ev = pd.concat([ev, mean[list(EVAL_COLUMNS)]], ignore_index=True)
    ev = ev.astype({"set_size": "int64", "n_prompts": "int64"})
    conditions = ["base", "chosen", *(c for c, _ in named if c != "chosen")]
    return ev, {"eval_tasks": tasks, "eval_conditions": conditions}


def summarize(ev: pd.DataFrame) -> pd.DataFrame:
    """Per task and metric: the chosen set against the random sets and against ``all``."""
    rows = []
    for task in dict.fromkeys(ev["task"]):
        t = ev[ev["task"] == task].set_index("condition")
        rand = t[t.index.str.startswith("random_")]
        for metric in ("acc", "logit_diff"):
            v = float(t.loc["chosen", metric])
            pct, p = random_rank(v, rand[metric].tolist())
            r = rand[metric].to_numpy(dtype=float)
            rows.append({
                "task": task, "metric": metric, "base": float(t.loc["base", metric]),
                "chosen": v, "chosen_change": v - float(t.loc["base", metric]),
                "all": float(t.loc["all", metric]),
                "all_change": float(t.loc["all", metric]) - float(t.loc["base", metric]),
                "random_mean": float(r.mean()) if r.size else float("nan"),
                "random_std": float(r.std()) if r.size else float("nan"),
                "percentile": pct, "p_value": p, "n_random": int(r.size),
                "set_size": int(t.loc["chosen", "set_size"]),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


__all__ = ["SCORES", "act_search", "eval_task_params", "evaluate", "summarize"]

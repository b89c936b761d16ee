"""Memory heads and context heads (PH3, Jin et al. 2024), checked for sign consistency across
prompt formats (JUICE, Li et al. 2025), and PH3's pruning plans against random heads.

Prompts (task ``knowledge_conflict``): the conflict prompt (context stating the counterfactual
``o_c``, then the question), the memory answer ``o_m`` (correct) and ``o_c`` (incorrect); the
corrupted prompt is the same with ``o_m`` in the context (context agreeing with memory). Only
records the model knows are used: its greedy answer to the question alone is ``o_m``. With
``LD = logit(o_m) - logit(o_c)`` at the final position, per head ``h`` and prompt, three scores,
all *signed toward memory* (``> 0``: the head favours ``o_m``, a memory head; ``< 0``: ``o_c``, a
context head):

- ``path``: ``LD(conflict) - LD(h's direct path to the logits given its agreeing-context value)``
  (path patching to the logits, every other head frozen: ``path_patching.resumed``);
- ``dla``: the head's direct logit attribution to ``LD`` (final norm's scale frozen);
- ``ablation``: ``LD(conflict) - LD(conflict, h zero-ablated alone)``, with the memory and
  context rates (argmax ``= o_m`` / ``= o_c``) under the ablation (``head_sweep``, resumed at
  ``h``'s layer).

Scores are means over the *select* split's prompts (at most ``max_select`` per format: each
per-head sweep costs about ``n_heads / 2`` forwards of them), per format and over both. A head is
sign-consistent for a score when its means in the two formats (one sentence; a paragraph) have the
same sign; ``memory_score = max(s, 0)``, ``context_score = max(-s, 0)`` for consistent heads
(0 otherwise) and ``mixed_score = min(|s_sentence|, |s_paragraph|)`` for inconsistent ones, ``s``
the ``rank_by`` score (atlas roles above ``role_threshold``).

Pruning (PH3): zero-ablate the top-``k`` context heads (most negative ``s``; only consistent
ones with ``consistent_only``) to favour memory, or the top-``k`` memory heads to favour the
context; ``k`` is the grid size with the highest target rate on the select split (ties: the
smaller). On the test split the plan's target rate is compared with ``n_random`` uniform
random ``k``-head sets: ``percentile = 100 (#{r < v} + #{r = v}/2) / n``,
``p = (1 + #{r >= v}) / (1 + n)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.analyses.conflict_heads import ConflictHeadsParams
from workbench.errors import WorkbenchError
from workbench.forward.head_sweep import sweep_heads, zero_edit
from workbench.forward.paths import base_runs, logits_receiver_sweep
from workbench.forward.unembed import attribute, final_components
from workbench.heads import every_head
from workbench.metrics import logit_diff
from workbench.stats import mean_stderr, random_rank
from workbench.types import AnalysisOutput, Head, HeadMetric, PromptGroups, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

PER_PROMPT = ("formats", "record_splits", "questions", "relations")
DIRECTIONS = {"memory": "context", "context": "memory"}  # favour X by pruning heads of Y


def _subset(ps: PromptSet, idx: Sequence[int]) -> PromptSet:
    """Rows ``idx`` of a prompt set (tensors, prompt strings and per-prompt meta lists)."""
    ix = torch.as_tensor(list(idx), dtype=torch.long)
    meta = {k: ([v[i] for i in idx] if k in PER_PROMPT and isinstance(v, list) else v)
            for k, v in ps.meta.items()}  # fmt: skip
    pick = lambda xs: tuple(xs[i] for i in idx) if xs else xs  # noqa: E731
    return dataclasses.replace(
        ps, clean=ps.clean[ix], corrupt=ps.corrupt[ix], correct=ps.correct[ix],
        incorrect=ps.incorrect[ix], prompts=pick(ps.prompts),
        corrupt_prompts=pick(ps.corrupt_prompts), meta=meta,
    )  # fmt: skip


@torch.no_grad()
def _knows(model: LoadedModel, ps: PromptSet) -> np.ndarray:
    """Per prompt: the model's greedy answer to the question alone is ``o_m``."""
    questions = list(ps.meta.get("questions") or [])
    if len(questions) != ps.n:
        raise WorkbenchError(
            "conflict_heads: the prompts carry no per-prompt questions",
            "use the knowledge_conflict task",
        )
    out = np.zeros(ps.n, dtype=bool)
    for i, q in enumerate(questions):
        ids = torch.tensor([model.codec.encode_prompt(q)], device=model.device)
        logits = model.bridge(ids, prepend_bos=False, return_type="logits")[0, -1]
        out[i] = int(logits.argmax()) == int(ps.correct[i])
    return out


def _all_heads(model: LoadedModel) -> list[Head]:
    return every_head(model.n_layers, model.n_heads)


def _scores(model: LoadedModel, ps: PromptSet, params: ConflictHeadsParams) -> dict[str, Any]:
    """Per-prompt ``[b, L, H]`` path, dla, ablation scores and rates under each ablation."""
    n_l, n_h = model.n_layers, model.n_heads
    heads = _all_heads(model)
    base, source = base_runs(model, ps)
    ld0 = logit_diff(base.final_logits.float(), ps.correct, ps.incorrect)  # [b]
    patched, fallbacks = logits_receiver_sweep(
        base, source, heads, batch_tokens=params.batch_tokens
    )
    path = torch.stack([ld0 - logit_diff(patched[h].float(), ps.correct, ps.incorrect)
                        for h in heads], -1)  # fmt: skip
    comps = final_components(model, ps.clean)
    dla = attribute(model, comps, ps.correct, ps.incorrect)["heads"]  # [b, L, H]

    def metric(logits: Tensor) -> Tensor:  # [rows, 2]: LD and the argmax token
        rows = int(logits.shape[0])
        c, w = ps.correct.repeat(rows // ps.n), ps.incorrect.repeat(rows // ps.n)
        return torch.stack([logit_diff(logits.float(), c, w), logits.argmax(-1).float()], -1)

    vals, cost = sweep_heads(model, base, [[h] for h in heads], "z", zero_edit, metric,
                             batch_tokens=params.batch_tokens, desc="ablating heads")  # fmt: skip
    abl = torch.stack([ld0 - v[:, 0] for v in vals], -1)
    tok = torch.stack([v[:, 1] for v in vals], -1).long()  # [b, L*H]
    shape = (ps.n, n_l, n_h)
    return {
        "path": path.reshape(shape).double().cpu().numpy(),
        "dla": dla.double().cpu().numpy(),
        "ablation": abl.reshape(shape).double().cpu().numpy(),
        "memory": (tok == ps.correct[:, None]).reshape(shape).cpu().numpy(),
        "context": (tok == ps.incorrect[:, None]).reshape(shape).cpu().numpy(),
        "base_memory": (base.final_logits.argmax(-1) == ps.correct).cpu().numpy(),
        "base_context": (base.final_logits.argmax(-1) == ps.incorrect).cpu().numpy(),
        "cost": cost,
        "fallbacks": fallbacks,
    }


def _rates(
    model: LoadedModel, sets: Sequence[PromptSet], variants: Sequence[Sequence[Head]],
    params: ConflictHeadsParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Memory and context rates with each variant zero-ablated (``[V]`` each), and the
    unablated rates, over the prompts of ``sets``."""
    from workbench.forward.resume import ResumableRun

    mem, ctx, n = np.zeros(len(variants)), np.zeros(len(variants)), 0
    base_m = base_c = 0.0
    for ps in sets:
        run = ResumableRun(model, ps.clean)
        top = run.final_logits.argmax(-1)
        base_m += float((top == ps.correct).sum())
        base_c += float((top == ps.incorrect).sum())
        if variants:
            vals, _ = sweep_heads(model, run, variants, "z", zero_edit,
                                  lambda lg: lg.argmax(-1), batch_tokens=params.batch_tokens,
                                  desc="pruning plans")  # fmt: skip
            for j, v in enumerate(vals):
                mem[j] += float((v == ps.correct).sum())
                ctx[j] += float((v == ps.incorrect).sum())
        n += ps.n
    n = max(n, 1)
    return mem / n, ctx / n, np.array(base_m / n), np.array(base_c / n)


def _by_split(
    groups: Sequence[PromptSet], keep: Sequence[np.ndarray], split: str
) -> list[PromptSet]:
    out = []
    for ps, k in zip(groups, keep, strict=True):
        splits = list(ps.meta.get("record_splits") or ["select"] * ps.n)
        idx = [i for i in range(ps.n) if k[i] and splits[i] == split]
        if idx:
            out.append(_subset(ps, idx))
    return out


def _cap(sets: list[PromptSet], most: int) -> list[PromptSet]:
    """At most ``most`` prompts per format, in group order (the per-head sweeps' cost)."""
    seen: dict[str, int] = {}
    out = []
    for ps in sets:
        idx = []
        for i, f in enumerate(ps.meta.get("formats") or ["sentence"] * ps.n):
            if seen.get(f, 0) < most:
                seen[f] = seen.get(f, 0) + 1
                idx.append(i)
        if idx:
            out.append(ps if len(idx) == ps.n else _subset(ps, idx))
    return out


def conflict_heads(
    model: LoadedModel, prompts: PromptSet | PromptGroups, params: ConflictHeadsParams
) -> AnalysisOutput:
    """Head scores, roles and pruning plans (module docstring)."""
    groups = list(prompts.groups) if isinstance(prompts, PromptGroups) else [prompts]
    for g in groups:
        if any(len(g.meta.get(k) or []) != g.n for k in ("questions", "record_splits", "formats")):
            raise WorkbenchError(
                f"conflict_heads: task '{g.task}' prompts carry no per-prompt questions, splits "
                "and formats",
                "use the knowledge_conflict task",
            )
    keep = [_knows(model, g) if params.require_known else np.ones(g.n, bool) for g in groups]
    select, test = _by_split(groups, keep, "select"), _by_split(groups, keep, "test")
    select = _cap(select, params.max_select)
    if not select or not test:
        raise WorkbenchError(
            f"conflict_heads: {sum(g.n for g in select)} select and {sum(g.n for g in test)} test "
            "prompts the model knows the answer to; both splits are needed",
            "use the knowledge_conflict task with split = 'all' and records the model knows",
        )
    parts = [_scores(model, ps, params) for ps in select]
    keys = ("path", "dla", "ablation", "memory", "context", "base_memory", "base_context")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    fmts = np.array([f for ps in select for f in ps.meta.get("formats", ["sentence"] * ps.n)])
    present = sorted(set(fmts.tolist()))
    n_l, n_h = model.n_layers, model.n_heads
    rows, means = [], {}
    for s in ("path", "dla", "ablation"):
        means[s] = {f: cat[s][fmts == f].mean(0) for f in present}
    for f in present:
        sel = fmts == f
        d_mem = cat["memory"][sel].mean(0) - cat["base_memory"][sel].mean()
        d_ctx = cat["context"][sel].mean(0) - cat["base_context"][sel].mean()
        for la in range(n_l):
            for h in range(n_h):
                rows.append({"layer": la, "head": h, "format": f, "n": int(sel.sum()),
                             **{s: float(means[s][f][la, h]) for s in means},
                             "d_memory_rate": float(d_mem[la, h]),
                             "d_context_rate": float(d_ctx[la, h])})  # fmt: skip
    by_format = pd.DataFrame(rows)
    rank = cat[params.rank_by].mean(0)  # [L, H], both formats
    signs = np.stack([np.sign(means[params.rank_by][f]) for f in present])
    consistent = (signs == signs[0]).all(0) & (signs[0] != 0)
    mags = np.stack([np.abs(means[params.rank_by][f]) for f in present]).min(0)
    metrics: dict[str, HeadMetric] = {}
    n_sel = int(cat["path"].shape[0])
    for s in ("path", "dla", "ablation"):
        m, se = mean_stderr(cat[s])
        metrics[f"conflict_{s}"] = HeadMetric(m, se, n_sel)
    zeros = np.zeros_like(rank)
    metrics["memory_score"] = HeadMetric(np.where(consistent, np.maximum(rank, 0), 0), zeros, n_sel)
    metrics["context_score"] = HeadMetric(
        np.where(consistent, np.maximum(-rank, 0), 0), zeros, n_sel
    )
    metrics["mixed_score"] = HeadMetric(np.where(consistent, 0, mags), zeros, n_sel)
    for which in ("memory", "context"):
        d = cat[which].mean(0) - cat[f"base_{which}"].mean()
        metrics[f"ablation_d_{which}_rate"] = HeadMetric(d, zeros, n_sel)
    tables, info = _pruning(model, rank, consistent, select, test, params)
    tables["by_format"] = by_format
    info.update({
        "n_select": sum(g.n for g in select), "n_test": sum(g.n for g in test),
        "n_prompts_given": sum(g.n for g in groups),
        "n_known": int(sum(int(k.sum()) for k in keep)), "formats": present,
        "rank_by": params.rank_by, "n_consistent": int(consistent.sum()),
        "sign_consistency_share": float(consistent.mean()),
        "select_base_memory_rate": float(cat["base_memory"].mean()),
        "select_base_context_rate": float(cat["base_context"].mean()),
        "ablation_cost_forwards": float(sum(p["cost"] for p in parts)),
        "path_fallbacks": parts[0]["fallbacks"],
        "formula": "scores signed toward memory: path = LD - LD(direct path from the agreeing "
        "context), dla, ablation = LD - LD(zeroed); LD = logit(o_m) - logit(o_c)",
    })  # fmt: skip
    return AnalysisOutput(head_metrics=metrics, tables=tables, info=info)


def _pruning(
    model: LoadedModel, rank: np.ndarray, consistent: np.ndarray, select: list[PromptSet],
    test: list[PromptSet], params: ConflictHeadsParams,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:  # fmt: skip
    """PH3's plans: ``k`` on the select split, then the test split against random sets."""
    grid_rows, test_rows, summary, chosen = [], [], [], {}
    rng = np.random.default_rng(params.seed)
    every = _all_heads(model)
    for favour, prune in DIRECTIONS.items():
        sign = 1.0 if prune == "memory" else -1.0  # memory heads: s > 0; context heads: s < 0
        ok = (sign * rank > 0) & (consistent if params.consistent_only else True)
        cand = sorted(zip(*np.nonzero(ok), strict=True), key=lambda lh: -sign * rank[lh])
        cand_heads = [Head(int(la), int(h)) for la, h in cand]
        ks = [k for k in params.k_grid if k <= len(cand_heads)]
        if not ks:
            summary.append({"favour": favour, "prune": prune, "k": 0, "note": "no candidates"})
            continue
        plans = [cand_heads[:k] for k in ks]
        mem, ctx, bm, bc = _rates(model, select, plans, params)
        target = mem if favour == "memory" else ctx
        best = int(np.argmax(target))  # the first maximum: the smallest such k
        k = ks[best]
        for j, kk in enumerate(ks):
            grid_rows.append({"favour": favour, "k": kk, "memory_rate": mem[j],
                              "context_rate": ctx[j], "base_memory_rate": float(bm),
                              "base_context_rate": float(bc), "chosen": kk == k})  # fmt: skip
        plan = cand_heads[:k]
        chosen[favour] = [str(h) for h in plan]
        randoms = [[every[i] for i in rng.choice(len(every), size=k, replace=False)]
                   for _ in range(params.n_random)]  # fmt: skip
        mem_t, ctx_t, bm_t, bc_t = _rates(model, test, [plan, *randoms], params)
        tgt = mem_t if favour == "memory" else ctx_t
        for j in range(len(tgt)):
            name = "plan" if j == 0 else f"random_{j - 1}"
            test_rows.append({"favour": favour, "set": name, "k": k,
                              "memory_rate": mem_t[j], "context_rate": ctx_t[j]})  # fmt: skip
        pct, p = random_rank(float(tgt[0]), tgt[1:])
        base_t = float(bm_t if favour == "memory" else bc_t)
        summary.append({"favour": favour, "prune": prune, "k": k,
                        "heads": ", ".join(chosen[favour]),
                        "base_rate": base_t, "plan_rate": float(tgt[0]),
                        "gain": float(tgt[0]) - base_t, "random_mean": float(tgt[1:].mean()),
                        "random_std": float(tgt[1:].std()), "percentile": pct, "p_value": p,
                        "n_random": params.n_random})  # fmt: skip
    tables = {"pruning_k": pd.DataFrame(grid_rows), "pruning_test": pd.DataFrame(test_rows),
              "summary": pd.DataFrame(summary)}  # fmt: skip
    return tables, {"chosen": chosen, "k_grid": list(params.k_grid)}

"""PASTA (Zhang et al. 2024, QingruZhang/PASTA) profiled per head and evaluated.

**Steering** (:func:`workbench.forward.attention_edits.steer_attention`): in each chosen head, every
prompt key outside the highlighted span ``[a, b)`` gets ``log alpha`` added to its pre-softmax
score (its attention multiplied by ``alpha``, each row renormalised); keys generated after the
prompt are not steered. ``alpha = 1`` changes nothing.

**Profiling metric** (one forward per prompt and variant, final position, through the batched
:func:`workbench.forward.head_sweep.sweep_heads`; prompts of one length per sweep):

- needle: ``m = log p(answer_1 | context)``, the teacher-forced log-probability of the
  answer's first token after the prompt;
- knowledge conflict: ``m = logit(o_c) - logit(o_m)`` (context answer minus memory answer;
  steering toward the context should raise it).

The gain of a variant (a head set steered together) is ``mean_prompts (m_steered - m_plain)``,
its stderr ``std / sqrt(n)``. Coarse pass: one variant per layer, all its heads; fine pass:
each head of the ``top_layers`` best layers by the coarse score, alone; chosen: the top
``n_heads_chosen`` heads by the fine score (ties: lower layer, then head, first). The score is
the gain when one target is profiled; with ``target = "both"`` it is the mean over the two
tasks of ``gain / std(gains of that pass)`` (std over the pass's variants; 0 where it is 0).

**Evaluation** on held-out prompts (needles: the samples of needles after the first
``profile_needles`` and, with ``profile_depths``, at the other depths; every sample when needles
are not profiled; knowledge conflict: the ``test`` split, profiled on ``select``), conditions:
``none`` (no steering), ``chosen_gold`` and ``chosen_auto`` (the chosen heads, gold or automatic
highlight, ``highlight.py``) and ``random_i``: ``n_random`` sets of ``k`` heads drawn uniformly
without replacement from all heads (seeded), steered to the gold highlight (needles: the first
``needle_random`` of them, decoding being the expensive part). Metrics:

- ``recall``: ROUGE-1 recall of the needle in the greedy answer (decoded with the KV cache
  inside ``steer_attention``, ``prompt_lens`` = the context length), as ``kv_plan_eval``;
  ``first_logprob``: the needle profiling metric on the held-out prompts;
- ``context_rate`` / ``memory_rate``: share of conflict prompts whose final argmax is ``o_c`` /
  ``o_m``; ``logit_diff``: mean ``logit(o_c) - logit(o_m)`` (one forward, through the sweep).

For a metric with orientation ``s`` (+1, -1 for ``memory_rate``) and random-set values
``r_1..r_n``, a condition's value ``v`` has (as ``kv_plan_eval``) ``percentile = 100
(#{s r_i < s v} + #{r_i = v} / 2) / n`` and ``p = (1 + #{s r_i >= s v}) / (1 + n)``.

Cost (info ``costs``) in *prompt-forwards* (one prompt through all layers): base runs 1 each;
a sweep variant entering at layer ``l`` ``(L - l) / L`` per prompt; the automatic highlight 1
per prompt; greedy decoding ``(T + steps) / T`` per prompt and condition.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.analyses.pasta_profile import (
    PastaParams,
    conflict_task_params,
    head_config,
)
from workbench.analyses.pasta_profile.evaluate import (
    METRICS,
    Condition,
    batch_metric,
    eval_conflicts,
    eval_needles,
    summarise,
)
from workbench.analyses.pasta_profile.highlight import (
    Batch,
    Span,
    agreement,
    auto_spans,
    conflict_batch,
    needle_batches,
)
from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import check_spans, pasta_edit, steering_bias
from workbench.forward.head_sweep import check_variants, sweep_heads
from workbench.forward.resume import ResumableRun
from workbench.heads import every_head, parse_heads, random_head_sets
from workbench.tasks import build_task
from workbench.types import (
    AnalysisOutput,
    Head,
    HeadMetric,
    NeedleSet,
    PromptGroups,
    PromptSet,
)

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


class Profiler:
    """The base runs of one task's batches, each with its steering edit, kept for both passes."""

    def __init__(
        self,
        model: LoadedModel,
        batches: Sequence[Batch],
        spans: Sequence[list[Span]],
        alpha: float,
        batch_tokens: int,
        full: bool = False,
    ) -> None:
        self.model, self.batches, self.batch_tokens = model, list(batches), batch_tokens
        self.runs = [ResumableRun(model, b.tokens.to(model.device)) for b in self.batches]
        self.edits = [
            pasta_edit(steering_bias(sp, [b.length] * b.n, alpha, b.length))
            for b, sp in zip(self.batches, spans, strict=True)
        ]
        self.metrics = [batch_metric(b, full) for b in self.batches]
        self.base = [
            m(r.final_logits.float()).cpu() for m, r in zip(self.metrics, self.runs, strict=True)
        ]
        self.cost = float(sum(b.n for b in self.batches))  # prompt-forwards

    def values(self, variants: Sequence[Sequence[Head]], desc: str) -> list[list[Tensor]]:
        """Per batch, the metric of every variant (``[n, ...]`` each)."""
        out = []
        for b, run, edit, metric in zip(
            self.batches, self.runs, self.edits, self.metrics, strict=True
        ):
            vals, cost = sweep_heads(
                self.model,
                run,
                variants,
                "scores",
                edit,
                metric,
                batch_tokens=self.batch_tokens,
                desc=desc,
            )
            out.append([v.cpu() for v in vals])
            self.cost += cost * b.n
        return out

    def gains(self, variants: Sequence[Sequence[Head]], desc: str) -> np.ndarray:
        """``[variant, prompt]``: steered minus plain metric (every batch's prompts)."""
        per = self.values(variants, desc)
        return np.concatenate(
            [
                (torch.stack(v) - base[None]).double().numpy()
                for v, base in zip(per, self.base, strict=True)
            ],
            1,
        )


def _score(gains: dict[str, np.ndarray]) -> np.ndarray:
    """The ranking score of each variant (module docstring)."""
    means = [g.mean(1) for g in gains.values()]
    if len(means) == 1:
        return means[0]
    z = [m / s if (s := float(m.std())) > 0 else np.zeros_like(m) for m in means]
    return np.mean(z, 0)  # type: ignore[no-any-return]


def _top(score: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, ties to the earlier index."""
    return sorted(range(len(score)), key=lambda i: (-float(score[i]), i))[:k]


def _pass_table(keys: list[dict[str, int]], gains: dict[str, np.ndarray]) -> pd.DataFrame:
    score = _score(gains)
    rank = np.empty(len(score), dtype=int)
    rank[_top(score, len(score))] = np.arange(1, len(score) + 1)
    table = pd.DataFrame(keys)
    for t, g in gains.items():
        table[f"gain_{t}"] = g.mean(1)
        table[f"stderr_{t}"] = g.std(1, ddof=1) / np.sqrt(g.shape[1]) if g.shape[1] > 1 else np.nan
    table["score"], table["rank"] = score, rank
    return table


def profile(
    model: LoadedModel, profilers: dict[str, Profiler], params: PastaParams
) -> tuple[pd.DataFrame, pd.DataFrame, list[Head]]:
    """Coarse pass, fine pass over the best layers, chosen heads (module docstring)."""
    n_layers, n_heads = model.n_layers, model.n_heads
    coarse = [[Head(la, h) for h in range(n_heads)] for la in range(n_layers)]
    g = {t: p.gains(coarse, f"pasta coarse ({t})") for t, p in profilers.items()}
    layers = _pass_table([{"layer": la} for la in range(n_layers)], g)
    best = sorted(_top(layers["score"].to_numpy(), min(params.top_layers, n_layers)))
    layers["best"] = layers["layer"].isin(best)
    fine = [Head(la, h) for la in best for h in range(n_heads)]
    g = {t: p.gains([[h] for h in fine], f"pasta fine ({t})") for t, p in profilers.items()}
    heads = _pass_table([{"layer": h.layer, "head": h.head} for h in fine], g)
    chosen = [fine[i] for i in _top(heads["score"].to_numpy(), params.n_heads_chosen)]
    return layers, heads, chosen


def _head_metrics(
    model: LoadedModel, heads: pd.DataFrame, n: dict[str, int]
) -> dict[str, HeadMetric]:
    """The fine pass as per-head metrics (NaN for heads not profiled alone)."""
    out = {}
    la, h = heads["layer"].to_numpy(), heads["head"].to_numpy()
    cols: dict[str, tuple[str, str | None, int]] = {"pasta_score": ("score", None, max(n.values()))}
    cols |= {f"pasta_gain_{t}": (f"gain_{t}", f"stderr_{t}", n[t]) for t in n}
    for name, (col, err, count) in cols.items():
        mean = np.full((model.n_layers, model.n_heads), np.nan)
        mean[la, h] = heads[col].to_numpy()
        se = None
        if err is not None:
            se = np.full_like(mean, np.nan)
            se[la, h] = heads[err].to_numpy()
        out[name] = HeadMetric(mean, se, n=count)
    return out


def _needle_split(
    prompts: NeedleSet, params: PastaParams, profiling: bool
) -> tuple[list[Any], list[Any]]:
    samples = list(prompts.samples)
    if not profiling:
        return [], samples
    names = list(dict.fromkeys(s.needle for s in samples))[: params.profile_needles]
    depths = set(params.profile_depths)
    prof = [s for s in samples if s.needle in names and (not depths or s.depth_percent in depths)]
    held = [
        s
        for s in samples
        if s.needle not in names and (not depths or s.depth_percent not in depths)
    ]
    return prof, held


def _conflicts(
    model: LoadedModel, params: PastaParams, split: str
) -> tuple[list[Batch], dict[str, Any]]:
    built = build_task("knowledge_conflict", model.codec, conflict_task_params(params, split))
    groups = built.groups if isinstance(built, PromptGroups) else (cast("PromptSet", built),)
    facts = {
        "n_prompts": built.n,
        "recipe_hash": built.meta["recipe_hash"],
        "by_format": built.meta.get("n_prompts_by_format"),
    }
    return [conflict_batch(g.to(model.device)) for g in groups], facts


def pasta_profile(model: LoadedModel, prompts: NeedleSet, params: PastaParams) -> AnalysisOutput:
    """Profile, choose, evaluate (module docstring)."""
    t_start = time.perf_counter()
    user = sorted(set(parse_heads(params.heads, "pasta_profile")))
    if user:
        check_variants(model, [user])
    pool = min(params.top_layers, model.n_layers) * model.n_heads
    if not user and params.n_heads_chosen > pool:
        raise WorkbenchError(
            f"pasta_profile: n_heads_chosen {params.n_heads_chosen} > the {pool} heads of the "
            f"{min(params.top_layers, model.n_layers)} best layers",
            "raise top_layers or lower n_heads_chosen",
        )
    both = ("needle", "conflict")
    targets = [] if user else [t for t in both if params.target in (t, "both")]
    evals = [t for t in both if params.evaluate in (t, "both")]
    prof_s, eval_s = _needle_split(prompts, params, "needle" in targets)
    chat = str(prompts.meta.get("params", {}).get("chat_template", "auto"))
    sets: dict[str, dict[str, list[Batch]]] = {"profile": {}, "eval": {}}
    facts: dict[str, Any] = {}
    for phase, samples, wanted in (("profile", prof_s, targets), ("eval", eval_s, evals)):
        if "needle" in wanted:
            if not samples:
                raise WorkbenchError(
                    f"pasta_profile: no needle samples to {phase} on (needles "
                    f"{len(set(s.needle for s in prompts.samples))}, "
                    f"profile_needles {params.profile_needles}, profile_depths "
                    f"{list(params.profile_depths)})",
                    "use more needles or depths, or change the split",
                )
            sets[phase]["needle"] = needle_batches(model.codec, samples, chat)
        if "conflict" in wanted:
            split = "select" if phase == "profile" else "test"
            sets[phase]["conflict"], facts[f"conflict_{split}"] = _conflicts(model, params, split)
    for by_task in sets.values():  # a gold span outside its prompt: refused before any forward
        for bs in by_task.values():
            for b in bs:
                check_spans(b.gold, [b.length] * b.n)
    seconds: dict[str, float] = {}
    costs: dict[str, float] = {"auto_highlight": 0.0}
    auto: dict[tuple[str, str], list[list[Span]]] = {}
    agree: dict[str, Any] = {}
    t = time.perf_counter()
    for phase, by_task in sets.items():
        if phase == "profile" and params.highlight != "auto":
            continue
        for task, bs in by_task.items():
            auto[(phase, task)] = [auto_spans(model, b) for b in bs]
            costs["auto_highlight"] += sum(b.n for b in bs)
            agree[f"{task}_{phase}"] = agreement(
                [s for sp in auto[(phase, task)] for s in sp], [s for b in bs for s in b.gold]
            )
    seconds["auto_highlight"] = time.perf_counter() - t

    layers = heads_table = None
    chosen = user
    head_metrics: dict[str, HeadMetric] = {}
    if targets:
        t = time.perf_counter()
        profs = {}
        for task in targets:
            bs = sets["profile"][task]
            sp = auto[("profile", task)] if params.highlight == "auto" else [b.gold for b in bs]
            profs[task] = Profiler(model, bs, sp, params.alpha, params.batch_tokens)
        layers, heads_table, chosen = profile(model, profs, params)
        for task, p in profs.items():
            costs[f"profile_{task}"] = p.cost
        del profs
        seconds["profile"] = time.perf_counter() - t
        n = {task: sum(b.n for b in sets["profile"][task]) for task in targets}
        head_metrics = _head_metrics(model, heads_table, n)

    k = len(chosen)
    every = every_head(model.n_layers, model.n_heads)
    randoms = random_head_sets(every, k, params.n_random, params.seed)
    conditions: dict[str, Condition] = {
        "none": ([], "gold"),
        "chosen_gold": (chosen, "gold"),
        "chosen_auto": (chosen, "auto"),
    }
    randoms_named = [f"random_{i:02d}" for i in range(len(randoms))]
    conditions |= {name: (r, "gold") for name, r in zip(randoms_named, randoms, strict=True)}
    rows: list[dict[str, Any]] = []
    for task, run in (("needle", eval_needles), ("conflict", eval_conflicts)):
        if task not in sets["eval"]:
            continue
        t = time.perf_counter()
        bs = sets["eval"][task]
        spans = {"gold": [b.gold for b in bs], "auto": auto[("eval", task)]}
        conds = conditions
        if task == "needle":
            n_dec = params.needle_random or params.n_random
            conds = {c: v for c, v in conditions.items() if c not in randoms_named[n_dec:]}
        got, costs[f"eval_{task}"] = run(model, bs, spans, conds, params)
        rows += got
        seconds[f"eval_{task}"] = time.perf_counter() - t
    per_prompt = pd.DataFrame(rows)
    present = [m for m in METRICS if m in per_prompt]
    means = per_prompt.groupby("condition", sort=False)[present].mean().reindex(list(conditions))
    kinds = {"none": "none", "chosen_gold": "chosen", "chosen_auto": "chosen"}
    evaluation = pd.DataFrame(
        [
            {
                "condition": name,
                "kind": kinds.get(name, "random"),
                "highlight": kd,
                "heads": " ".join(str(h) for h in hs),
                **{m: float(means.loc[name, m]) for m in present},
            }
            for name, (hs, kd) in conditions.items()
        ]
    )
    cfg = head_config(chosen, params.alpha, model.name)
    chosen_rows = pd.DataFrame(
        [{"layer": h.layer, "head": h.head, "rank": i + 1} for i, h in enumerate(chosen)]
    )
    if heads_table is not None:
        extra = heads_table.drop(columns="rank")
        chosen_rows = chosen_rows.merge(extra, on=["layer", "head"], how="left")
    tables = {
        "eval": evaluation,
        "summary": summarise(evaluation),
        "chosen": chosen_rows,
        "eval_prompts": per_prompt,
    }
    if layers is not None:
        tables["layers"] = layers
    seconds["total"] = time.perf_counter() - t_start
    info: dict[str, Any] = {
        "head_config": cfg,
        "chosen": [str(h) for h in chosen],
        "source": "user heads" if user else f"profiled on {', '.join(targets)}",
        "targets": targets,
        "evaluated": evals,
        "highlight": params.highlight,
        "highlight_agreement": agree,
        "n_profile": {task: sum(b.n for b in bs) for task, bs in sets["profile"].items()},
        "n_eval": {task: sum(b.n for b in bs) for task, bs in sets["eval"].items()},
        "span_fallbacks": {
            f"{ph}_{task}": sum(b.fallbacks for b in bs)
            for ph, by in sets.items()
            for task, bs in by.items()
        },
        "conflict": facts,
        "formulas": {
            "steering": "scores[k] += log(alpha) for prompt keys k outside the highlight",
            "needle_metric": "log p(answer[0] | context) at the final position",
            "conflict_metric": "logit(o_c) - logit(o_m) at the final position",
            "gain": "mean over prompts of steered minus plain metric",
            "score": "gain (one target); mean over targets of gain / std(pass gains) (both)",
            "percentile": "100 (#{s r < s v} + #{r = v}/2) / n",
            "p_value": "(1 + #{s r >= s v}) / (1 + n)",
            "auto": "sentence of the context with the most final-query attention, mean over "
            "heads of layers >= n_layers // 2, position 0 left out",
        },
        "costs_prompt_forwards": costs,
        "seconds": seconds,
    }
    return AnalysisOutput(head_metrics=head_metrics, tables=tables, info=info)

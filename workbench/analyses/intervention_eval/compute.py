"""One intervention on chosen heads, against random heads, on the prompts of a task.

Conditions: ``none`` (the unmodified model), ``chosen`` (the intervention on the chosen heads),
``random_i`` (the same intervention on ``n_random`` random head sets of the same size: uniform
over all heads, or ``layer_matched``: as many heads per layer as the chosen set) and, for ACT and
PASTA, ``all_heads``. Interventions (``workbench.forward.attention_edits``,
``workbench.forward.head_sweep``):
``zero`` (``z_h = 0``), ``act`` (ACT calibration, ``tau``, ``beta``) and ``pasta`` (PASTA steering
to the highlighted span with ``alpha``; ``span = "context"`` highlights a knowledge-conflict
prompt's context, positions ``[BOS?, question_start)``). All conditions of one prompt group run
in one batched sweep resumed at each set's lowest layer.

Per prompt, at the final position: ``accuracy = [argmax = correct]``, ``incorrect_rate =
[argmax = incorrect]`` (for knowledge conflicts: the memory and context rates) and ``logit_diff
= logit(correct) - logit(incorrect)``; means over all prompts. For each metric the chosen set's
value ``v`` among the random sets' ``r_1..r_n`` (larger is better; for ``incorrect_rate`` read
``100 - percentile``): ``percentile = 100 (#{r < v} + #{r = v}/2) / n``,
``p = (1 + #{r >= v}) / (1 + n)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.analyses.intervention_eval import InterventionEvalParams
from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import act_edit, pasta_edit, steering_bias
from workbench.forward.head_sweep import check_variants, sweep_heads, zero_edit
from workbench.forward.resume import ResumableRun
from workbench.heads import every_head, parse_heads, random_head_sets
from workbench.metrics import logit_diff
from workbench.stats import random_rank
from workbench.types import AnalysisOutput, Head, PromptGroups, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

METRICS = ("accuracy", "incorrect_rate", "logit_diff")
KINDS = {"zero": "z", "act": "pattern", "pasta": "scores"}


def _spans(model: LoadedModel, ps: PromptSet, span: str) -> list[tuple[int, int]]:
    t = ps.seq_len
    if span != "context":
        a, b = (int(x) for x in span.split(":"))
        return [(a, b)] * ps.n
    starts = list(ps.meta.get("question_start") or [])
    if len(starts) != ps.n or any(s is None for s in starts):
        raise WorkbenchError(
            f"span 'context' needs knowledge_conflict prompts (task '{ps.task}' has no "
            "question_start)",
            "use the knowledge_conflict task or give span = 'start:stop'",
        )
    first = int(ps.prepend_bos)
    return [(first, min(int(s), t)) for s in starts]


def _edit(model: LoadedModel, ps: PromptSet, params: InterventionEvalParams) -> Any:
    if params.intervention == "zero":
        return zero_edit
    if params.intervention == "act":
        return act_edit(params.tau, params.beta)
    spans = _spans(model, ps, params.span)
    return pasta_edit(steering_bias(spans, [ps.seq_len] * ps.n, params.alpha, ps.seq_len))


def _per_prompt(logits: Tensor, ps: PromptSet, reps: int) -> Tensor:
    """``[rows, 3]``: accuracy, incorrect indicator and logit difference per row."""
    c, w = ps.correct.repeat(reps), ps.incorrect.repeat(reps)
    top = logits.argmax(-1)
    return torch.stack([(top == c).float(), (top == w).float(), logit_diff(logits.float(), c, w)],
                       -1)  # fmt: skip


def intervention_eval(
    model: LoadedModel, prompts: PromptSet | PromptGroups, params: InterventionEvalParams,
    *, stored_heads: Sequence[str] = (),
) -> AnalysisOutput:  # fmt: skip
    """The conditions' metrics, the summary against random sets (module docstring)."""
    typed = parse_heads(" ".join([params.heads, *stored_heads]), "intervention_eval")
    chosen = check_variants(model, [typed])[0]
    every = every_head(model.n_layers, model.n_heads)
    like = chosen if params.random_pool == "layer_matched" else None
    randoms = random_head_sets(every, len(chosen), params.n_random, params.seed, like=like)
    variants: dict[str, list[Head]] = {"chosen": chosen}
    variants.update({f"random_{i}": r for i, r in enumerate(randoms)})
    if params.intervention != "zero":
        variants["all_heads"] = every
    groups = list(prompts.groups) if isinstance(prompts, PromptGroups) else [prompts]
    sums = {name: np.zeros(len(METRICS)) for name in ["none", *variants]}
    n, cost = 0, 0.0
    for ps in groups:
        base = ResumableRun(model, ps.clean)
        sums["none"] += _per_prompt(base.final_logits, ps, 1).sum(0).double().cpu().numpy()

        def metric(lg: Tensor, ps: PromptSet = ps) -> Tensor:
            return _per_prompt(lg, ps, int(lg.shape[0]) // ps.n)

        vals, c = sweep_heads(
            model, base, list(variants.values()), KINDS[params.intervention],
            _edit(model, ps, params), metric, batch_tokens=params.batch_tokens,
            desc="intervention sets",
        )  # fmt: skip
        for name, vv in zip(variants, vals, strict=True):
            sums[name] += vv.sum(0).double().cpu().numpy()
        n, cost = n + ps.n, cost + c
    means = {name: s / max(n, 1) for name, s in sums.items()}
    rows = []
    for name, mv in means.items():
        kind = "random" if name.startswith("random") else name
        size = 0 if name == "none" else len(variants[name])
        rows.append({"condition": name, "kind": kind, "n_heads": size,
                     **{m: float(mv[j]) for j, m in enumerate(METRICS)}})  # fmt: skip
    table = pd.DataFrame(rows)
    summary = []
    rand = table[table["kind"] == "random"]
    for j, m in enumerate(METRICS):
        v = float(means["chosen"][j])
        pct, p = random_rank(v, rand[m].to_numpy())
        summary.append({
            "metric": m, "none": float(means["none"][j]), "chosen": v,
            "change": v - float(means["none"][j]), "random_mean": float(rand[m].mean()),
            "random_std": float(rand[m].std(ddof=0)), "percentile": pct, "p_value": p,
            "all_heads": float(means["all_heads"][j]) if "all_heads" in means else float("nan"),
            "n_random": params.n_random,
        })  # fmt: skip
    info = {
        "chosen": [str(h) for h in chosen], "intervention": params.intervention,
        "strength": {"zero": {}, "act": {"tau": params.tau, "beta": params.beta},
                     "pasta": {"alpha": params.alpha, "span": params.span}}[params.intervention],
        "n_prompts": n, "random_pool": params.random_pool, "cost_forwards": cost,
        "heads_from": params.heads_run or "typed",
    }  # fmt: skip
    return AnalysisOutput(tables={"conditions": table, "summary": pd.DataFrame(summary)}, info=info)

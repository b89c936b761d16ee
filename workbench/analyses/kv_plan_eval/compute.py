"""A KV-cache plan against full attention and against control plans, on the same needle samples.

For each plan ``P`` (``workbench.forward.streaming``) and needle sample (context
``c_1..c_N``, answer ``a_1..a_M``, needle text ``r``):

- ``recall``: ROUGE-1 recall of ``r`` in the greedy answer (stemmed, as ``retrieval_heads``);
- ``logprob``: teacher-forced ``(1/M) sum_t log p_P(a_t | c, a_<t)``;
- ``kl``: ``(1/M) sum_t KL(p_full(. | c, a_<t) || p_P(. | c, a_<t))`` at the answer positions;
- ``ppl``: ``exp`` of the mean next-token NLL over the ``ppl_tokens`` context positions from
  ``t = sink + window`` on (the first where a streaming head has dropped something; in
  ``decode`` mode the ``feed_last`` positions fed one at a time), i.e. perplexity on the
  haystack text, which no score was chosen on. Only those positions' logits are computed.

Controls at the plan's number ``k`` of full KV heads (``kvplans.controls``): ``n_random``
uniform random sets, ``n_random`` with the plan's per-layer counts, ``all_stream``,
``all_full`` (the unmodified model: every plan's reference) and ``anti`` (the ``k``
lowest-scored heads full); for a razor plan also ``no_echo`` (the heads only the echo rule
chose left streaming) and for any plan ``no_compensation``. For a metric ``m`` (oriented so
larger is better: recall, logprob; ``-kl``, ``-ppl``) and a random family with per-plan means
``r_1..r_n``, the plan's value ``v`` has

``percentile = 100 (#{r_i < v} + #{r_i = v} / 2) / n`` and
``p = (1 + #{r_i >= v}) / (1 + n)`` (one-sided: a random plan as good or better).

The budget curve evaluates the top-``k`` plan by the ranking score and ``curve_random`` random
``k``-sets for every ``k`` of ``curve``. ``oracle`` (``oracle.py``) evaluates every plan.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.analyses.kv_plan_eval import KVPlanEvalParams
from workbench.analyses.kv_plan_eval.oracle import oracle_plans, rank_plans
from workbench.analyses.kv_plan_eval.shared import ContextRun, first_layer, worth_it
from workbench.circuits.kvplans import build_plan, controls, kv_scores
from workbench.errors import WorkbenchError
from workbench.forward.decode import answer_recall, is_stop, stop_ids
from workbench.forward.eviction import decode_with_eviction
from workbench.forward.plan import KVPlan
from workbench.forward.streaming import StreamAttention, native_windows
from workbench.progress import steps
from workbench.stats import random_rank
from workbench.types import AnalysisOutput, NeedleSample, NeedleSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

METRICS = {"recall": 1.0, "logprob": 1.0, "kl": -1.0, "ppl": -1.0}
"""Each metric's orientation: +1 when larger is better."""


def _plan(
    model: LoadedModel, params: KVPlanEvalParams, plan: Mapping[str, Any] | None,
    table: pd.DataFrame | None, n_ctx: int, sources: Sequence[str],
) -> tuple[KVPlan, np.ndarray | None, dict[str, np.ndarray]]:  # fmt: skip
    """The plan, the score it ranks heads by (for ``anti`` and the curve), every score."""
    grid = (model.n_layers, model.n_kv_heads)
    every = {}
    if table is not None:
        every = {m: kv_scores(table, m, grid, params.column) for m in table["metric"].unique()}
    native = native_windows(model)
    if plan is not None:
        built = KVPlan.from_dict(plan)
        rank = every.get(params.metric)
        return built, rank, every
    if params.rule == "razor":
        missing = {"induction", "echo"} - set(every)
        if missing:
            raise WorkbenchError(
                f"razor needs induction and echo scores; the run has {sorted(every)}",
                "give a kv_head_scores run",
            )
        scores = {"induction": every["induction"], "echo": every["echo"]}
        rank = every["induction"]
    else:
        if params.metric not in every:
            raise WorkbenchError(
                f"no KV-head score '{params.metric}' in the run (it has {sorted(every)})",
                "set metric to one of those",
            )
        scores = {"score": every[params.metric]}
        rank = every[params.metric]
    extras: dict[str, dict[str, Any]] = {
        "razor": {"induction_share": params.induction_share, "echo_share": params.echo_share},
        "top_k": {"k": params.k},
        "threshold": {"threshold": params.threshold},
        "quantile": {"quantile": params.quantile},
        "budget": {"budget": params.budget, "n_ctx": n_ctx},
    }
    extra = extras[params.rule]
    built = build_plan(
        model.name, params.rule, scores, sink=params.sink, window=params.window,
        compensation=params.compensation, weighted=params.weighted, native=native,
        sources=sources, **extra,
    )  # fmt: skip
    return built, rank, every


def _reference(model: LoadedModel, sample: NeedleSample) -> Tensor:
    """Full attention's log-probabilities at the answer positions, ``[M, vocab]``."""
    ids = torch.cat([sample.context, sample.answer[:-1]]).to(model.device)[None]
    m = int(sample.answer.shape[0])
    with torch.no_grad():
        logits = model.bridge(ids, prepend_bos=False, return_type="logits", logits_to_keep=m)[0]
    return torch.log_softmax(logits.float(), -1)


def _metrics(
    lp: Tensor, ref: Tensor, answer: Tensor, ctx_lp: Tensor, ctx_next: Tensor
) -> dict[str, float]:
    """logprob, kl and ppl from log-probabilities (answer positions ``lp``, context positions
    ``ctx_lp`` predicting ``ctx_next``)."""
    ans = answer.to(lp.device)
    logprob = float(lp.gather(-1, ans[:, None]).mean())
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
    nll = -ctx_lp.gather(-1, ctx_next.to(ctx_lp.device)[:, None]).mean()
    return {"logprob": logprob, "kl": max(kl, 0.0), "ppl": float(torch.exp(nll))}


@torch.no_grad()
def _prefix(model: LoadedModel, sample: NeedleSample, n: int) -> Any:
    """The KV cache of the first ``n`` context tokens under full attention: every plan's
    prefix while ``n <= sink + window`` (no query there drops a key)."""
    ids = sample.context[:n].to(model.device)[None]
    _, cache = model.bridge(
        ids, prepend_bos=False, return_type="logits_and_cache", use_cache=True, logits_to_keep=1
    )
    return cache


@torch.no_grad()
def _mask_sample(
    model: LoadedModel, plan: KVPlan, sample: NeedleSample, ref: Tensor,
    params: KVPlanEvalParams, stops: frozenset[int], prefix: tuple[int, Any] | None = None,
    shared: ContextRun | None = None,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """One sample in mask mode: the context after the shared ``prefix`` (``(length, cache)``,
    copied; with ``shared``, resumed at the plan's first streaming layer), the answer
    teacher-forced on a copy of the cache, greedy decoding from the original."""
    ctx, ans = sample.context.to(model.device), sample.answer.to(model.device)
    n = int(ctx.shape[0])
    start = min(n - 1, plan.sink + plan.window)
    p, base = prefix if prefix is not None else (0, None)
    with StreamAttention(model, plan) as s:
        stop = min(start + params.ppl_tokens, n - 1)  # perplexity positions [start, stop)
        keep = torch.cat([torch.arange(start - p, stop - p), torch.tensor([n - 1 - p])])
        if shared is not None and p:
            layer = first_layer(model, plan)
            cache = shared.cache(layer, base)
            s.seed(cache)
            logits = shared.resume(layer, p, cache, keep)
            used = shared.cost(layer, p)
        else:
            cache = None
            if p:
                cache = copy.deepcopy(base)
                s.seed(cache)
            logits, cache = model.bridge(
                ctx[None, p:], prepend_bos=False, return_type="logits_and_cache",
                use_cache=True, past_key_values=cache, logits_to_keep=keep.to(model.device),
            )  # fmt: skip
            logits, used = logits[0].float(), float(n - p)
        # logits rows: positions start .. stop - 1, then n - 1
        forced = copy.deepcopy(cache)
        lp = [torch.log_softmax(logits[-1], -1)]
        if ans.shape[0] > 1:
            more, _ = model.bridge(
                ans[None, :-1], prepend_bos=False, return_type="logits_and_cache",
                use_cache=True, past_key_values=forced,
            )  # fmt: skip
            lp += list(torch.log_softmax(more[0].float(), -1))
        del forced
        ctx_lp = torch.log_softmax(logits[:-1], -1)
        out = _metrics(torch.stack(lp), ref, ans, ctx_lp, ctx[start + 1 : stop + 1])
        tokens: list[int] = []
        nxt = logits[-1]
        while len(tokens) < params.max_new_tokens and n + len(tokens) < model.codec.n_ctx:
            tok = int(nxt.argmax())
            tokens.append(tok)
            if is_stop(model, tok, stops, model.codec.decode(tokens[:-1])):
                break
            step, cache = model.bridge(
                torch.tensor([[tok]], device=model.device), prepend_bos=False,
                return_type="logits_and_cache", use_cache=True, past_key_values=cache,
            )  # fmt: skip
            nxt = step[0, -1].float()
    out["recall"] = answer_recall(model, sample, tokens, stops)
    return out, used + int(ans.shape[0]) - 1 + len(tokens)


def _decode_sample(
    model: LoadedModel, plan: KVPlan, sample: NeedleSample, ref: Tensor,
    params: KVPlanEvalParams, stops: frozenset[int], prefix: tuple[int, Any] | None = None,
    shared: ContextRun | None = None,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """One sample in decode mode: real eviction, teacher forcing and greedy decoding."""
    ctx, ans = sample.context, sample.answer
    n = int(ctx.shape[0])
    forced = decode_with_eviction(
        model, plan, ctx, feed_last=params.feed_last, forced=ans[:-1]
    )  # logits after positions start .. n - 1 + M - 1
    lp = torch.log_softmax(forced.logits, -1)
    fed = n - 1 - forced.start  # context positions fed singly, before the answer
    out = _metrics(lp[fed:], ref, ans, lp[:fed], ctx[forced.start + 1 :])
    greedy = decode_with_eviction(
        model, plan, ctx, feed_last=params.feed_last,
        max_new_tokens=params.max_new_tokens,
        stop=lambda toks: is_stop(model, toks[-1], stops, model.codec.decode(toks[:-1])),
    )  # fmt: skip
    out["recall"] = answer_recall(model, sample, greedy.tokens, stops)
    out["cache_fraction"] = greedy.cache_fraction  # measured; only all-streaming layers shrink
    return out, 2 * n + int(ans.shape[0]) - 1 + len(greedy.tokens)


def evaluate(
    model: LoadedModel, plans: Mapping[str, KVPlan], samples: Sequence[NeedleSample],
    params: KVPlanEvalParams, desc: str = "kv plans", refs: Sequence[Tensor] | None = None,
    layer_sharing: bool = True,
) -> tuple[pd.DataFrame, dict[str, float]]:  # fmt: skip
    """Every plan on every sample: a long table (plan, sample, metrics) and accounting.
    ``refs``: full attention's answer log-probabilities per sample when the caller already has
    them (``_reference``; computed here otherwise). ``layer_sharing`` (mask mode): plans resume
    at their first streaming layer from one full-attention run per sample (``shared.py``)
    where that saves work."""
    stops = stop_ids(model)
    t0 = time.perf_counter()
    own = refs is None
    refs = [_reference(model, s) for s in samples] if refs is None else refs
    run = _mask_sample if params.mode == "mask" else _decode_sample
    share = min(p.sink + p.window for p in plans.values()) if params.mode == "mask" else 0
    share = min([share] + [int(s.context.shape[0]) - 1 for s in samples]) if share else 0
    tokens: float = share * len(samples) + own * sum(int(s.context.shape[0] + s.answer.shape[0]) - 1
                                        for s in samples)  # fmt: skip
    rows = []
    order = [(i, name) for i in range(len(samples)) for name in plans]
    shared: tuple[int, Any] | None = None
    base: ContextRun | None = None
    shared_runs = 0
    layers = share > 0 and layer_sharing and worth_it(model, plans.values())
    for j, (i, name) in enumerate(steps(order, desc=desc)):
        if share and j % len(plans) == 0:  # a new sample: its prefix, shared by every plan
            shared = (share, _prefix(model, samples[i], share))
            base = ContextRun(model, samples[i]) if layers else None
            base = base if base is None or base.ok else None
            tokens += base.n if base is not None else 0
            shared_runs += base is not None
        metrics, used = run(model, plans[name], samples[i], refs[i], params, stops, shared, base)
        tokens += used
        rows.append({"plan": name, "sample": i, **metrics})
    n_ctx = max(int(s.context.shape[0]) for s in samples)
    acct = {
        "seconds": time.perf_counter() - t0,
        "tokens": tokens,
        "forward_equivalents": tokens / n_ctx,
        "reference_forwards": len(samples),
        "shared_prefix": share,
        "shared_layer_runs": shared_runs,  # full-attention context runs plans resumed from
    }
    table = pd.DataFrame(rows)
    table["_order"] = table["plan"].map({name: k for k, name in enumerate(plans)})
    table = table.sort_values(["_order", "sample"], kind="mergesort").drop(columns="_order")
    return table.reset_index(drop=True), acct


def _summary(means: pd.DataFrame, plan: str = "plan") -> pd.DataFrame:
    """Percentile and p-value of ``plan`` among each random family (module docstring)."""
    rows = []
    families = {
        "uniform": means.index.str.startswith("random_u"),
        "layer_matched": means.index.str.startswith("random_l"),
    }
    families["both"] = families["uniform"] | families["layer_matched"]
    for metric, sign in METRICS.items():
        v = sign * float(means.loc[plan, metric])
        for fam, sel in families.items():
            r = sign * means.loc[sel, metric].to_numpy(dtype=float)
            if r.size == 0:
                continue
            pct, p = random_rank(v, r)
            row = {"metric": metric, "family": fam, "plan": sign * v,
                   "random_mean": sign * float(r.mean()), "random_std": float(r.std()),
                   "percentile": pct, "p_value": p, "n_random": int(r.size)}  # fmt: skip
            for other in ("all_full", "all_stream", "anti", "no_echo", "no_compensation"):
                if other in means.index:
                    row[other] = float(means.loc[other, metric])
            rows.append(row)
    return pd.DataFrame(rows)


def _order(scores: np.ndarray, plan: KVPlan) -> list[tuple[int, int]]:
    pool = plan.streamable
    vals = [scores[h] for h in pool]
    idx = [
        i
        for i in np.argsort(-np.asarray(vals, dtype=float), kind="mergesort")
        if np.isfinite(vals[i])
    ]
    return [pool[i] for i in idx]


def _variants(
    plan: KVPlan, rank: np.ndarray | None, every: Mapping[str, np.ndarray], params: KVPlanEvalParams
) -> dict[str, KVPlan]:
    out = controls(plan, params.n_random, params.seed, rank)
    if plan.rule == "razor" and "induction" in every:
        share = float(plan.params.get("induction_share", params.induction_share))
        top = set(_order(every["induction"], plan)[: math.ceil(share * len(plan.streamable))])
        only_echo = {h for h in plan.full if h in plan.streamable and h not in top}
        if only_echo:
            out["no_echo"] = plan.replace(plan.full - only_echo, "razor_no_echo")
    if plan.compensation:
        out["no_compensation"] = KVPlan(
            plan.model, plan.grid, plan.full, plan.sink, plan.window, False, plan.weighted,
            plan.native, "no_compensation", dict(plan.params), plan.sources,
        )  # fmt: skip
    return out


def kv_plan_eval(
    model: LoadedModel, prompts: NeedleSet, params: KVPlanEvalParams, *,
    plan: Mapping[str, Any] | None, kv_table: pd.DataFrame | None, scores_run: str,
) -> AnalysisOutput:  # fmt: skip
    """The plan, its controls, the budget curve and (``oracle``) every plan (module docstring)."""
    samples = list(prompts.samples)
    if not samples:
        raise WorkbenchError("kv_plan_eval: the needle task has no samples", "add needles")
    n_ctx = min(int(s.context.shape[0]) for s in samples)
    if params.sink + params.window >= n_ctx and plan is None:
        raise WorkbenchError(
            f"sink {params.sink} + window {params.window} is not shorter than the "
            f"{n_ctx}-token context: nothing would be dropped",
            f"use sink + window < {n_ctx}, or longer contexts",
        )
    built, rank, every = _plan(
        model, params, plan, kv_table, n_ctx, [scores_run] if scores_run else []
    )
    StreamAttention(model, built)  # the plan fits the model, or a one-line error
    if built.sink + built.window >= n_ctx:
        raise WorkbenchError(
            f"the plan's sink + window ({built.sink + built.window}) is not shorter than the "
            f"{n_ctx}-token context", "use longer contexts",
        )  # fmt: skip
    plans = {"plan": built, **_variants(built, rank, every, params)}
    refs = [_reference(model, s) for s in samples]  # shared by the plans, curve and oracle
    table, acct = evaluate(model, plans, samples, params, refs=refs)
    means = table.groupby("plan")[list(METRICS)].mean()
    kinds = {name: plans[name].rule or "plan" for name in plans}
    plan_rows = pd.DataFrame([
        {"plan": name, "kind": kinds[name], "n_full": plans[name].n_full,
         "kv_fraction": plans[name].kv_fraction(n_ctx), "plan_id": plans[name].plan_id,
         **{m: float(means.loc[name, m]) for m in METRICS}}
        for name in plans
    ])  # fmt: skip
    if "cache_fraction" in table:  # decode mode: what the cache really held, next to kv_fraction
        held = table.groupby("plan")["cache_fraction"].mean()
        plan_rows["cache_fraction"] = [float(held[name]) for name in plan_rows["plan"]]
    tables = {"plans": plan_rows, "samples": table, "summary": _summary(means)}
    if params.curve:
        tables["curve"] = _curve(model, built, rank, samples, params, n_ctx, refs)
    info: dict[str, Any] = {
        "plan": built.to_dict(),
        "plan_str": str(built),
        "mode": params.mode,
        "n_samples": len(samples),
        "context_lengths": sorted({int(s.context.shape[0]) for s in samples}),
        "kv_fraction": built.kv_fraction(n_ctx),
        "n_full": built.n_full,
        "n_streamable": len(built.streamable),
        "accounting": acct,
    }
    if params.oracle:
        plans = oracle_plans(built)
        table, _ = evaluate(model, plans, samples, params, desc="oracle plans", refs=refs)
        means = table.groupby("plan")[list(METRICS)].mean()
        tables["oracle"], tables["rule_ranks"] = rank_plans(built, every, means)
    return AnalysisOutput(tables=tables, info=info)


def _curve(
    model: LoadedModel, plan: KVPlan, rank: np.ndarray | None, samples: Sequence[NeedleSample],
    params: KVPlanEvalParams, n_ctx: int, refs: Sequence[Tensor],
) -> pd.DataFrame:  # fmt: skip
    """Top-k by the ranking score and random k-sets, for every k of ``params.curve``."""
    if rank is None:
        raise WorkbenchError("the budget curve needs the plan's scores", "give scores_run")
    order = _order(rank, plan)
    rng = np.random.default_rng(params.seed + 1)
    plans: dict[str, KVPlan] = {}
    pool = plan.streamable
    for k in params.curve:
        if k > len(pool):
            raise WorkbenchError(f"curve point {k} > {len(pool)} streamable KV heads", "fix curve")
        plans[f"top{k}"] = plan.replace(order[:k], "top_k", k=k)
        for j in range(params.curve_random):
            pick = rng.choice(len(pool), size=k, replace=False)
            plans[f"rand{k}_{j}"] = plan.replace([pool[i] for i in pick], "random_uniform", k=k)
    table, _ = evaluate(model, plans, samples, params, desc="budget curve", refs=refs)
    means = table.groupby("plan")[list(METRICS)].mean()
    return pd.DataFrame([
        {"k": p.n_full, "kind": "scored" if name.startswith("top") else "random", "plan": name,
         "kv_fraction": p.kv_fraction(n_ctx), **{m: float(means.loc[name, m]) for m in METRICS}}
        for name, p in plans.items()
    ])  # fmt: skip

"""Evaluation of steered heads on held-out prompts: greedy needle answers under
``steer_attention`` and knowledge-conflict answers through the batched sweep, each condition
against random head sets (formulas: ``compute.py``'s module docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.analyses.pasta_profile.highlight import Batch, Span
from workbench.forward.attention_edits import pasta_edit, steer_attention, steering_bias
from workbench.forward.decode import answer_recall, forward_batch, is_stop, stop_ids
from workbench.forward.head_sweep import sweep_heads
from workbench.forward.resume import ResumableRun
from workbench.stats import random_rank
from workbench.types import Head

if TYPE_CHECKING:
    from workbench.analyses.pasta_profile import PastaParams
    from workbench.models.loading import LoadedModel

METRICS = {
    "recall": 1.0,
    "first_logprob": 1.0,
    "context_rate": 1.0,
    "memory_rate": -1.0,
    "logit_diff": 1.0,
}
"""Each evaluation metric's orientation: +1 when larger is what steering aims for."""


def _rows(logits: Tensor, n: int) -> Tensor:
    return torch.arange(int(logits.shape[0]), device=logits.device) % n


def needle_metric(first: Tensor) -> Callable[[Tensor], Tensor]:
    """``log p(answer_1)`` per row (row ``r`` is prompt ``r % n``)."""

    def metric(logits: Tensor) -> Tensor:
        idx = first.to(logits.device)[_rows(logits, int(first.shape[0]))]
        return torch.log_softmax(logits.float(), -1).gather(-1, idx[:, None])[:, 0]

    return metric


def conflict_metric(o_c: Tensor, o_m: Tensor, full: bool = False) -> Callable[[Tensor], Tensor]:
    """``logit(o_c) - logit(o_m)`` per row; with ``full`` also ``argmax == o_c``, ``== o_m``."""

    def metric(logits: Tensor) -> Tensor:
        rows = _rows(logits, int(o_c.shape[0]))
        c, m = o_c.to(logits.device)[rows], o_m.to(logits.device)[rows]
        lg = logits.float()
        diff = lg.gather(-1, c[:, None])[:, 0] - lg.gather(-1, m[:, None])[:, 0]
        if not full:
            return diff
        top = lg.argmax(-1)
        return torch.stack([diff, (top == c).float(), (top == m).float()], -1)

    return metric


def batch_metric(batch: Batch, full: bool = False) -> Callable[[Tensor], Tensor]:
    if batch.task == "needle":
        assert batch.first is not None
        return needle_metric(batch.first)
    assert batch.o_c is not None and batch.o_m is not None
    return conflict_metric(batch.o_c, batch.o_m, full)


@torch.no_grad()
def steered_greedy(
    model: LoadedModel,
    tokens: Tensor,
    spans: Sequence[Span],
    heads: Sequence[Head],
    alpha: float,
    max_new_tokens: int,
    stops: frozenset[int],
    first: Tensor,
) -> tuple[list[list[int]], Tensor, int]:
    """Greedy answers of equally long prompts steered on ``heads`` (none: plain), the
    log-probability of ``first`` after each prompt, and the tokens processed."""
    n, t = int(tokens.shape[0]), int(tokens.shape[1])
    steer = (
        steer_attention(model, heads, spans, alpha=alpha, prompt_lens=[t] * n)
        if heads
        else contextlib.nullcontext()
    )
    limit = max(1, min(max_new_tokens, int(model.codec.n_ctx) - t))
    gen: list[list[int]] = [[] for _ in range(n)]
    done, fed = [False] * n, n * t
    with steer:
        logits, cache = forward_batch(model, tokens.to(model.device), None)
        last = logits[:, -1].float()
        lp = torch.log_softmax(last, -1).gather(-1, first.to(last.device)[:, None])[:, 0].cpu()
        while True:
            nxt = [int(x) for x in last.argmax(-1).tolist()]
            for j in range(n):
                if not done[j]:
                    gen[j].append(nxt[j])
                    done[j] = len(gen[j]) >= limit or is_stop(
                        model, nxt[j], stops, model.codec.decode(gen[j][:-1])
                    )
            if all(done):
                break
            logits, cache = forward_batch(
                model, torch.tensor(nxt, device=model.device)[:, None], cache
            )
            last, fed = logits[:, -1].float(), fed + n
    return gen, lp, fed


Condition = tuple[list[Head], str]  # heads, "gold" | "auto"


def eval_needles(
    model: LoadedModel,
    batches: Sequence[Batch],
    spans: dict[str, list[list[Span]]],
    conditions: dict[str, Condition],
    params: PastaParams,
) -> tuple[list[dict[str, Any]], float]:
    """Per condition and prompt: recall and first_logprob; the cost in prompt-forwards."""
    stops, rows, cost = stop_ids(model), [], 0.0
    for bi, b in enumerate(batches):
        assert b.first is not None
        for name, (heads, kind) in conditions.items():
            gen, lp, fed = steered_greedy(
                model,
                b.tokens,
                spans[kind][bi],
                heads,
                params.alpha,
                params.max_new_tokens,
                stops,
                b.first,
            )
            cost += fed / b.length
            for j, s in enumerate(b.samples):
                rows.append(
                    {
                        "condition": name,
                        "task": "needle",
                        "length": b.length,
                        "prompt": j,
                        "format": "",
                        "recall": answer_recall(model, s, gen[j], stops),
                        "first_logprob": float(lp[j]),
                    }
                )
    return rows, cost


def eval_conflicts(
    model: LoadedModel,
    batches: Sequence[Batch],
    spans: dict[str, list[list[Span]]],
    conditions: dict[str, Condition],
    params: PastaParams,
) -> tuple[list[dict[str, Any]], float]:
    """Per condition and prompt: logit_diff, context and memory hit; cost in prompt-forwards."""
    rows, cost = [], 0.0
    names = ["context_rate", "memory_rate"]
    for bi, b in enumerate(batches):
        run = ResumableRun(model, b.tokens.to(model.device))
        metric = batch_metric(b, full=True)
        per = {"none": metric(run.final_logits.float()).cpu()}
        cost += b.n
        for kind in ("gold", "auto"):
            todo = {k: hs for k, (hs, kd) in conditions.items() if kd == kind and hs}
            if not todo:
                continue
            bias = steering_bias(spans[kind][bi], [b.length] * b.n, params.alpha, b.length)
            vals, c = sweep_heads(
                model,
                run,
                list(todo.values()),
                "scores",
                pasta_edit(bias),
                metric,
                batch_tokens=params.batch_tokens,
                desc="pasta eval",
            )
            per |= {k: v.cpu() for k, v in zip(todo, vals, strict=True)}
            cost += c * b.n
        for name in conditions:
            v = per[name]
            for j in range(b.n):
                rows.append(
                    {
                        "condition": name,
                        "task": "conflict",
                        "length": b.length,
                        "prompt": j,
                        "format": b.formats[j] if b.formats else "",
                        "logit_diff": float(v[j, 0]),
                        names[0]: float(v[j, 1]),
                        names[1]: float(v[j, 2]),
                    }
                )
    return rows, cost


def percentile_p(v: float, r: np.ndarray, sign: float) -> tuple[float, float]:
    """Percentile of ``v`` among ``r`` and the permutation p-value (module docstring)."""
    return random_rank(sign * v, sign * np.asarray(r, dtype=float))


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Percentile and p-value of each non-random condition among the random sets."""
    rand = table[table["kind"] == "random"]
    rows = []
    for metric, sign in METRICS.items():
        if metric not in table or table[metric].isna().all():
            continue
        r = rand[metric].dropna().to_numpy(dtype=float)
        for _, row in table[table["kind"] != "random"].iterrows():
            pct, p = percentile_p(float(row[metric]), r, sign)
            rows.append(
                {
                    "metric": metric,
                    "condition": row["condition"],
                    "value": float(row[metric]),
                    "random_mean": float(r.mean()),
                    "random_std": float(r.std()),
                    "percentile": pct,
                    "p_value": p,
                    "n_random": int(r.size),
                    "orientation": sign,
                }
            )
    return pd.DataFrame(rows)

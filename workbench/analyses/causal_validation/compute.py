"""Causal validation of any stored per-head score: ablate the top-k heads vs random k-sets.

Wu et al. 2024's causal test of retrieval heads ("masking the top retrieval heads breaks
needle retrieval, masking as many random heads does not"), made general. Given a stored run's
per-head score ``s[l, h]`` (ranked by ``s`` or ``|s|``; NaN cells never chosen), for each ``k``:

- ``top``: ablate the ``k`` best heads;
- ``random``: ablate ``k`` heads drawn uniformly from all ``n_layers * n_heads`` heads (top
  heads not excluded), set ``i`` with ``numpy.random.default_rng(seed + i)``; the draw for a
  seed is a fixed permutation cut at ``k``, so a seed's sets are nested across ``k``;
- ``none`` (``k = 0``): the unablated model, once.

Ablation is :func:`~workbench.forward.interventions.ablate_heads` on ``hook_z`` (``zero``, or
``mean``: per position over the task's clean prompts; for needle tasks over the positions of
the first context). The task metric, per prompt, then mean and standard error:

- prompt tasks: ``logit[correct] - logit[incorrect]`` at the final position
  (:func:`workbench.metrics.logit_diff`);
- needle tasks: ROUGE-1 recall of the greedy answer against ``real_needle``
  (:func:`workbench.forward.decode.greedy_answers`).

Output table ``validation``: ``k, set, seed, metric, value, stderr, n, heads``;
:func:`validation_figure` draws the metric against ``k``, top vs random mean +- sd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from workbench import metrics as M
from workbench.analyses.causal_validation import ValidationParams
from workbench.circuits import select_heads
from workbench.errors import WorkbenchError
from workbench.forward.interventions import ablate_heads, reference_z
from workbench.forward.selfcheck import require
from workbench.heads import every_head, random_head_sets
from workbench.models.backend import on_fast_linears
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, Head, NeedleSet, PromptSet

if TYPE_CHECKING:
    import pandas as pd

    from workbench.models.loading import LoadedModel


Reference = tuple[Tensor, dict[int, Tensor] | None]


def _reference(
    model: LoadedModel, prompts: PromptSet | NeedleSet, params: ValidationParams
) -> Reference:
    """The reference tokens of mean / resample ablation and their ``hook_z`` (one forward,
    shared by every ablated set; None for zero ablation)."""
    tokens = prompts.clean if isinstance(prompts, PromptSet) else prompts.samples[0].context[None]
    return tokens, None if params.ablation == "zero" else reference_z(model, tokens)


def _prompt_values(
    model: LoadedModel,
    prompts: PromptSet,
    heads: list[Head],
    params: ValidationParams,
    reference: Reference,
) -> np.ndarray:
    values = []
    tokens, acts = reference
    with (
        torch.no_grad(),
        ablate_heads(
            model, heads, params.ablation, reference_tokens=tokens, reference_acts=acts
        ) as bridge,
    ):
        for start in range(0, prompts.n, params.batch_size):
            sl = slice(start, start + params.batch_size)
            logits = bridge(prompts.clean[sl], prepend_bos=False)[:, -1]
            values.append(M.logit_diff(logits, prompts.correct[sl], prompts.incorrect[sl]))
    return torch.cat(values).double().numpy()


def _needle_values(
    model: LoadedModel,
    prompts: NeedleSet,
    heads: list[Head],
    params: ValidationParams,
    reference: Reference,
) -> np.ndarray:
    from workbench.forward.decode import greedy_answers

    tokens, acts = reference
    with ablate_heads(
        model,
        heads,
        params.ablation,
        reference_tokens=tokens,
        reference_acts=acts,
        mean_over_positions=True,
    ):
        answers = greedy_answers(model, prompts.samples, max_new_tokens=params.max_new_tokens)
    return np.array([a.recall for a in answers], dtype=np.float64)


@on_fast_linears
def causal_validation(
    model: LoadedModel,
    prompts: PromptSet | NeedleSet,
    params: ValidationParams,
    *,
    source: tuple[np.ndarray, dict[str, Any]],
) -> AnalysisOutput:
    """Task metric with the top-k heads ablated vs random k-sets, for each k (module doc).

    ``source``: the source run's ``(scores, facts)``, read from a store by
    :func:`~workbench.analyses.causal_validation.source_scores` (the runner passes them from
    the store it holds: the entry's ``inputs``), so the analysis itself never opens a store."""
    import pandas as pd

    scores, info = source
    if info["model"] != model.name or scores.shape != (model.n_layers, model.n_heads):
        raise WorkbenchError(
            f"run {info['run_id']} scores model {info['model']} ({scores.shape[0]}x"
            f"{scores.shape[1]} heads), not {model.name}",
            f"validate it on {info['model']}",
        )
    n_scored = int(np.isfinite(scores).sum())
    if max(params.ks) > n_scored:
        raise WorkbenchError(
            f"causal_validation: k = {max(params.ks)} is larger than the {n_scored} heads "
            f"run {info['run_id']} scores",
            f"use ks <= {n_scored}",
        )
    if isinstance(prompts, NeedleSet):
        from workbench.forward.decode import check_samples

        check_samples(model, prompts.samples)
        checks = require(model, "kv_cache")
        metric, evaluate = "needle_recall", _needle_values
    elif isinstance(prompts, PromptSet):
        checks = {}
        metric, evaluate = "logit_diff", _prompt_values  # type: ignore[assignment]
    else:
        raise WorkbenchError(f"causal_validation cannot run on {prompts!r}", "use a known task")
    ranked = select_heads(scores, "top_k", k=max(params.ks), absolute=params.absolute)
    reference = _reference(model, prompts, params)
    seeds = [params.seed + i for i in range(params.n_random)]
    rows: list[dict[str, Any]] = []

    def add(k: int, which: str, seed: int | None, heads: list[Head]) -> None:
        values = evaluate(model, prompts, heads, params, reference)  # type: ignore[arg-type]
        mean, stderr = mean_stderr(values)
        rows.append(
            {
                "k": k,
                "set": which,
                "seed": -1 if seed is None else seed,
                "metric": metric,
                "value": float(mean),
                "stderr": float(stderr),
                "n": int(values.shape[0]),
                "heads": " ".join(str(h) for h in heads),
            }
        )

    add(0, "none", None, [])
    for k in sorted(set(params.ks)):
        add(k, "top", None, ranked[:k])
        every = every_head(model.n_layers, model.n_heads)
        for seed, heads in zip(seeds, random_head_sets(every, k, len(seeds), seeds), strict=True):
            add(k, "random", seed, heads)
    table = pd.DataFrame(rows)
    return AnalysisOutput(
        tables={"validation": table},
        info={
            "source_run": info["run_id"],
            "source_analysis": info["analysis"],
            "source_metric": info["metric"],
            "source_task": info["task"],
            "metric": metric,
            "ablation": params.ablation,
            "random_seeds": seeds,
            "top_heads": [str(h) for h in ranked],
            "summary": summarise(table),
            "self_checks": checks,
        },
    )


def summarise(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per k: the top set's value, the random sets' mean and sd, and the unablated value."""
    base = float(table.loc[table["set"] == "none", "value"].iloc[0])
    out = []
    for k, grp in table[table["k"] > 0].groupby("k"):
        rand = grp.loc[grp["set"] == "random", "value"].to_numpy()
        out.append(
            {
                "k": int(k),  # type: ignore[call-overload]
                "none": base,
                "top": float(grp.loc[grp["set"] == "top", "value"].iloc[0]),
                "random_mean": float(rand.mean()) if rand.size else float("nan"),
                "random_sd": float(rand.std(ddof=1)) if rand.size > 1 else float("nan"),
            }
        )
    return out


def validation_figure(table: pd.DataFrame, title: str = "") -> Any:
    """Plotly figure: the metric against k, top-k line, random mean +- sd, unablated line."""
    import plotly.graph_objects as go

    summary = summarise(table)
    ks = [r["k"] for r in summary]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ks, y=[r["top"] for r in summary], mode="lines+markers",
                             name="top-k heads ablated"))  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=ks,
            y=[r["random_mean"] for r in summary],
            error_y={"type": "data", "array": [r["random_sd"] for r in summary]},
            mode="lines+markers",
            name="random k heads (mean +- sd)",
        )
    )
    if summary:
        fig.add_hline(y=summary[0]["none"], line_dash="dot", annotation_text="no ablation")
    metric = str(table["metric"].iloc[0]) if len(table) else ""
    fig.update_layout(title=title or f"causal validation: {metric} vs k", xaxis_title="k",
                      yaxis_title=metric, template="plotly_white")  # fmt: skip
    return fig

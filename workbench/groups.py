"""One result from an analysis run on prompt groups of different token lengths.

A :class:`~workbench.types.PromptGroups` holds one prompt set per length; the runner runs the
analysis on each and merges the outputs here. For a per-head metric with group means ``m_g``,
standard errors ``s_g`` (``std(ddof=1) / sqrt(n_g)``, as :func:`~workbench.types.mean_stderr`)
over ``n_g`` prompts, and ``N = sum_g n_g``:

- mean ``m = sum_g n_g m_g / N`` (the mean over all prompts; a head NaN in one group is
  averaged over the other groups);
- standard error ``sqrt(V / N)`` with the pooled sample variance
  ``V = (sum_g (n_g - 1) n_g s_g^2 + n_g (m_g - m)^2) / (N - 1)``: exactly the standard error
  over all prompts' values.

This is the per-prompt average, so it is exact for metrics that are means over prompts (logit
differences, probabilities, patching effects, retrieval or detector scores); normalised metrics
(``norm_logit_diff``) are normalised within each group by that group's own clean and corrupted
baselines. Tables are concatenated with a ``seq_len`` column; per-group facts go to
``info["groups"]`` and facts shared by every group stay at the top level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.types import AnalysisOutput, HeadMetric, PromptGroups


def pooled(
    means: Sequence[Any], stderrs: Sequence[Any | None], ns: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and standard error over all samples from per-group means / standard errors
    (module doc); NaN entries of a group are left out of that entry."""
    m = np.stack([np.asarray(x, dtype=np.float64) for x in means])
    n = np.asarray(ns, dtype=np.float64).reshape(-1, *([1] * (m.ndim - 1)))
    w = np.where(np.isnan(m), 0.0, n)
    total = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(total > 0, np.nansum(m * w, axis=0) / total, np.nan)
        if any(s is None for s in stderrs):
            return mean, None
        s = np.stack([np.asarray(x, dtype=np.float64) for x in stderrs])  # type: ignore[arg-type]
        within = (w - np.where(w > 0, 1.0, 0.0)) * w * np.nan_to_num(s) ** 2
        between = w * np.nan_to_num(m - mean) ** 2
        var = (within + between).sum(axis=0) / (total - 1)
        se = np.where(total > 1, np.sqrt(var / total), np.where(total == 1, 0.0, np.nan))
    return mean, se


def merge_outputs(prompts: PromptGroups, outputs: Sequence[AnalysisOutput]) -> AnalysisOutput:
    """One output from one per group (module doc)."""
    import pandas as pd

    ns = [g.n for g in prompts.groups]
    lengths = [g.seq_len for g in prompts.groups]
    metrics: dict[str, HeadMetric] = {}
    for name in outputs[0].head_metrics:
        parts = [o.head_metrics[name] for o in outputs]
        mean, se = pooled([p.mean for p in parts], [p.stderr for p in parts], [p.n for p in parts])
        metrics[name] = HeadMetric(mean, se, sum(p.n for p in parts))
    tables: dict[str, Any] = {}
    for name in outputs[0].tables:
        frames = [o.tables[name].assign(seq_len=n) for o, n in zip(outputs, lengths, strict=True)]
        tables[name] = pd.concat(frames, ignore_index=True)
    shared = {
        k: v
        for k, v in outputs[0].info.items()
        if all(k in o.info and o.info[k] == v for o in outputs[1:])
    }
    groups = [
        {"seq_len": n_tok, "n_prompts": n, **{k: v for k, v in o.info.items() if k not in shared}}
        for o, n, n_tok in zip(outputs, ns, lengths, strict=True)
    ]
    return AnalysisOutput(head_metrics=metrics, tables=tables, info={**shared, "groups": groups})

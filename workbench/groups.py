"""One result from an analysis run on prompt groups of different token lengths.

A :class:`~workbench.types.PromptGroups` holds one prompt set per length; the runner runs the
analysis on each and merges the outputs here. For a per-head metric with group means ``m_g``,
standard errors ``s_g`` (``std(ddof=1) / sqrt(n_g)``, as :func:`~workbench.stats.mean_stderr`)
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

from workbench.stats import pooled
from workbench.types import AnalysisOutput, HeadMetric, PromptGroups


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

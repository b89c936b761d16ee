"""Slow, obvious reference for :mod:`workbench.analyses.attention_sinks.compute` (a test oracle).

Records every layer's full ``T x T`` pattern, values and residual stream, then computes each
statistic with plain Python loops over samples, layers, heads, queries and keys in float64,
straight from the formulas in the ``compute.py`` docstring (this package). Never used by the
analysis itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Int
from torch import Tensor

from workbench.analyses.attention_sinks.compute import SinkStats
from workbench.hooks import every_layer
from workbench.hooks import record as record_acts

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def record(model: LoadedModel, tokens: Int[Tensor, "batch pos"]) -> dict[str, list[Any]]:
    """Full patterns ``[n, head, T, T]``, values ``[n, T, kv, d]``, residuals ``[n, T, d]``."""
    kinds = ("pattern", "v", "resid_post")
    rec = record_acts(
        model.bridge,
        tokens,
        every_layer(kinds, model.n_layers),
        keep=lambda x: x.detach().double().cpu().numpy().copy(),
    )
    return {k: [rec.acts[(k, layer)] for layer in range(model.n_layers)] for k in kinds}


def _entropy(ps: list[float]) -> float:
    return -sum(p * math.log(p) for p in ps if p > 0)


def reference_statistics(model: LoadedModel, tokens: Int[Tensor, "batch pos"]) -> SinkStats:
    """The same :class:`SinkStats` as :func:`collect_statistics`, one loop at a time."""
    rec = record(model, tokens)
    n, t = tokens.shape
    n_layers, n_heads, n_kv = model.n_layers, model.n_heads, model.n_kv_heads
    alpha = np.zeros((n, n_layers, n_heads, t))
    row = np.zeros((n, n_layers, n_heads))
    col = np.zeros_like(row)
    vratio = np.zeros((n, n_layers, n_kv))
    rratio, rsink, rmed = (np.zeros((n, n_layers)) for _ in range(3))
    for s in range(n):
        for layer in range(n_layers):
            for h in range(n_heads):
                a = rec["pattern"][layer][s, h]
                for k in range(t):
                    alpha[s, layer, h, k] = sum(a[q, k] for q in range(k, t)) / (t - k)
                rows = [_entropy(list(a[q, : q + 1])) / math.log(q + 1) for q in range(1, t)]
                row[s, layer, h] = sum(rows) / len(rows)
                cols = []
                for k in range(t - 1):
                    column = [a[q, k] for q in range(k, t)]
                    total = sum(column)
                    cols.append(_entropy([c / total for c in column]) / math.log(t - k))
                col[s, layer, h] = max(cols)
            for g in range(n_kv):
                norms = [float(np.linalg.norm(rec["v"][layer][s, p, g])) for p in range(t)]
                vratio[s, layer, g] = norms[0] / float(np.median(norms[1:]))
            norms = [float(np.linalg.norm(rec["resid_post"][layer][s, p])) for p in range(t)]
            rmed[s, layer] = float(np.median(norms[1:]))
            rsink[s, layer] = norms[0]
            rratio[s, layer] = norms[0] / rmed[s, layer]
    return SinkStats(alpha, row, col, vratio, rratio, rsink, rmed)

"""Attention sinks: per-position sink rates, per-head sink identities, drains, peaks, dormancy.

**Importance and sink rate** (Gu et al. 2024, "When Attention Sink Emerges in Language
Models"). For a sample of ``T`` tokens and one (layer, head) with pattern ``A[q, k]``, the
importance of key position ``k`` is the mean attention it receives from the queries that can
see it. With 0-indexed positions ``k = 0 .. T-1``::

    alpha_k = (1 / (T - k)) * sum_{q >= k} A[q, k]

which is the paper's ``(1 / (T - k + 1)) * sum_{i=k}^{T} A[i, k]`` with its 1-indexed ``k``.
A head is a *sink head for k* when ``alpha_k > epsilon`` (epsilon = 0.3), and

    Sink_k^epsilon = 100 * share of (sample, layer, head) triples with alpha_k > epsilon.

**Indexing.** Tables follow the paper: ``k`` is 1-indexed (``Sink_1`` = the first token,
``position`` 0), and every table also carries the 0-indexed ``position``. Whether position 0 is
a BOS token follows the run's BOS policy; ``info["position_0"]`` says which it is.

**Per head.** ``sink_share`` = share of samples in which the head is a sink for the first token
(``alpha_1 > epsilon``); ``first_token_importance`` = mean ``alpha_1``. **Hidden sinks** (Yu et
al. 2024): every (sample, layer, head, position) with ``alpha_k > epsilon`` except the head's
first such position (normally the first token), with the token string: ACT's sink set, by the
same rule (``workbench.forward.attention_edits.sink_set``), so calibration acts on exactly these
columns; only positions seen by at least ``hidden_min_queries`` queries are listed (the last
positions have ``alpha_k`` averaged over very few queries; ``alpha_T = A[T, T]``).

**Drains and peaks** (Guo et al. 2024, "Active-Dormant Attention Heads"). ``value_norm_ratio``:
``||v_0|| / median_{k >= 1} ||v_k||`` per layer and KV head (``hook_v``; query heads inherit
their KV head's ratio under GQA), mean over samples; a value-state drain shows as a ratio << 1.
Residual peak: ``||x_0|| / median_{k >= 1} ||x_k||`` of ``hook_resid_post`` per layer. The median
is over the *other* positions (the sink token excluded).

**Active vs dormant** (Guo et al. 2024; their ``LLM/src/entropy.py``):

- row entropy: for each query ``q`` with ``q + 1 >= 2`` visible keys,
  ``H_q = -sum_k A[q,k] log A[q,k] / log(q + 1)``; the head's value is the mean over those
  rows. (Their code also averages row 0, whose normalised entropy it sets to 0; we skip it.)
- column entropy: each column renormalised over its queries, ``c[q,k] = A[q,k] / sum_q A[q,k]``,
  ``H^col_k = -sum_q c log c / log(T - k)`` for ``T - k >= 2``; the head's value is the
  **maximum** over columns (their ``column_headwise_maximum_normalized_entropy``). A sink
  column attended evenly by every query has ``H^col ~ 1``.
- dormant on a sample: row entropy < ``row_entropy_max`` (0.3) and column entropy >
  ``col_entropy_min`` (0.9); these thresholds are ours (their code takes them as arguments).
  ``dormant_share_<domain>`` = share of that domain's samples on which the head is dormant; the
  ``dormancy`` table also flags ``dormant`` from the domain means.

Everything is reduced inside the hooks with tensor ops over all heads: patterns to
``[batch, heads, T]`` importances and ``[batch, heads]`` entropies, values and residuals to
norm ratios; no ``T x T`` map is kept. ``reference.py`` (this package) is the slow loop it is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.analyses.attention_sinks import SinkParams
from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import sink_set
from workbench.hooks import hook_name, hooked, kv_group
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, HeadMetric, PromptSet

if TYPE_CHECKING:
    import pandas as pd

    from workbench.models.loading import LoadedModel


@dataclass(eq=False)
class SinkStats:
    """Per-sample statistics (numpy, float64): ``alpha [n, layer, head, T]``, ``row_entropy`` and
    ``col_entropy [n, layer, head]``, ``value_ratio [n, layer, kv_head]``, ``resid_ratio``,
    ``resid_sink_norm`` and ``resid_median_norm [n, layer]``."""

    alpha: Any
    row_entropy: Any
    col_entropy: Any
    value_ratio: Any
    resid_ratio: Any
    resid_sink_norm: Any
    resid_median_norm: Any


def pattern_statistics(
    pattern: Float[Tensor, "batch head q k"],
) -> tuple[Float[Tensor, "batch head k"], Float[Tensor, "batch head"], Float[Tensor, "batch head"]]:
    """Importance ``alpha_k``, mean normalised row entropy, max normalised column entropy."""
    p = pattern.float()
    t = p.shape[-1]
    pos = torch.arange(t, device=p.device, dtype=p.dtype)
    alpha = p.sum(-2) / (t - pos)
    plogp = torch.where(p > 0, -p * torch.log(p), torch.zeros_like(p))
    row = plogp.sum(-1)[..., 1:] / torch.log(pos[1:] + 1)  # queries with >= 2 visible keys
    col_p = p / p.sum(-2, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    col_plogp = torch.where(col_p > 0, -col_p * torch.log(col_p), torch.zeros_like(col_p))
    col = col_plogp.sum(-2)[..., : t - 1] / torch.log(t - pos[: t - 1])  # >= 2 queries
    return alpha, row.mean(-1), col.amax(-1)


def sink_norm_ratio(
    norms: Float[Tensor, "batch pos ..."],
) -> tuple[Float[Tensor, "batch ..."], Float[Tensor, "batch ..."]]:
    """``norms[:, 0] / median(norms[:, 1:])`` over positions, and that median."""
    med = torch.quantile(norms[:, 1:].double(), 0.5, dim=1).to(norms.dtype)
    return norms[:, 0] / med, med


def collect_statistics(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], batch_size: int = 8
) -> SinkStats:
    """Run ``tokens`` through the model in batches, reducing every hook to statistics."""
    n, t = tokens.shape
    n_layers, n_heads, n_kv = model.n_layers, model.n_heads, model.n_kv_heads
    alpha = torch.zeros(n, n_layers, n_heads, t, dtype=torch.float64)
    row = torch.zeros(n, n_layers, n_heads, dtype=torch.float64)
    col = torch.zeros_like(row)
    vratio = torch.zeros(n, n_layers, n_kv, dtype=torch.float64)
    rratio = torch.zeros(n, n_layers, dtype=torch.float64)
    rsink, rmed = torch.zeros_like(rratio), torch.zeros_like(rratio)

    for start in range(0, n, batch_size):
        batch = tokens[start : start + batch_size]
        sl = slice(start, start + batch.shape[0])

        def on_pattern(x: Tensor, hook: Any, layer: int = 0, sl: slice = sl) -> None:
            a, r, c = pattern_statistics(x.detach())
            alpha[sl, layer], row[sl, layer], col[sl, layer] = a.cpu(), r.cpu(), c.cpu()

        def on_v(x: Tensor, hook: Any, layer: int = 0, sl: slice = sl) -> None:
            vratio[sl, layer] = sink_norm_ratio(x.detach().float().norm(dim=-1))[0].cpu()

        def on_resid(x: Tensor, hook: Any, layer: int = 0, sl: slice = sl) -> None:
            norms = x.detach().float().norm(dim=-1)
            ratio, med = sink_norm_ratio(norms)
            rratio[sl, layer], rsink[sl, layer] = ratio.cpu(), norms[:, 0].cpu()
            rmed[sl, layer] = med.cpu()

        hooks = []
        for layer in range(n_layers):
            for kind, fn in (("pattern", on_pattern), ("v", on_v), ("resid_post", on_resid)):
                hooks.append((hook_name(kind, layer), _bind(fn, layer)))
        with torch.no_grad(), hooked(model.bridge, hooks):
            model.bridge(batch, prepend_bos=False, return_type=None)
    return SinkStats(*(x.numpy() for x in (alpha, row, col, vratio, rratio, rsink, rmed)))


def _bind(fn: Any, layer: int) -> Any:
    def hook(x: Tensor, hook: Any) -> None:
        fn(x, hook, layer)

    return hook


def attention_sinks(model: LoadedModel, prompts: PromptSet, params: SinkParams) -> AnalysisOutput:
    """Sink rates per position, sink heads, hidden sinks, drains, peaks and dormancy per domain."""
    tokens = prompts.clean
    n, t = (int(s) for s in tokens.shape)
    if t < 2:
        raise WorkbenchError(
            f"attention_sinks: samples of {t} token(s); importances need T >= 2",
            "use longer samples (texts: seq_len = 64)",
        )
    stats = collect_statistics(model, tokens, params.batch_size)
    domains = list(prompts.meta.get("domains") or [prompts.task] * n)
    groups = {"all": np.arange(n)}
    for d in dict.fromkeys(domains):
        groups[d] = np.array([i for i, x in enumerate(domains) if x == d])
    bos_id = model.codec.bos_token_id
    is_bos = bool(bos_id is not None and bool((tokens[:, 0] == bos_id).all()))
    ids = tokens.numpy()
    decode = _Decoder(model)
    sinks = stats.alpha > params.epsilon  # [n, layer, head, T]

    metrics = {
        "sink_share": HeadMetric(*mean_stderr(sinks[..., 0].astype(np.float64)), n),
        "first_token_importance": HeadMetric(*mean_stderr(stats.alpha[..., 0]), n),
        "value_norm_ratio": HeadMetric(*_per_query_head(model, stats.value_ratio), n),
    }
    dormant = (stats.row_entropy < params.row_entropy_max) & (
        stats.col_entropy > params.col_entropy_min
    )
    for d, idx in groups.items():
        if d == "all":
            continue
        share = sinks[idx, ..., 0].astype(np.float64)
        metrics[f"sink_share_{d}"] = HeadMetric(*mean_stderr(share), len(idx))
        metrics[f"dormant_share_{d}"] = HeadMetric(
            *mean_stderr(dormant[idx].astype(np.float64)), len(idx)
        )

    first = "BOS" if is_bos else "first token"
    tables = {
        "positions": _positions_table(stats, sinks, groups, ids, decode, first),
        "hidden_sinks": _hidden_table(stats, sinks, domains, ids, decode, params),
        "residual": _residual_table(stats, groups),
        "value_norms": _value_table(stats),
        "dormancy": _dormancy_table(stats, dormant, groups, params),
    }
    sink1 = {d: float(100 * sinks[idx, ..., 0].mean()) for d, idx in groups.items()}
    bos_text = decode(int(bos_id)) if is_bos and bos_id is not None else ""
    info = {
        "n_samples": n,
        "seq_len": t,
        "domains": list(groups)[1:],
        "epsilon": params.epsilon,
        "prepend_bos": prompts.prepend_bos,
        "position_0_is_bos": is_bos,
        "position_0": f"BOS token {bos_text!r}" if is_bos else "first text token (no BOS)",
        "position_1": "first text token" if is_bos else "second text token",
        "indexing": "k is 1-indexed as in Gu et al. 2024: Sink_1 is position 0",
        "sink_1_pct": sink1,
        "dormancy_thresholds": {
            "row_entropy_max": params.row_entropy_max,
            "col_entropy_min": params.col_entropy_min,
        },
        "median": "over the other positions (k >= 1), per sample; ratios averaged over samples",
    }
    return AnalysisOutput(head_metrics=metrics, tables=tables, info=info)


class _Decoder:
    """Token id -> string, memoised."""

    def __init__(self, model: LoadedModel) -> None:
        self.codec = model.codec
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = self.codec.decode([i])
        return self.cache[i]


def _per_query_head(model: LoadedModel, per_kv: Any) -> tuple[Any, Any]:
    """Mean and stderr over samples of a ``[n, layer, kv_head]`` array, repeated to query heads
    (query head ``h`` reads KV head ``h // (n_heads / n_kv_heads)``, as HF's ``repeat_kv``)."""
    return mean_stderr(np.repeat(per_kv, kv_group(model.n_heads, model.n_kv_heads), axis=2))


def _positions_table(
    stats: SinkStats, sinks: Any, groups: dict[str, Any], ids: Any, decode: Any, first: str
) -> pd.DataFrame:
    import pandas as pd

    t = stats.alpha.shape[-1]
    frames = []
    for d, idx in groups.items():
        same = (ids[idx] == ids[idx][:1]).all(axis=0)
        frames.append(
            pd.DataFrame(
                {
                    "domain": d,
                    "k": np.arange(1, t + 1),
                    "position": np.arange(t),
                    "role": [first] + [""] * (t - 1),
                    "token": [
                        decode(int(ids[idx][0, j])) if same[j] else "(varies)" for j in range(t)
                    ],
                    "n_queries": t - np.arange(t),
                    "sink_pct": 100 * sinks[idx].mean(axis=(0, 1, 2)),
                    "mean_importance": stats.alpha[idx].mean(axis=(0, 1, 2)),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _hidden_table(
    stats: SinkStats, sinks: Any, domains: list[str], ids: Any, decode: Any, params: SinkParams
) -> pd.DataFrame:
    import pandas as pd

    t = stats.alpha.shape[-1]
    last = t - params.hidden_min_queries  # positions 1..last are seen by >= min queries
    hidden = sink_set(sinks)  # ACT's sink set: every sink column but the first (shared rule)
    s, layer, head, pos = np.nonzero(hidden[..., : max(last, 0) + 1])
    return pd.DataFrame(
        {
            "domain": [domains[i] for i in s],
            "sample": s.astype("int64"),
            "layer": layer.astype("int64"),
            "head": head.astype("int64"),
            "k": (pos + 1).astype("int64"),
            "position": pos.astype("int64"),
            "token": [decode(int(ids[i, p])) for i, p in zip(s, pos, strict=True)],
            "alpha": stats.alpha[s, layer, head, pos],
        }
    )


def _residual_table(stats: SinkStats, groups: dict[str, Any]) -> pd.DataFrame:
    import pandas as pd

    frames = []
    for d, idx in groups.items():
        ratio, se = mean_stderr(stats.resid_ratio[idx])
        frames.append(
            pd.DataFrame(
                {
                    "domain": d,
                    "layer": np.arange(len(ratio)),
                    "ratio": ratio,
                    "stderr": se,
                    "sink_norm": stats.resid_sink_norm[idx].mean(0),
                    "median_norm": stats.resid_median_norm[idx].mean(0),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _value_table(stats: SinkStats) -> pd.DataFrame:
    import pandas as pd

    ratio, se = mean_stderr(stats.value_ratio)
    layer, kv = np.meshgrid(*(np.arange(s) for s in ratio.shape), indexing="ij")
    return pd.DataFrame(
        {
            "layer": layer.ravel(),
            "kv_head": kv.ravel(),
            "ratio": ratio.ravel(),
            "stderr": se.ravel(),
        }
    )


def _dormancy_table(
    stats: SinkStats, dormant: Any, groups: dict[str, Any], params: SinkParams
) -> pd.DataFrame:
    import pandas as pd

    frames = []
    for d, idx in groups.items():
        if d == "all":
            continue
        row, col = stats.row_entropy[idx].mean(0), stats.col_entropy[idx].mean(0)
        layer, head = np.meshgrid(*(np.arange(s) for s in row.shape), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "domain": d,
                    "layer": layer.ravel(),
                    "head": head.ravel(),
                    "row_entropy": row.ravel(),
                    "col_entropy": col.ravel(),
                    "dormant": ((row < params.row_entropy_max) & (col > params.col_entropy_min))
                    .ravel()
                    .astype(bool),
                    "dormant_share": dormant[idx].mean(0).ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)

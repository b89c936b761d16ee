"""Attention patterns of one layer for one prompt, for looking at (the app's attention pages).

For a prompt of ``T`` tokens, layer ``l`` and head ``h``, the pattern is the post-softmax
attention ``A[h, q, k] = softmax_k(q_h(q) . k_h(k) / sqrt(d_head) + mask)`` read at
``hook_pattern`` (``batch n_heads q_pos k_pos``); every row sums to 1 over ``k <= q``.

Beyond :data:`DENSE_LIMIT` tokens a dense ``T x T`` map is unreadable, so :func:`top_keys`
lists the ``k`` keys each query attends to most instead. :func:`attended_tokens` ranks key
positions by the head's attention mass on them, ``m[k] = sum_q A[q, k] / T`` (the share of all
of the head's attention that lands on key ``k``; the shares sum to 1).

Only :func:`attention_map` needs torch and a model; the rest works on numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from workbench.models.loading import LoadedModel

DENSE_LIMIT = 256
"""Above this many tokens the app shows top keys per query instead of a dense map."""


@dataclass(eq=False)
class AttentionMap:
    """All heads' patterns of one layer on one prompt.

    ``pattern``: ``Float[ndarray, "head q k"]``; ``tokens``: token ids (BOS included when the
    prompt got one); ``labels``: one unique display label per position (``"3 ␣Mary"``).
    """

    model: str
    layer: int
    tokens: list[int]
    labels: list[str]
    pattern: Float[np.ndarray, "head q k"]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_heads(self) -> int:
        return int(self.pattern.shape[0])

    def dense(self, limit: int = DENSE_LIMIT) -> bool:
        """True when a dense map stays readable (at most ``limit`` tokens)."""
        return self.n_tokens <= limit


def token_label(text: str) -> str:
    """A token's text made visible: leading spaces as ``␣``, newlines as ``⏎``, tabs as ``⇥``."""
    shown = text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")
    return shown or "∅"


def token_labels(pieces: list[str]) -> list[str]:
    """``"<position> <visible text>"`` per token: unique, so plot axes never merge two tokens."""
    return [f"{i} {token_label(p)}" for i, p in enumerate(pieces)]


def encode(model: LoadedModel, text: str, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` under the model's BOS policy (or ``prepend_bos`` when given)."""
    if not isinstance(text, str) or not text.strip():
        raise WorkbenchError("the prompt is empty", "type a prompt")
    ids = model.codec.encode(text)
    bos = model.codec.prepend_bos if prepend_bos is None else prepend_bos
    if bos:
        if model.codec.bos_token_id is None:
            raise WorkbenchError(f"model {model.name!r} has no BOS token", "turn BOS off")
        ids = [model.codec.bos_token_id, *ids]
    if len(ids) > model.codec.n_ctx:
        raise WorkbenchError(
            f"the prompt is {len(ids)} tokens, longer than the model's context "
            f"({model.codec.n_ctx})",
            "shorten the prompt",
        )
    return ids


def attention_map(
    model: LoadedModel, text: str, layer: int, *, prepend_bos: bool | None = None
) -> AttentionMap:
    """One forward pass; the pattern of every head of ``layer`` on ``text``."""
    import torch

    from workbench.hooks import hook_name, hooked

    if not 0 <= int(layer) < model.n_layers:
        raise WorkbenchError(
            f"layer {layer} does not exist", f"choose a layer from 0 to {model.n_layers - 1}"
        )
    ids = encode(model, text, prepend_bos)
    seen: dict[str, Any] = {}

    def keep(pattern: torch.Tensor, hook: Any) -> None:
        seen["pattern"] = pattern[0].detach().float().cpu().numpy()

    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.no_grad(), hooked(model.bridge, [(hook_name("pattern", int(layer)), keep)]):
        model.bridge(tokens, prepend_bos=False, return_type=None)
    pieces = [model.codec.decode([i]) for i in ids]
    return AttentionMap(model.name, int(layer), ids, token_labels(pieces), seen["pattern"])


def top_keys(pattern: Float[np.ndarray, "q k"], labels: list[str], k: int = 5) -> pd.DataFrame:
    """The ``k`` keys each query attends to most: ``query, query_token, rank, key, key_token,
    weight`` (rank 1 = largest; ties broken by the earlier key). Only ``key <= query`` appear."""
    import pandas as pd

    a = np.asarray(pattern, dtype=np.float64)
    t = a.shape[0]
    k = max(1, min(int(k), t))
    causal = np.tril(np.ones((t, t), dtype=bool))
    masked = np.where(causal, a, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]  # [q, k]
    q_idx = np.repeat(np.arange(t), k)
    key_idx = order.ravel()
    weights = masked[q_idx, key_idx]
    ok = np.isfinite(weights)
    ranks = np.tile(np.arange(1, k + 1), t)
    lab = np.asarray(labels, dtype=object)
    return pd.DataFrame(
        {
            "query": q_idx[ok],
            "query_token": lab[q_idx[ok]],
            "rank": ranks[ok],
            "key": key_idx[ok],
            "key_token": lab[key_idx[ok]],
            "weight": weights[ok],
        }
    )


def attended_tokens(
    pattern: Float[np.ndarray, "q k"], labels: list[str], k: int = 10
) -> pd.DataFrame:
    """Key positions ranked by attention mass ``m[k] = sum_q A[q, k] / T`` (module docstring):
    ``key, token, share, max_weight``."""
    import pandas as pd

    a = np.asarray(pattern, dtype=np.float64)
    share = a.sum(axis=0) / a.shape[0]
    order = np.argsort(-share, kind="stable")[: max(1, int(k))]
    return pd.DataFrame(
        {
            "key": order,
            "token": [labels[i] for i in order],
            "share": share[order],
            "max_weight": a.max(axis=0)[order],
        }
    )


def _heatmap(a: np.ndarray, labels: list[str], showscale: bool = True) -> go.Heatmap:
    import plotly.graph_objects as go

    causal = np.tril(np.ones_like(a, dtype=bool))
    return go.Heatmap(
        z=np.where(causal, a, np.nan),
        x=labels,
        y=labels,
        zmin=0.0,
        zmax=1.0,
        colorscale="Blues",
        showscale=showscale,
        hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
    )


def head_figure(amap: AttentionMap, head: int) -> go.Figure:
    """Token-labelled heatmap of one head (queries down, keys across)."""
    import plotly.graph_objects as go

    if not 0 <= head < amap.n_heads:
        raise WorkbenchError(
            f"head {head} does not exist", f"choose a head from 0 to {amap.n_heads - 1}"
        )
    side = min(900, 220 + 18 * amap.n_tokens)
    fig = go.Figure(_heatmap(amap.pattern[head], amap.labels))
    fig.update_layout(
        title=f"{amap.model} L{amap.layer}H{head}: attention pattern",
        xaxis={"title": "key", "tickangle": -60, "type": "category"},
        yaxis={"title": "query", "autorange": "reversed", "type": "category"},
        height=side,
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
    )
    return fig


def layer_figure(amap: AttentionMap, columns: int = 4) -> go.Figure:
    """Every head of the layer as small multiples (shared colour scale 0..1)."""
    from plotly.subplots import make_subplots

    n = amap.n_heads
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[f"H{h}" for h in range(n)],
        horizontal_spacing=0.03,
        vertical_spacing=0.06,
    )
    for h in range(n):
        fig.add_trace(
            _heatmap(amap.pattern[h], amap.labels, showscale=h == 0),
            row=h // cols + 1,
            col=h % cols + 1,
        )
    fig.update_xaxes(showticklabels=amap.n_tokens <= 24, type="category", tickangle=-60)
    fig.update_yaxes(showticklabels=amap.n_tokens <= 24, autorange="reversed", type="category")
    fig.update_layout(
        title=f"{amap.model} layer {amap.layer}: all {n} heads",
        height=260 * rows + 80,
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
    )
    return fig

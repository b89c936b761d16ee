"""MoA attention influence (Fu et al. 2024) of sink + window streaming, per head and KV head.

For a head's post-softmax pattern ``A`` (``[batch, head, q, k]``) and ``G = dL/dA``, removing
the entry ``(i, j)`` and renormalising the row (``A'_ij = 0``, ``A'_in = A_in / (1 - A_ij)`` for
``n != j``) changes the loss, to first order, by

``E_ij = sum_n G_in (A'_in - A_in) = -A_ij (G_ij - sum_n G_in A_in) / (1 - A_ij)``.

A streaming layout with sink ``s`` and window ``w`` keeps, for query ``q``, the keys ``k < s``
and ``q - w < k <= q`` and drops ``D_w(q) = {k : s <= k <= q - w}`` (only keys the query sees
at all, ``k <= q``). First-order effects add, so the influence of streaming head ``h`` on one
sequence is ``I_w(h) = sum_q sum_{k in D_w(q)} E_qk``; metric ``moa_w{w}`` is its mean (and
stderr) over sequences. A window ``w >= T`` (the sequence length) drops nothing: exactly 0.

The loss ``L`` of a sequence is the mean over all positions of the cross-entropy of the dense
model's logits against the dense model's own greedy predictions (their argmax), as MoA
calibrates on the dense model's outputs: the model's own objective, at its minimum-ish point.
The targets are the argmax of the same forward's (detached) logits, numerically the no-grad
forward's. One forward + one backward per batch over one graph: the input of block 0
(``blocks.0.hook_resid_pre``) is made a fresh leaf, so every layer's pattern keeps its
dependence on the earlier ones (a detached leaf per layer would give wrong derivatives); a
gradient hook on each layer's pattern reduces ``E`` to the per-head sums the moment that layer's
``G`` is known, so no ``T x T`` gradient or ``E`` map outlives its layer. Sequences of a batch are
independent, so the backward of ``sum_b L_b`` gives each its own ``G``.

Where a dropped entry holds the row's whole mass (``1 - A_ij < EPS``) the first-order estimate
is meaningless (the renormalisation divides by ~0); the denominator is clamped at ``EPS`` and
``info["saturated_entries"]`` counts such entries.

With grouped-query attention, table ``kv_heads`` (layer, kv_head, metric, max, mean, sum) pools
each KV head's query heads: ``sum`` is the first-order effect of streaming the whole KV head
(what a KV-cache plan does), ``max`` and ``mean`` as in ``kv_head_scores``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.analyses.moa_influence import MoAInfluenceParams
from workbench.circuits.kvplans import head_rows, pool_kv_heads
from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked, kv_group
from workbench.progress import steps
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, HeadMetric, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

EPS = 1e-6
"""Floor of the renormalisation ``1 - A_ij`` (module docstring)."""


def metric_name(window: int) -> str:
    return f"moa_w{window}"


def drop_mask(seq_len: int, sink: int, window: int, device: Any = None) -> Bool[Tensor, "q k"]:
    """``D_w``: ``mask[q, k]`` is True where the layout drops key ``k`` for query ``q``."""
    pos = torch.arange(seq_len, device=device)
    q, k = pos[:, None], pos[None, :]
    return (k >= sink) & (k <= q - window)


def influence(
    pattern: Float[Tensor, "*b q k"], grad: Float[Tensor, "*b q k"]
) -> Float[Tensor, "*b q k"]:
    """``E`` of every entry (module docstring), in float64."""
    a, g = pattern.double(), grad.double()
    row = (g * a).sum(-1, keepdim=True)
    return -a * (g - row) / (1.0 - a).clamp_min(EPS)


def greedy_loss(
    logits: Float[Tensor, "b pos vocab"], targets: Int[Tensor, "b pos"]
) -> Float[Tensor, " b"]:
    """Per sequence: the mean over positions of the cross-entropy against ``targets``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None])[..., 0].mean(-1)


def layout_influence(
    model: LoadedModel, tokens: Int[Tensor, "b pos"], sink: int, windows: tuple[int, ...]
) -> tuple[Float[Tensor, "w b layer head"], Float[Tensor, " b"], int]:
    """``I_w(h)`` for every window, sequence, layer and head; each sequence's dense loss ``L``;
    the number of dropped entries with ``1 - A < EPS`` (one forward, one backward)."""
    b, t = tokens.shape
    masks = [drop_mask(t, sink, w, tokens.device) for w in windows]
    out = torch.zeros(len(windows), b, model.n_layers, model.n_heads, dtype=torch.float64)
    saturated = [0]
    leaf: list[Tensor] = []
    seen: set[int] = set()

    def make_leaf(x: Tensor, hook: Any) -> Tensor:
        leaf.append(x.detach().requires_grad_(True))
        return leaf[0]

    def on_grad(layer: int, pattern: Tensor) -> Any:
        def fn(grad: Tensor) -> None:
            seen.add(layer)
            e = influence(pattern, grad)
            for i, mask in enumerate(masks):
                out[i, :, layer] = e[..., mask].sum(-1).cpu()
            if masks:
                widest = masks[int(np.argmin(windows))]
                saturated[0] += int((pattern.detach()[..., widest] > 1.0 - EPS).sum())
            del e

        return fn

    def watch(layer: int) -> Any:
        def hook(pattern: Tensor, hook: Any) -> Tensor:
            pattern.register_hook(on_grad(layer, pattern.detach()))
            return pattern

        return hook

    hooks = [(hook_name("resid_pre", 0), make_leaf)]
    hooks += [(hook_name("pattern", layer), watch(layer)) for layer in range(model.n_layers)]
    with torch.enable_grad(), hooked(model.bridge, hooks):
        logits = model.bridge(tokens, prepend_bos=False)
        loss = greedy_loss(logits, logits.detach().argmax(-1))
        torch.autograd.grad(loss.sum(), leaf)
    if len(seen) != model.n_layers:
        missing = sorted(set(range(model.n_layers)) - seen)
        raise WorkbenchError(
            f"moa_influence: no gradient reached the attention pattern of layers {missing}",
            "this model's hook_pattern does not feed its forward; MoA cannot score it",
        )
    return out, loss.detach().double().cpu(), saturated[0]


def moa_influence(
    model: LoadedModel, prompts: PromptSet, params: MoAInfluenceParams
) -> AnalysisOutput:
    """MoA influence of each window's layout per head (module docstring); mean and stderr over
    sequences, pooled per KV head."""
    params.validate()
    tokens, windows = prompts.clean, tuple(params.windows)
    n, t = prompts.n, prompts.seq_len
    per_seq = np.zeros((len(windows), n, model.n_layers, model.n_heads))
    losses = np.zeros(n)
    saturated = 0
    for start in steps(range(0, n, params.batch_size), desc="moa influence"):
        batch = tokens[start : start + params.batch_size]
        stop = start + batch.shape[0]
        inf, loss, sat = layout_influence(model, batch, params.sink, windows)
        per_seq[:, start:stop] = inf.numpy()
        losses[start:stop] = loss.numpy()
        saturated += sat

    metrics = {
        metric_name(w): HeadMetric(*mean_stderr(per_seq[i]), n) for i, w in enumerate(windows)
    }
    group = kv_group(model.n_heads, model.n_kv_heads)
    means = head_rows({k: m.mean for k, m in metrics.items()})
    pooled = pool_kv_heads(means, model.n_kv_heads, n_heads=model.n_heads)
    loss_mean, loss_se = mean_stderr(losses)
    return AnalysisOutput(
        head_metrics=metrics,
        tables={"kv_heads": pooled},
        info={
            "n_sequences": n,
            "seq_len": t,
            "sink": params.sink,
            "windows": list(windows),
            "loss": float(loss_mean),
            "loss_stderr": float(loss_se),
            "loss_target": "the dense model's own greedy predictions (argmax), all positions",
            "dropped_entries_per_head": {
                metric_name(w): int(drop_mask(t, params.sink, w).sum()) for w in windows
            },
            "saturated_entries": saturated,
            "query_heads_per_kv_head": group,
        },
    )

"""The slow, obvious reference of ``compute.py``: per sequence, the patterns and their gradients
by ``retain_grad`` and ``backward``, then ``E`` from its definition with explicit loops over
layers, heads, queries and keys (float64); and the true loss change of really dropping a
layout's entries, which ``E`` estimates to first order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench.hooks import hook_name, hooked

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet

EPS = 1e-6  # as compute.EPS


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return -logp[torch.arange(len(targets)), targets].mean()


def patterns_and_grads(model: LoadedModel, tokens: torch.Tensor) -> tuple[list, list, float]:
    """One sequence ``[1, T]``: every layer's pattern ``A`` and ``G = dL/dA`` as float64 numpy
    ``[head, q, k]``, and the dense loss ``L`` against the model's own argmax."""
    kept: dict[int, torch.Tensor] = {}

    def leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x.detach().requires_grad_(True)

    def keep(layer: int) -> Any:
        def fn(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            pattern.retain_grad()
            kept[layer] = pattern
            return pattern

        return fn

    hooks = [("hook_embed", leaf)] + [
        (hook_name("pattern", layer), keep(layer)) for layer in range(model.n_layers)
    ]
    with torch.enable_grad(), hooked(model.bridge, hooks):
        logits = model.bridge(tokens, prepend_bos=False)
        loss = _loss(logits, logits[0].detach().argmax(-1))
        loss.backward()
    pats, grads = [], []
    for layer in range(model.n_layers):
        pattern, grad = kept[layer], kept[layer].grad
        assert grad is not None
        pats.append(pattern[0].detach().double().cpu().numpy())
        grads.append(grad[0].double().cpu().numpy())
    return pats, grads, float(loss.detach())


def reference_influence(
    model: LoadedModel, prompts: PromptSet, sink: int, windows: tuple[int, ...]
) -> dict[int, np.ndarray]:
    """``{window: [n_layers, n_heads]}``: the mean over sequences of
    ``sum_q sum_{sink <= k <= q - window} E_qk``."""
    out = {w: np.zeros((prompts.n, model.n_layers, model.n_heads)) for w in windows}
    for s in range(prompts.n):
        pats, grads, _ = patterns_and_grads(model, prompts.clean[s : s + 1])
        t = prompts.seq_len
        for layer in range(model.n_layers):
            a, g = pats[layer], grads[layer]
            for h in range(model.n_heads):
                for i in range(t):
                    row = 0.0
                    for n in range(t):
                        row += g[h, i, n] * a[h, i, n]
                    for j in range(i + 1):
                        e = -a[h, i, j] * (g[h, i, j] - row) / max(1.0 - a[h, i, j], EPS)
                        for w in windows:
                            if sink <= j <= i - w:
                                out[w][s, layer, h] += e
    return {w: v.mean(axis=0) for w, v in out.items()}


def true_drop_change(
    model: LoadedModel, tokens: torch.Tensor, layer: int, head: int, sink: int, window: int
) -> float:
    """The true change of ``L`` (targets: the dense model's argmax) when one head really drops
    the layout's entries (zeroed at ``hook_pattern``, rows renormalised); one sequence."""
    with torch.no_grad():
        dense = model.bridge(tokens, prepend_bos=False)
    targets = dense[0].argmax(-1)
    t = tokens.shape[1]

    def drop(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
        p = pattern.clone()
        for i in range(t):
            for j in range(sink, i - window + 1):
                p[:, head, i, j] = 0.0
            p[:, head, i] = p[:, head, i] / p[:, head, i].sum(-1, keepdim=True)
        return p

    with torch.no_grad(), hooked(model.bridge, [(hook_name("pattern", layer), drop)]):
        dropped = model.bridge(tokens, prepend_bos=False)
    return float(_loss(dropped, targets) - _loss(dense, targets))

"""Edge attribution patching, EAP (Syed et al. 2023), and EAP-IG (Hanna et al. 2024).

EAP linearises the effect of corrupting one edge ``u -> v`` at the clean run::

    score(u -> v) = mean_prompts sum_pos (a_u_corrupt - a_u_clean) . dM/dx_v |_clean

``a_u`` is the sender's contribution to the residual stream (:mod:`workbench.edges.graph`) and
``x_v`` receiver ``v``'s own copy of the residual stream *before its norm*; the norm's Jacobian
is in the gradient. One clean forward + one backward (for every ``dM/dx_v``) and one corrupted
forward (for ``a_u_corrupt``) give every edge, batched over prompts.

Receiver gradients: the bridge's split Q/K/V inputs (:func:`~workbench.edges.common.split_inputs`)
give query head ``h`` a copy ``x_(l,h,q)`` of ``resid_pre[l]`` and KV head ``g`` copies
``x_(l,g,k)``, ``x_(l,g,v)`` (grouped-query attention: per KV head, as the model computes), each
normalised by ``ln1`` and projected by its own head only; ``hook_mlp_in`` is the MLP's copy of
``resid_mid[l]`` (``ln2``'s input) and ``blocks.{L-1}.hook_resid_post`` the logits' input. A zero
tensor ``delta`` added at each of these hooks is a leaf whose gradient is ``dM/dx_v``, exactly.

EAP-IG replaces the gradient by its mean over ``m`` points on the straight line between the
corrupted and the clean input embeddings (``blocks.0.hook_resid_pre``)::

    e(alpha) = e_clean + (1 - alpha) (e_corrupt - e_clean),   alpha_k = k / m,  k = 1 .. m
    score(u -> v) = mean_prompts sum_pos (a_u_corrupt - a_u_clean) . g_v
    g_v = (1/m) sum_k dM/dx_v |_e(alpha_k)

(the right Riemann sum of the path integral from corrupt to clean; ``alpha = 1`` is the clean
run, so ``m = 1`` is EAP). The activation differences are those of the actual runs.

Sign convention vs TransformerLens 4.3 ``attribution_patch(..., EdgeAttributionConfig(
granularity="edge"))``: TL takes the gradient on the *corrupted* run times ``a_clean -
a_corrupt`` (denoising) per position. Our score is TL's with the roles of ``clean`` and
``corrupt`` swapped (``attribution_patch(model, corrupt, clean, ...)``), summed over positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.edges.common import (
    EdgeScores,
    check_metric,
    check_prompts,
    gather_edges,
    metric_values,
    readable_senders,
    receiver_hooks,
    sender_contributions,
    sender_points,
    split_inputs,
    stack_senders,
)
from workbench.edges.graph import edge_graph
from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet


def receiver_gradients(
    model: LoadedModel,
    tokens: Int[Tensor, "batch pos"],
    correct: Int[Tensor, " batch"],
    incorrect: Int[Tensor, " batch"],
    metric: str = "logit_diff",
    embed: Float[Tensor, "batch pos d_model"] | None = None,
    capture: bool = False,
) -> tuple[list[Float[Tensor, "batch k pos d_model"]], Float[Tensor, " batch"], dict[Any, Tensor]]:
    """``dM_i/dx_v`` of prompt ``i`` for every receiver ``v``, from one forward + one backward
    of ``sum_i M_i`` (prompts are independent, so row ``i`` is prompt ``i``'s own gradient),
    one tensor per receiver hook in graph receiver order (``k`` = its receivers: the query
    heads, the KV heads, or 1 for an MLP and the logits). With ``embed`` the run's input
    embedding ``resid_pre[0]`` is replaced by it. Also returns ``M`` per prompt and, with
    ``capture``, the activations :func:`~workbench.edges.common.stack_senders` reads."""
    bridge = model.bridge
    receivers = receiver_hooks(model.n_layers)
    leaves: dict[str, Tensor] = {}
    acts: dict[Any, Tensor] = {}

    def leaf(name: str) -> Any:
        def fn(act: Tensor, hook: Any) -> Tensor:
            d = torch.zeros_like(act, requires_grad=True)
            leaves[name] = d
            return act + d

        return fn

    def grab(point: tuple[str, int]) -> Any:
        def fn(act: Tensor, hook: Any) -> None:
            acts[point] = act.detach().clone()

        return fn

    hooks: list[tuple[str, Any]] = []
    if embed is not None:
        hooks.append((hook_name("resid_pre", 0), lambda act, hook: embed.to(act.dtype)))
    if capture:
        hooks += [(hook_name(k, la), grab((k, la))) for k, la in sender_points(model.n_layers)]
    hooks += [(name, leaf(name)) for name, _, _ in receivers]
    with torch.enable_grad(), split_inputs(bridge), hooked(bridge, hooks):
        logits = bridge(tokens, prepend_bos=False, logits_to_keep=1)[:, -1]
        values = metric_values(metric, logits, correct, incorrect)
        inputs = [leaves[name] for name, _, _ in receivers]
        grads = torch.autograd.grad(values.sum(), inputs, allow_unused=True)
    out = []
    for (_, kind, _), g, x in zip(receivers, grads, inputs, strict=True):
        g = torch.zeros_like(x) if g is None else g.detach()
        out.append(g.float().permute(0, 2, 1, 3) if kind in ("q", "k", "v") else g.float()[:, None])
    return out, values.detach().float(), acts


def _accumulate(
    matrix: Float[Tensor, "batch senders receivers"],
    delta: Float[Tensor, "batch senders flat"],
    grads: list[Tensor],
    readable: list[int],
    weight: float,
) -> None:
    """``matrix[:, u, v] += weight * delta[:, u] . grad_v`` for every receiver ``v`` and the
    senders it reads (``readable[v]`` first senders; the rest are no edges)."""
    j = 0
    for g in grads:
        k = int(g.shape[1])
        n = readable[j]
        term = torch.bmm(delta[:, :n], g.flatten(2).transpose(1, 2))
        matrix[:, :n, j : j + k] += weight * term
        j += k


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise WorkbenchError(
            f"eap_ig: steps must be an integer >= 1, got {steps!r}", "use steps = 5 (the default)"
        )


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise WorkbenchError(f"edges: batch_size must be >= 1, got {batch_size}", "use 16")


def edge_attribution(
    model: LoadedModel,
    prompts: PromptSet,
    *,
    steps: int = 1,
    metric: str = "logit_diff",
    batch_size: int = 16,
) -> EdgeScores:
    """EAP (``steps = 1``) or EAP-IG with ``steps = m`` points (module docstring) of every edge.

    Per batch of prompts: one corrupted forward (no grad), then ``m`` forward + backward passes
    at ``alpha = 1, (m-1)/m, .., 1/m`` (``alpha = 1`` first: the clean run, which also gives
    ``a_clean``); the per-prompt ``[senders, receivers]`` score matrix is
    ``bmm(a_corrupt - a_clean, mean_k G_k^T)`` over flattened ``(pos, d_model)``, and the edges
    are read from it. ``info``: the clean and corrupted mean metric and the alphas."""
    check_metric(metric)
    check_prompts(prompts)
    _check_steps(steps)
    _check_batch(batch_size)
    graph = edge_graph(model)
    readable = readable_senders(graph)
    alphas = [k / steps for k in range(steps, 0, -1)]
    per_prompt = []
    clean_m, corrupt_m = [], []
    for start in range(0, prompts.n, batch_size):
        sl = slice(start, start + batch_size)
        clean, corrupt = prompts.clean[sl], prompts.corrupt[sl]
        correct, incorrect = prompts.correct[sl], prompts.incorrect[sl]
        a_corrupt, corrupt_logits = sender_contributions(model, corrupt)
        corrupt_m.append(metric_values(metric, corrupt_logits, correct, incorrect))
        n = int(clean.shape[0])
        matrix = torch.zeros(n, len(graph.senders), len(graph.receivers), device=clean.device)
        delta = e_clean = e_corrupt = None
        for alpha in alphas:
            embed = None
            if alpha != 1.0:
                assert e_clean is not None and e_corrupt is not None
                embed = e_clean + (1.0 - alpha) * (e_corrupt - e_clean)
            grads, values, acts = receiver_gradients(
                model, clean, correct, incorrect, metric, embed=embed, capture=embed is None
            )
            if delta is None:  # alpha = 1: the clean run
                a_clean = stack_senders(model, acts)
                delta = (a_corrupt - a_clean).flatten(2)
                e_clean, e_corrupt = a_clean[:, 0], a_corrupt[:, 0]
                clean_m.append(values)
                del a_clean, acts
            _accumulate(matrix, delta, grads, readable, 1.0 / steps)
            del grads
        per_prompt.append(gather_edges(graph, matrix, range(len(graph))))
    return EdgeScores(
        graph=graph,
        edges=np.arange(len(graph)),
        per_prompt=np.concatenate(per_prompt),
        method="eap" if steps == 1 else "eap-ig",
        metric=metric,
        info={
            "steps": steps,
            "alphas": sorted(alphas),
            "clean_metric": float(torch.cat(clean_m).mean()),
            "corrupt_metric": float(torch.cat(corrupt_m).mean()),
            "n_prompts": prompts.n,
            "n_edges": len(graph),
        },
    )


def eap_scores(
    model: LoadedModel, prompts: PromptSet, *, metric: str = "logit_diff", batch_size: int = 16
) -> EdgeScores:
    """EAP of every edge: :func:`edge_attribution` with one step (the clean-run gradient)."""
    return edge_attribution(model, prompts, steps=1, metric=metric, batch_size=batch_size)


def eap_ig_scores(
    model: LoadedModel,
    prompts: PromptSet,
    *,
    steps: int = 5,
    metric: str = "logit_diff",
    batch_size: int = 16,
) -> EdgeScores:
    """EAP-IG of every edge with ``steps`` interpolation points (``alpha_k = k / steps``)."""
    _check_steps(steps)
    return edge_attribution(model, prompts, steps=steps, metric=metric, batch_size=batch_size)

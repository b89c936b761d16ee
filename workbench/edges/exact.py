"""Exact edge patching: the oracle the edge estimates are checked against.

For an edge ``u -> v`` and every prompt, the clean run with *only* receiver ``v``'s input
changed by ``u``'s corrupted contribution, everything else clean::

    x_v  ->  x_v + (a_u_corrupt - a_u_clean)          (v's own copy of the residual stream)
    effect(u -> v) = mean_prompts [ M(that run) - M(clean run) ]

(the sign convention of :mod:`workbench.edges.common`: for a model linear in ``x_v``, EAP's
estimate equals it). ``a_u`` is the sender's contribution (:mod:`workbench.edges.graph`; on
Gemma 3 with each run's own post-attention norm scale frozen).

One forward per edge, resumed at the receiver's layer from the clean run
(:class:`~workbench.forward.resume.ResumableRun`): blocks below the receiver
are unchanged, so the run starts from the clean ``resid_pre[l]``; edges of many layers share a
batch (``run_wave``); the hook of receiver ``v`` (``attn.hook_q_input`` / ``hook_k_input`` /
``hook_v_input`` at head ``h`` under :func:`~workbench.edges.common.split_inputs`, or
``hook_mlp_in``) adds the difference to the rows of its own edge only. Only positions from the
first clean/corrupted difference on are recomputed where the model's cache allows (the
difference is zero before it). Edges into the logits need no block: ``M(unembed(ln_final(
resid_final + delta)))`` at the final position. The clean baseline is computed the same way
(the cached final residual, unembedded), under the same input forks. fp32 linear layers run
through oneDNN where that is faster (:mod:`workbench.models.backend`; fp32 rounding only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from workbench.edges.common import (
    EdgeScores,
    check_metric,
    check_prompts,
    metric_values,
    sender_contributions,
    sender_points,
    split_inputs,
    stack_senders,
)
from workbench.edges.graph import EdgeGraph, GraphEdge, edge_graph, resolve
from workbench.errors import WorkbenchError
from workbench.forward.components import first_diff_position
from workbench.forward.resume import ResumableRun
from workbench.hooks import hook_name, hooked
from workbench.models.backend import fast_linears
from workbench.progress import steps

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet

Patch = tuple[int, int, Tensor]  # (variant within the layer's entering rows, head or -1, delta)


def _receiver_hook(edge: GraphEdge) -> str:
    r = edge.receiver
    return hook_name("mlp_in" if r.kind == "mlp" else f"{r.kind}_input", r.layer)


def _adder(patches: Sequence[Patch], entering: int, n: int) -> Callable[..., Tensor]:
    """Hook: to the rows of variant ``j`` among the ``entering`` variants that joined the batch
    at this layer (the batch's last ``entering * n`` rows), add ``delta`` (at ``head`` for the
    per-head input forks ``[rows, pos, heads, d]``); every other row passes unchanged."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        first = int(act.shape[0]) - entering * n
        for j, head, delta in patches:
            rows = slice(first + j * n, first + (j + 1) * n)
            if head < 0:
                out[rows] += delta.to(out.dtype)
            else:
                out[rows, :, head] += delta.to(out.dtype)
        return out

    return hook


def _wave_size(n: int, positions: int, batch_tokens: int) -> int:
    return max(1, batch_tokens // max(1, n * positions))


def exact_edge_patching(
    model: LoadedModel,
    prompts: PromptSet,
    edges: Iterable[str | GraphEdge] | None = None,
    *,
    metric: str = "logit_diff",
    batch_tokens: int = 4096,
) -> EdgeScores:
    """The effect of patching each of ``edges`` (names or :class:`GraphEdge`; all edges for
    None) alone, per prompt (module docstring). Waves hold at most ``batch_tokens`` recomputed
    tokens (rows x positions). ``info``: the clean and corrupted mean metric, the forwards run
    (in units of full forwards of the prompts) and the first recomputed position."""
    check_metric(metric)
    check_prompts(prompts)
    if batch_tokens < 1:
        raise WorkbenchError(f"edges: batch_tokens must be >= 1, got {batch_tokens}", "use 4096")
    graph = edge_graph(model)
    positions = resolve(graph, edges)
    n, seq_len, n_layers = prompts.n, prompts.seq_len, model.n_layers
    correct, incorrect = prompts.correct, prompts.incorrect
    with split_inputs(model.bridge), fast_linears(model.bridge):
        base = ResumableRun(model, prompts.clean, kinds=("z", "mlp_out", "resid_post"))
        points = sender_points(n_layers)
        a_clean = stack_senders(model, {(k, la): base.act(k, la) for k, la in points})
        a_corrupt, corrupt_logits = sender_contributions(model, prompts.corrupt)
        delta = a_corrupt - a_clean  # [n, senders, pos, d]
        del a_clean, a_corrupt
        final = base.act("resid_post", n_layers - 1)
        with torch.inference_mode():
            clean_logits = base.unembed_last(final)
        clean_m = metric_values(metric, clean_logits, correct, incorrect)
        out = np.zeros((n, len(positions)))
        direct = [k for k, p in enumerate(positions) if graph.edges[p].receiver.kind == "logits"]
        rest = [k for k, p in enumerate(positions) if graph.edges[p].receiver.kind != "logits"]
        chunk = _wave_size(n, 1, batch_tokens)
        for i in range(0, len(direct), chunk):
            ks = direct[i : i + chunk]
            d = torch.stack([delta[:, graph.sender_index[positions[k]], -1:] for k in ks])
            rows = (final[None, :, -1:] + d.to(final.dtype)).flatten(0, 1)
            with torch.inference_mode():
                logits = base.unembed_last(rows)
            values = metric_values(
                metric, logits, correct.repeat(len(ks)), incorrect.repeat(len(ks))
            )
            out[:, ks] = (values.reshape(len(ks), n) - clean_m).T.double().cpu().numpy()
        start = first_diff_position(prompts.clean, prompts.corrupt)
        cost, start = _resumed(graph, base, delta, positions, rest, out, clean_m, metric,
                               (correct, incorrect), start, batch_tokens)  # fmt: skip
    return EdgeScores(
        graph=graph,
        edges=np.asarray(positions, dtype=np.int64),
        per_prompt=out,
        method="exact",
        metric=metric,
        info={
            "clean_metric": float(clean_m.mean()),
            "corrupt_metric": float(
                metric_values(metric, corrupt_logits, correct, incorrect).mean()
            ),
            "forwards": cost,
            "first_recomputed_position": start,
            "n_prompts": n,
            "n_edges": len(positions),
            "seq_len": seq_len,
        },
    )


def _resumed(
    graph: EdgeGraph,
    base: ResumableRun,
    delta: Float[Tensor, "batch senders pos d_model"],
    positions: Sequence[int],
    chosen: Sequence[int],
    out: np.ndarray,
    clean_m: Tensor,
    metric: str,
    answers: tuple[Tensor, Tensor],
    start: int,
    batch_tokens: int,
) -> tuple[float, int]:
    """Fill ``out[:, k]`` for the edges ``chosen`` (indices into ``positions``) whose receiver
    sits in a block: waves of edges sorted by receiver layer, each edge entering the batch at
    its receiver's layer with the clean ``resid_pre`` there. Returns the cost in full forwards
    and the first recomputed position."""
    model = base.model
    n, seq_len, n_layers = base.n, base.seq_len, model.n_layers
    prefix = base.prefix_kv(start) if 0 < start < seq_len else None
    if prefix is None:
        start = 0
    order = sorted(chosen, key=lambda k: graph.edges[positions[k]].receiver.layer)
    per_wave = _wave_size(n, seq_len - start, batch_tokens)
    correct, incorrect = answers
    cost = 0.0
    batches = [order[i : i + per_wave] for i in range(0, len(order), per_wave)]
    for wave in steps(batches, desc="exact edge patching"):
        by_layer: dict[int, list[int]] = {}
        for k in wave:
            by_layer.setdefault(graph.edges[positions[k]].receiver.layer, []).append(k)
        entries: dict[int, Tensor] = {}
        hooks: list[tuple[str, Callable[..., Any]]] = []
        for layer, ks in by_layer.items():
            resid = base.resid(layer)[:, start:]
            entries[layer] = resid.repeat(len(ks), 1, 1)
            per_hook: dict[str, list[Patch]] = {}
            for j, k in enumerate(ks):
                edge = graph.edges[positions[k]]
                d = delta[:, graph.sender_index[positions[k]], start:]
                head = edge.receiver.head if edge.receiver.kind != "mlp" else -1
                per_hook.setdefault(_receiver_hook(edge), []).append((j, head, d))
            hooks += [(name, _adder(p, len(ks), n)) for name, p in per_hook.items()]
        with hooked(model.bridge, hooks):
            logits = base.run_wave(
                entries, start=start, prefix=prefix, last_query_only=n_layers - 1 not in entries
            )
        ordered = [k for layer in sorted(by_layer) for k in by_layer[layer]]
        reps = len(ordered)
        values = metric_values(metric, logits, correct.repeat(reps), incorrect.repeat(reps))
        out[:, ordered] = (values.reshape(reps, n) - clean_m).T.double().cpu().numpy()
        cost += sum((n_layers - la) / n_layers for la in by_layer for _ in by_layer[la]) * (
            (seq_len - start) / seq_len
        )
    return cost, start

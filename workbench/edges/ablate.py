"""Running the model with chosen edges ablated: the forward every edge-circuit number comes from.

Each receiver ``v`` reads its own copy of the residual stream (:func:`~workbench.edges.common.
split_inputs`), the sum of what its senders wrote. With the edges ``A`` ablated, every receiver
input of the run becomes::

    x_v  ->  x_v + sum_{u: (u -> v) in A} (a_u_ablated - a_u_run)

``a_u_run`` is sender ``u``'s contribution in *this* run (computed from its own, possibly
ablated, inputs: effects propagate along the edges that stay), and ``a_u_ablated`` the value the
ablation gives it:

- ``corrupted`` (resample / interchange): ``u``'s contribution on the paired corrupted prompt;
- ``mean_clean`` / ``mean_corrupt``: its mean over the clean / corrupted prompts, per position
  (MIB's ``mean-positional``; prompts of a set have equal token length);
- ``zero``: 0.

Ablating no edge is the clean run; ablating every edge with ``corrupted`` is the corrupted run
(the embedding is a sender, so the inputs themselves are swapped: test). Sender contributions
follow :mod:`workbench.edges.graph` (Gemma 3's post-attention norm with each run's own scale
frozen). One edge ablated with ``corrupted`` is exact edge patching of that edge
(:mod:`workbench.edges.exact`; test). Only the final position is unembedded.

Per run and prompt the outputs are the metric ``M`` (``logit_diff`` etc.) and
``KL(p_clean || p_run)`` at the final position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from workbench.edges.common import (
    check_metric,
    check_prompts,
    head_contributions,
    metric_values,
    readable_senders,
    receiver_hooks,
    sender_contributions,
    split_inputs,
)
from workbench.edges.graph import EdgeGraph, edge_graph
from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked
from workbench.metrics import kl_from_clean
from workbench.progress import steps

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet

ABLATIONS = ("corrupted", "mean_clean", "mean_corrupt", "zero")


def check_ablation(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise WorkbenchError(
            f"edges: unknown ablation {ablation!r}", f"choose from {', '.join(ABLATIONS)}"
        )


class EdgeAblator:
    """Runs ``prompts``' clean inputs with sets of edges ablated (module docstring).

    Built once per (model, prompts, metric): the clean and corrupted sender contributions and the
    clean final logits; :meth:`run` then takes ``[n_masks, n_edges]`` boolean masks (True:
    ablated) and an ablation, and returns ``M`` and KL per mask and prompt."""

    def __init__(
        self,
        model: LoadedModel,
        prompts: PromptSet,
        *,
        metric: str = "logit_diff",
        batch_tokens: int = 1024,
    ) -> None:
        check_metric(metric)
        check_prompts(prompts)
        if batch_tokens < 1:
            raise WorkbenchError(f"edges: batch_tokens must be >= 1, got {batch_tokens}", "1024")
        self.model, self.prompts, self.metric = model, prompts, metric
        self.graph: EdgeGraph = edge_graph(model)
        self.batch_tokens = batch_tokens
        self.readable = readable_senders(self.graph)
        self.a_clean, self.clean_logits = sender_contributions(model, prompts.clean)
        self.a_corrupt, self.corrupt_logits = sender_contributions(model, prompts.corrupt)
        self.clean_metric = self._metric(self.clean_logits)
        self.corrupt_metric = self._metric(self.corrupt_logits)

    def _metric(self, logits: Tensor, reps: int = 1) -> Tensor:
        p = self.prompts
        return metric_values(self.metric, logits, p.correct.repeat(reps), p.incorrect.repeat(reps))

    def ablated_values(self, ablation: str) -> Float[Tensor, "rows senders pos d_model"]:
        """``a_u_ablated`` per sender: ``[n_prompts or 1, senders, pos, d_model]``."""
        check_ablation(ablation)
        if ablation == "corrupted":
            return self.a_corrupt
        if ablation == "mean_clean":
            return self.a_clean.mean(0, keepdim=True)
        if ablation == "mean_corrupt":
            return self.a_corrupt.mean(0, keepdim=True)
        return torch.zeros_like(self.a_clean[:1])

    def dense(self, mask: np.ndarray) -> Tensor:
        """``[senders, receivers]`` 0/1: 1 where the edge between them is ablated."""
        g = self.graph
        if mask.shape != (len(g),):
            raise WorkbenchError(
                f"edges: an ablation mask of shape {mask.shape} for a graph of {len(g)} edges",
                "give one boolean per edge of the model's graph",
            )
        out = torch.zeros(len(g.senders), len(g.receivers))
        idx = np.nonzero(mask)[0]
        out[g.sender_index[idx], g.receiver_index[idx]] = 1.0
        return out

    def run(
        self, masks: np.ndarray, ablation: str, *, desc: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(M, KL)``, each ``[n_masks, n_prompts]``, of the runs with ``masks[i]`` ablated."""
        masks = np.atleast_2d(np.asarray(masks, dtype=bool))
        abl = self.ablated_values(ablation)
        n, seq = self.prompts.n, self.prompts.seq_len
        per = max(1, self.batch_tokens // max(1, n * seq))
        values = np.zeros((len(masks), n))
        kls = np.zeros((len(masks), n))
        chunks = [range(i, min(i + per, len(masks))) for i in range(0, len(masks), per)]
        for chunk in steps(chunks, desc=desc) if desc else chunks:
            dense = torch.stack([self.dense(masks[i]) for i in chunk])
            logits = self._forward(dense, abl)
            m = self._metric(logits, len(chunk)).reshape(len(chunk), n)
            kl = kl_from_clean(logits, self.clean_logits.repeat(len(chunk), 1))
            values[list(chunk)] = m.double().cpu().numpy()
            kls[list(chunk)] = kl.reshape(len(chunk), n).double().cpu().numpy()
        return values, kls

    def _plan(
        self, dense: Float[Tensor, "senders receivers"], first: int, count: int
    ) -> tuple[Tensor, Tensor | None, Tensor] | None:
        """How one mask corrects the ``count`` receivers of one hook (from receiver ``first``):
        ``(use_prefix [count], rows, weights [rows, count])`` with
        ``correction_r = use_prefix_r * prefix + sum_rows weights[row, r] d_row``, where
        ``prefix`` is the sum of every readable sender's ``d_u = a_u_ablated - a_u_run``.
        Per receiver the shorter list: its ablated senders (weight 1), or, when most are
        ablated, the prefix minus its kept senders (weight -1). ``rows`` are the senders with a
        weight when they are few (gathered), None for all readable senders (one matrix
        product over a view). None: nothing ablated."""
        s = self.readable[first]
        m = dense[:s, first : first + count]  # [s, count] 1 = ablated
        ablated = m.sum(0)
        if not bool(ablated.any()):
            return None
        use_prefix = (ablated > s / 2).to(m.dtype)
        weights = torch.where(use_prefix.bool()[None], m - 1.0, m)  # kept: -1 under the prefix
        active = torch.nonzero(weights.abs().sum(1)).flatten()
        if len(active) * 4 <= s:
            return use_prefix, active, weights[active]
        return use_prefix, None, weights

    def _forward(
        self, dense: Float[Tensor, "masks senders receivers"], abl: Tensor
    ) -> Float[Tensor, "rows vocab"]:
        """One forward of ``n_masks x n_prompts`` rows (mask-major), each mask's ablated edges
        replaced (module docstring); the final-position logits.

        ``d_u = a_u_ablated - a_u_run`` is stored per sender as the senders run, with a running
        sum over senders (``prefix``); each receiver's correction is that prefix and/or a sum
        over a few senders (:meth:`_plan`), so small circuits and small ablated sets both cost
        little."""
        model, g = self.model, self.graph
        c, n = int(dense.shape[0]), self.prompts.n
        n_heads = model.n_heads
        tokens = self.prompts.clean.repeat(c, 1)
        abl = abl.float().to(tokens.device)
        n_senders, seq, d_model = self.a_clean.shape[1:]
        # d_u per sender, sender-major so a block of senders is one [senders, rows] matrix
        diff = torch.zeros((c, n_senders, n, seq, d_model), device=tokens.device)
        prefix = torch.zeros((c, n, seq, d_model), device=tokens.device)

        def store(first: int, count: int) -> Callable[[Tensor], None]:
            def put(contrib: Tensor) -> None:  # [c*n, count, pos, d]
                run = contrib.float().reshape(c, n, count, seq, d_model)
                d = abl[None, :, first : first + count] - run
                diff[:, first : first + count] = d.transpose(1, 2)
                prefix.add_(d.sum(2))

            return put

        def on_embed(act: Tensor, hook: Any) -> None:
            store(0, 1)(act[:, None])

        def on_z(layer: int) -> Callable[..., None]:
            put = store(1 + layer * (n_heads + 1), n_heads)

            def fn(act: Tensor, hook: Any) -> None:
                put(head_contributions(model, layer, act))

            return fn

        def on_mlp(layer: int) -> Callable[..., None]:
            put = store(1 + layer * (n_heads + 1) + n_heads, 1)

            def fn(act: Tensor, hook: Any) -> None:
                put(act[:, None])

            return fn

        def on_receiver(first: int, count: int, kind: str) -> Callable[..., Tensor] | None:
            plans = [self._plan(dense[i], first, count) for i in range(c)]
            if all(p is None for p in plans):
                return None

            def fn(act: Tensor, hook: Any) -> Tensor:
                corr = torch.zeros((c, n, seq, count, d_model), device=act.device)
                for i, plan in enumerate(plans):
                    if plan is None:
                        continue
                    use_prefix, rows, weights = plan
                    corr[i] = prefix[i][:, :, None] * use_prefix[:, None].to(act.device)
                    block = diff[i, : weights.shape[0]] if rows is None else diff[i, rows]
                    if block.shape[0]:
                        summed = weights.to(act.device).T @ block.reshape(block.shape[0], -1)
                        corr[i] += summed.reshape(count, n, seq, d_model).permute(1, 2, 0, 3)
                out = corr.flatten(0, 1)
                if kind in ("q", "k", "v"):
                    return act + out.to(act.dtype)
                return act + out[:, :, 0].to(act.dtype)

            return fn

        hooks: list[tuple[str, Callable[..., Any]]] = [(hook_name("resid_pre", 0), on_embed)]
        for layer in range(model.n_layers):
            hooks += [(hook_name("z", layer), on_z(layer))]
            hooks += [(hook_name("mlp_out", layer), on_mlp(layer))]
        first = 0
        for name, kind, _ in receiver_hooks(model.n_layers):
            count = _count(g, kind)
            fn = on_receiver(first, count, kind)
            if fn is not None:
                hooks.append((name, fn))
            first += count
        with torch.no_grad(), split_inputs(model.bridge), hooked(model.bridge, hooks):
            logits = model.bridge(tokens, prepend_bos=False, logits_to_keep=1)[:, -1]
        return logits.float()


def _count(graph: EdgeGraph, kind: str) -> int:
    if kind == "q":
        return graph.n_heads
    if kind in ("k", "v"):
        return graph.n_kv_heads
    return 1

"""What every edge method shares: the senders' contributions, the per-receiver input forks, the
metric, and the scores' container.

Sign convention, one meaning for every method: ``score(u -> v)`` estimates (EAP, EAP-IG) or
measures (exact patching) the change of the metric ``M`` when edge ``u -> v`` alone carries the
corrupted value, i.e. ``M(clean run, v's input += a_u_corrupt - a_u_clean) - M(clean run)``,
mean over prompts; ``|score|`` ranks. ``M`` is read at the final position, per prompt
(``logit_diff``: ``logit[correct] - logit[incorrect]``, the default; ``prob``; ``loss``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench import metrics as M
from workbench.edges.graph import EdgeGraph, GraphEdge
from workbench.errors import WorkbenchError
from workbench.forward.unembed import Norm, original
from workbench.hooks import hook_name, hooked, model_lock

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet

EDGE_METRICS = ("logit_diff", "prob", "loss")


def check_metric(metric: str) -> None:
    if metric not in EDGE_METRICS:
        raise WorkbenchError(
            f"edges: unknown metric {metric!r}", f"choose from {', '.join(EDGE_METRICS)}"
        )


def check_prompts(prompts: PromptSet) -> None:
    if prompts.clean.ndim != 2 or prompts.clean.shape != prompts.corrupt.shape:
        raise WorkbenchError(
            f"edges: clean {tuple(prompts.clean.shape)} and corrupted "
            f"{tuple(prompts.corrupt.shape)} token shapes differ",
            "give [batch, pos] prompt pairs of equal token length",
        )
    if prompts.n < 1:
        raise WorkbenchError("edges: no prompts", "give at least one prompt pair")


def metric_values(
    metric: str,
    logits: Float[Tensor, "batch vocab"],
    correct: Int[Tensor, " batch"],
    incorrect: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """``M`` per prompt from the final-position logits (module docstring)."""
    return M.per_prompt(metric, logits, correct, incorrect)


@contextlib.contextmanager
def split_inputs(bridge: Any) -> Iterator[None]:
    """Each receiver reads its own copy of the residual stream, while the block runs.

    Turns on the bridge's ``use_split_qkv_input`` (``attn.hook_q_input`` ``[b, p, n_heads, d]``
    and ``hook_k_input`` / ``hook_v_input`` ``[b, p, n_kv_heads, d]``: the pre-``ln1`` residual
    repeated per head, each copy normalised and projected by its own head's weights only) and
    ``use_hook_mlp_in`` (``hook_mlp_in``: ``ln2``'s input, which feeds the MLP only), holding the
    model's lock; the caller's flags are restored on exit, even on error. The forward is the
    same computation (to float rounding)."""
    with model_lock(bridge):
        cfg = bridge.cfg
        split, mlp_in = bool(cfg.use_split_qkv_input), bool(cfg.use_hook_mlp_in)
        attn_in = bool(getattr(cfg, "use_attn_in", False))
        try:
            if attn_in:
                bridge.set_use_attn_in(False)
            try:
                bridge.set_use_split_qkv_input(True)
            except (NotImplementedError, ValueError) as exc:
                raise WorkbenchError(
                    f"edges: this model has no per-head Q/K/V inputs ({str(exc)[:120]})",
                    "use a Llama-, GPT-2- or Gemma-3-style model",
                ) from None
            bridge.set_use_hook_mlp_in(True)
            yield
        finally:
            bridge.set_use_split_qkv_input(split)
            bridge.set_use_hook_mlp_in(mlp_in)
            if attn_in:
                bridge.set_use_attn_in(True)


def receiver_hooks(n_layers: int) -> list[tuple[str, str, int]]:
    """``(hook, kind, layer)`` of every receiver input hook, in graph receiver order (per layer
    q, k, v, mlp; then the logits' final residual)."""
    out = []
    for layer in range(n_layers):
        for kind in ("q", "k", "v"):
            out.append((hook_name(f"{kind}_input", layer), kind, layer))
        out.append((hook_name("mlp_in", layer), "mlp", layer))
    out.append((hook_name("resid_post", n_layers - 1), "logits", n_layers - 1))
    return out


def sender_points(n_layers: int) -> list[tuple[str, int]]:
    """The ``(kind, layer)`` activations :func:`stack_senders` reads."""
    return [("resid_pre", 0), *((k, la) for la in range(n_layers) for k in ("z", "mlp_out"))]


def head_contributions(
    model: LoadedModel, layer: int, z: Float[Tensor, "batch pos n_heads d_head"]
) -> Float[Tensor, "batch n_heads pos d_model"]:
    """Each head's contribution ``z_h @ W_O[h]`` of ``layer``, through Gemma 3's post-attention
    norm with the run's own scale frozen: ``(z_h @ W_O[h]) * s * (1 + w)``,
    ``s = 1 / sqrt(mean((sum_h z_h @ W_O[h] + b_O)^2) + eps)`` per prompt and position."""
    block = model.bridge.blocks[layer]
    w_o = block.attn.W_O.detach().float()
    heads = torch.einsum("bphd,hdm->bhpm", z.float(), w_o)
    post = getattr(block, "ln1_post", None)
    if post is not None:
        norm = Norm.of(original(post))
        b_o = getattr(block.attn, "b_O", None)
        total = heads.sum(1) + (b_o.detach().float() if b_o is not None else 0.0)
        heads = norm.frozen(heads, norm.scale(total)[:, None])
    return heads


def stack_senders(
    model: LoadedModel, acts: dict[tuple[str, int], Tensor]
) -> Float[Tensor, "batch senders pos d_model"]:
    """Every sender's contribution ``a_u`` (graph sender order) from one run's activations:
    ``embed = resid_pre[0]``; the heads of each layer (:func:`head_contributions`); MLP ``l``:
    ``hook_mlp_out``."""
    parts = [acts[("resid_pre", 0)].float()[:, None]]
    for layer in range(model.n_layers):
        heads = head_contributions(model, layer, acts[("z", layer)])
        parts += [heads, acts[("mlp_out", layer)].float()[:, None]]
    return torch.cat(parts, dim=1)


def sender_contributions(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch senders pos d_model"], Float[Tensor, "batch vocab"]]:
    """One no-grad forward: every sender's contribution (:func:`stack_senders`) and the
    final-position logits (only the final position is unembedded)."""
    acts: dict[tuple[str, int], Tensor] = {}

    def grab(point: tuple[str, int]) -> Any:
        def fn(act: Tensor, hook: Any) -> None:
            acts[point] = act.detach().clone()

        return fn

    points = sender_points(model.n_layers)
    hooks = [(hook_name(k, la), grab((k, la))) for k, la in points]
    with torch.no_grad(), hooked(model.bridge, hooks):
        logits = model.bridge(tokens, prepend_bos=False, logits_to_keep=1)[:, -1]
    return stack_senders(model, acts), logits.float()


def readable_senders(graph: EdgeGraph) -> list[int]:
    """Per receiver (graph order), how many senders it reads: always the first ones, since
    senders are in write order."""
    stages = np.asarray([s.stage for s in graph.senders])
    return [int((stages < r.stage).sum()) for r in graph.receivers]


@dataclass(eq=False)
class EdgeScores:
    """Scores of ``edges`` (positions into ``graph.edges``): ``per_prompt[i, e]`` for prompt
    ``i``; ``scores`` their mean (the sign convention of the module docstring)."""

    graph: EdgeGraph
    edges: np.ndarray
    per_prompt: np.ndarray
    method: str
    metric: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        out: np.ndarray = self.per_prompt.mean(0)
        return out

    @property
    def stderr(self) -> np.ndarray:
        n = self.per_prompt.shape[0]
        if n < 2:
            return np.full(self.per_prompt.shape[1], np.nan)
        out: np.ndarray = self.per_prompt.std(0, ddof=1) / np.sqrt(n)
        return out

    def names(self) -> list[str]:
        return [str(self.graph.edges[i]) for i in self.edges]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names(), self.scores.tolist(), strict=True))

    def __getitem__(self, edge: str | GraphEdge) -> float:
        pos = self.graph.position(edge)
        where = np.nonzero(self.edges == pos)[0]
        if where.size == 0:
            raise WorkbenchError(f"edge {str(edge)!r} was not scored", "score it first")
        return float(self.scores[where[0]])

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` edges of largest ``|score|``, strongest first (ties in graph order)."""
        scores = self.scores
        order = np.argsort(-np.abs(scores), kind="stable")[:k]
        return [(str(self.graph.edges[self.edges[i]]), float(scores[i])) for i in order]

    def table(self) -> Any:
        """One row per edge: edge, sender, receiver, via, value (mean), stderr, n."""
        import pandas as pd

        from workbench.edges.graph import describe

        rows = describe(self.graph, self.edges.tolist())
        n = int(self.per_prompt.shape[0])
        for row, value, se in zip(rows, self.scores, self.stderr, strict=True):
            row.update(value=float(value), stderr=float(se), n=n)
        return pd.DataFrame(rows)


def gather_edges(
    graph: EdgeGraph, matrix: Float[Tensor, "batch senders receivers"], positions: Sequence[int]
) -> np.ndarray:
    """``matrix[:, sender(e), receiver(e)]`` for every edge position ``e``: ``[batch, edges]``."""
    idx = np.asarray(positions, dtype=np.int64)
    s = torch.as_tensor(graph.sender_index[idx], device=matrix.device)
    r = torch.as_tensor(graph.receiver_index[idx], device=matrix.device)
    out: np.ndarray = matrix[:, s, r].double().cpu().numpy()
    return out

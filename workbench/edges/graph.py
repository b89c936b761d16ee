"""The edge graph of a transformer, grouped-query attention native (Syed et al. 2023; Hanna et
al. 2024, "Have faith in faithfulness").

The residual stream entering any reader is a sum of what the components before it wrote::

    resid = embed + sum_{earlier heads (L, h)} a_(L,h) + sum_{earlier MLPs L} a_L   (+ biases)

**Senders** (writers), with ``a_u`` their contribution to that sum:

- ``embed``: ``blocks.0.hook_resid_pre`` (token embedding, plus positional embedding and
  Gemma's ``sqrt(d_model)`` scale where the model has them)
- ``L{l}H{h}``: head ``h`` of layer ``l``, ``a = z_h @ W_O[h]``; on Gemma 3 through the
  post-attention RMSNorm with its scale frozen at the run's own value,
  ``a = (z_h @ W_O[h]) * s * (1 + w)``, ``s = 1 / rms(sum_h z_h @ W_O[h] + b_O)`` (as direct
  logit attribution does; the frozen contributions plus the bias share sum to ``hook_attn_out``)
- ``L{l}.mlp``: the MLP of layer ``l``, ``a = hook_mlp_out`` (after Gemma's post-feedforward norm)

**Receivers** (readers), each reading its own copy of the residual stream *before* its norm:

- ``L{l}H{h}.q``: the query input of query head ``h``
- ``L{l}KV{g}.k`` / ``L{l}KV{g}.v``: the key / value input of KV head ``g`` (with grouped-query
  attention one KV head serves ``n_heads / n_kv_heads`` query heads: that is the computation)
- ``L{l}.mlp``: the MLP input (``hook_mlp_in``, before ``ln2``)
- ``logits``: the final residual stream (``blocks.{L-1}.hook_resid_post``, before ``ln_final``)

Edges ``u -> v`` for every sender the receiver can read, in block order (pre-norm, sequential
attention then MLP): a layer-``l`` receiver of q/k/v reads the embedding and every head and MLP of
layers ``< l``; the MLP of layer ``l`` reads those and the heads of layer ``l``; the logits read
every sender. Per layer ``l``: ``(n_heads + 2 n_kv_heads) (1 + l (n_heads + 1))`` attention edges
and ``(l + 1)(n_heads + 1)`` MLP edges, plus ``1 + L (n_heads + 1)`` into the logits (SmolLM2,
30 x 9 heads, 3 KV heads: 70,651 edges; ungrouped K/V would give 123,211).

Names: senders ``embed``, ``L3H4``, ``L3.mlp``; receivers ``L7H1.q``, ``L0KV1.k``, ``L0KV1.v``,
``L5.mlp``, ``logits``; edges ``sender->receiver`` (``L3H4->L7H1.q``, ``embed->L0KV1.k``,
``L3.mlp->logits``).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import numpy as np

    from workbench.models.loading import LoadedModel

SenderKind = Literal["embed", "head", "mlp"]
ReceiverKind = Literal["q", "k", "v", "mlp", "logits"]
_LAST = 1 << 30  # the logits read after every layer
_GRAPHS: weakref.WeakKeyDictionary[Any, EdgeGraph] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, order=True)
class Sender:
    """A writer into the residual stream: ``embed``, head ``(layer, head)`` or ``mlp`` of a
    layer (``layer``/``head`` are -1 where they do not apply)."""

    kind: SenderKind
    layer: int = -1
    head: int = -1

    @property
    def stage(self) -> int:
        """Write order: embed 0, heads of layer l ``2l + 1``, MLP of layer l ``2l + 2``."""
        if self.kind == "embed":
            return 0
        return 2 * self.layer + (1 if self.kind == "head" else 2)

    def __str__(self) -> str:
        if self.kind == "embed":
            return "embed"
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"L{self.layer}.mlp"


@dataclass(frozen=True, order=True)
class Receiver:
    """A reader of the residual stream: query head ``(layer, head)``'s ``q``, KV head
    ``(layer, head)``'s ``k`` or ``v``, a layer's ``mlp`` input, or the ``logits``."""

    kind: ReceiverKind
    layer: int = -1
    head: int = -1

    @property
    def stage(self) -> int:
        """Read order: q/k/v of layer l read writes of stage ``< 2l + 1``, the MLP of layer l
        those ``< 2l + 2`` (its own layer's heads included), the logits all."""
        if self.kind == "logits":
            return _LAST
        return 2 * self.layer + (2 if self.kind == "mlp" else 1)

    def reads(self, sender: Sender) -> bool:
        """Whether ``sender`` writes before this receiver reads (the edge exists)."""
        return sender.stage < self.stage

    def __str__(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"L{self.layer}.mlp"
        if self.kind == "q":
            return f"L{self.layer}H{self.head}.q"
        return f"L{self.layer}KV{self.head}.{self.kind}"


@dataclass(frozen=True, order=True)
class GraphEdge:
    """``sender -> receiver``; ``str`` gives its name, e.g. ``L3H4->L7H1.q``."""

    sender: Sender
    receiver: Receiver

    def __str__(self) -> str:
        return f"{self.sender}->{self.receiver}"


@dataclass(frozen=True, eq=False)
class EdgeGraph:
    """Every sender, receiver and edge of a model (module docstring), in a fixed order.

    Senders: ``embed``, then per layer its heads and its MLP. Receivers: per layer the ``q`` of
    every query head, the ``k`` then the ``v`` of every KV head, the MLP; then ``logits``. Edges:
    receiver-major in that order, senders in their order within. ``sender_index[e]`` and
    ``receiver_index[e]`` locate edge ``e``'s ends in ``senders`` / ``receivers``.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    senders: tuple[Sender, ...]
    receivers: tuple[Receiver, ...]
    edges: tuple[GraphEdge, ...]
    sender_index: np.ndarray
    receiver_index: np.ndarray
    _by_name: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.edges)

    def names(self) -> list[str]:
        return [str(e) for e in self.edges]

    def position(self, edge: str | GraphEdge) -> int:
        """Index of ``edge`` (a name or a :class:`GraphEdge`) in ``edges``; a one-line
        :class:`WorkbenchError` for an unknown name or a receiver before its sender."""
        if not self._by_name:
            self._by_name.update((str(e), i) for i, e in enumerate(self.edges))
        name = str(edge)
        if name in self._by_name:
            return self._by_name[name]
        raise _edge_error(self, name)

    def edge(self, edge: str | GraphEdge) -> GraphEdge:
        return self.edges[self.position(edge)]

    def counts(self) -> dict[str, int]:
        """Edges per receiver kind, the total, and the total were K/V inputs per query head
        (``ungrouped``: what a graph that ignores grouped-query attention would have)."""
        out = {k: 0 for k in ("q", "k", "v", "mlp", "logits")}
        for e in self.edges:
            out[e.receiver.kind] += 1
        out["total"] = len(self.edges)
        group = self.n_heads // self.n_kv_heads
        out["ungrouped"] = out["total"] + (group - 1) * (out["k"] + out["v"])
        return out


def edge_graph(model: LoadedModel) -> EdgeGraph:
    """The edge graph of ``model`` (memoised on the model); refuses architectures whose
    residual stream is not the plain sequential sum the graph assumes."""
    memo = _GRAPHS.get(model.bridge)
    if memo is not None:
        return memo
    check_supported(model)
    graph = build_graph(model.n_layers, model.n_heads, model.n_kv_heads)
    _GRAPHS[model.bridge] = graph
    return graph


def build_graph(n_layers: int, n_heads: int, n_kv_heads: int) -> EdgeGraph:
    """The graph of a pre-norm model of ``n_layers`` x ``n_heads`` with ``n_kv_heads``."""
    import numpy as np

    from workbench.hooks import kv_group

    kv_group(n_heads, n_kv_heads)  # raises unless the query heads split over the KV heads
    senders: list[Sender] = [Sender("embed")]
    receivers: list[Receiver] = []
    for layer in range(n_layers):
        senders += [Sender("head", layer, h) for h in range(n_heads)] + [Sender("mlp", layer)]
        receivers += [Receiver("q", layer, h) for h in range(n_heads)]
        receivers += [Receiver(kind, layer, g) for kind in ("k", "v") for g in range(n_kv_heads)]
        receivers.append(Receiver("mlp", layer))
    receivers.append(Receiver("logits"))
    edges: list[GraphEdge] = []
    s_idx: list[int] = []
    r_idx: list[int] = []
    for j, r in enumerate(receivers):
        for i, s in enumerate(senders):
            if r.reads(s):
                edges.append(GraphEdge(s, r))
                s_idx.append(i)
                r_idx.append(j)
    return EdgeGraph(
        n_layers, n_heads, n_kv_heads, tuple(senders), tuple(receivers), tuple(edges),
        np.asarray(s_idx, dtype=np.int64), np.asarray(r_idx, dtype=np.int64),
    )  # fmt: skip


def edge_list(model: LoadedModel) -> list[str]:
    """Every edge name of ``model``, in graph order."""
    return edge_graph(model).names()


def resolve(graph: EdgeGraph, edges: Iterable[str | GraphEdge] | None) -> list[int]:
    """Positions of ``edges`` in the graph (all edges for None), duplicates kept once."""
    if edges is None:
        return list(range(len(graph)))
    return list(dict.fromkeys(graph.position(e) for e in edges))


_SENDER = re.compile(r"embed|L(\d+)H(\d+)|L(\d+)\.mlp")
_RECEIVER = re.compile(r"L(\d+)H(\d+)\.q|L(\d+)KV(\d+)\.([kv])|L(\d+)\.mlp|logits")


def parse_sender(text: str) -> Sender | None:
    m = _SENDER.fullmatch(text)
    if m is None:
        return None
    if text == "embed":
        return Sender("embed")
    if m.group(1) is not None:
        return Sender("head", int(m.group(1)), int(m.group(2)))
    return Sender("mlp", int(m.group(3)))


def parse_receiver(text: str) -> Receiver | None:
    m = _RECEIVER.fullmatch(text)
    if m is None:
        return None
    if text == "logits":
        return Receiver("logits")
    if m.group(1) is not None:
        return Receiver("q", int(m.group(1)), int(m.group(2)))
    if m.group(3) is not None:
        kind: ReceiverKind = "k" if m.group(5) == "k" else "v"
        return Receiver(kind, int(m.group(3)), int(m.group(4)))
    return Receiver("mlp", int(m.group(6)))


def _edge_error(graph: EdgeGraph, name: str) -> WorkbenchError:
    """Why ``name`` is not an edge of ``graph``, in one line."""
    form = "name edges like 'L3H4->L7H1.q', 'embed->L0KV1.k' or 'L3.mlp->logits'"
    sender_text, sep, receiver_text = name.partition("->")
    sender, receiver = parse_sender(sender_text), parse_receiver(receiver_text)
    if not sep or sender is None or receiver is None:
        hint = form
        if re.fullmatch(r"L\d+H\d+\.[kv]", receiver_text):
            hint = f"k and v are read per KV head ({graph.n_kv_heads} per layer): e.g. 'L1KV0.k'"
        return WorkbenchError(f"unknown edge name {name!r}", hint)
    known_s, known_r = set(graph.senders), set(graph.receivers)
    if sender not in known_s or receiver not in known_r:
        what = sender if sender not in known_s else receiver
        return WorkbenchError(
            f"unknown edge {name!r}: the model has no {what}",
            f"it has {graph.n_layers} layers, {graph.n_heads} heads and "
            f"{graph.n_kv_heads} KV heads per layer",
        )
    return WorkbenchError(
        f"edge {name!r} runs backwards: {receiver} reads the residual stream before {sender} "
        "writes to it",
        "a receiver must sit in a later layer than its sender (an MLP also reads the heads "
        "of its own layer)",
    )


def check_supported(model: LoadedModel) -> None:
    """Refuse models whose blocks are not sequential pre-norm attention-then-MLP with per-head
    Q/K/V input forks (one-line :class:`WorkbenchError`); Gemma 3's post-norms are handled."""
    bridge = model.bridge
    name = model.name
    if getattr(bridge.cfg, "parallel_attn_mlp", False):
        raise WorkbenchError(
            f"edges: {name} runs attention and MLP in parallel; the edge graph assumes "
            "sequential blocks",
            "use a Llama-, GPT-2- or Gemma-3-style model",
        )
    for layer, block in enumerate(bridge.blocks):
        attn = block._modules.get("attn")
        if attn is None or not getattr(attn, "supports_split_qkv_fork", False):
            raise WorkbenchError(
                f"edges: block {layer} of {name} has no per-head Q/K/V input fork",
                "use a Llama-, GPT-2- or Gemma-3-style model",
            )
        scale = getattr(block, "residual_contribution_scale", 1.0)
        if scale != 1.0:
            raise WorkbenchError(
                f"edges: block {layer} of {name} scales its attention output by {scale}",
                "use a Llama-, GPT-2- or Gemma-3-style model",
            )


def describe(graph: EdgeGraph, positions: Sequence[int]) -> list[dict[str, Any]]:
    """``sender``, ``receiver``, ``kind`` (the receiver kind) and ``edge`` name per position."""
    rows = []
    for i in positions:
        e = graph.edges[i]
        rows.append(
            dict(edge=str(e), sender=str(e.sender), receiver=str(e.receiver), via=e.receiver.kind)
        )
    return rows

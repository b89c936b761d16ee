"""Edge circuits from edge scores: top-n or greedy from the logits, pruned of dangling edges.

A circuit is a set of edges of the graph (:mod:`workbench.edges.graph`). Its **components** are
the nodes the edges join: ``embed``, each head, each MLP and ``logits``. A receiver belongs to
the components that read it: ``L{l}H{h}.q`` to head ``(l, h)``; ``L{l}KV{g}.k`` / ``.v`` to every
query head of KV group ``g`` (grouped-query attention: one KV head serves
``n_heads / n_kv_heads`` query heads); ``L{l}.mlp`` to MLP ``l``; ``logits`` to the logits.

- **top-n** (MIB's ``apply_topn``): the ``n`` edges of largest ``|score|`` (signed score with
  ``absolute=False``), then pruned.
- **greedy** (Hanna et al. 2024, EAP-IG's ``apply_greedy``): start from the logits; repeatedly
  add the edge of largest ``|score|`` whose receiver belongs to a component already in the
  circuit, and add its sender's component; ``n`` edges, then pruned.
- **pruning**: a component is *fed* if it is ``embed`` or a circuit edge from a fed component
  reaches one of its receivers; it is *used* if it is ``logits`` or it sends a circuit edge to a
  receiver of a used component. An edge ``u -> v`` stays iff ``u`` is fed and a component reading
  ``v`` is used. One pass of each is a fixed point (removing an edge never changes whether the
  components of the edges that stay are fed or used).

The pruned size can be smaller than ``n``; :class:`EdgeCircuit` keeps both.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from workbench.edges.graph import EdgeGraph, Receiver, Sender
from workbench.errors import WorkbenchError
from workbench.types import Head

if TYPE_CHECKING:
    from workbench.edges.common import EdgeScores

RULES = ("top_n", "greedy")
Component = tuple[str, int, int]  # ("embed"|"head"|"mlp"|"logits", layer, head)
EMBED: Component = ("embed", -1, -1)
LOGITS: Component = ("logits", -1, -1)


def sender_component(s: Sender) -> Component:
    return (s.kind, s.layer, s.head)


def receiver_components(graph: EdgeGraph, r: Receiver) -> tuple[Component, ...]:
    """The components that read receiver ``r`` (module docstring)."""
    if r.kind == "logits":
        return (LOGITS,)
    if r.kind == "mlp":
        return (("mlp", r.layer, -1),)
    if r.kind == "q":
        return (("head", r.layer, r.head),)
    group = graph.n_heads // graph.n_kv_heads
    return tuple(("head", r.layer, h) for h in range(r.head * group, (r.head + 1) * group))


@dataclass(frozen=True)
class EdgeCircuit:
    """A set of edges (positions into ``graph.edges``) chosen by ``rule`` from ``requested``
    top edges, after pruning; ``method`` names the scores it was chosen by."""

    graph: EdgeGraph
    edges: frozenset[int]
    rule: str
    requested: int
    method: str = ""

    def __len__(self) -> int:
        return len(self.edges)

    def names(self) -> list[str]:
        return [str(self.graph.edges[i]) for i in sorted(self.edges)]

    def components(self) -> frozenset[Component]:
        out: set[Component] = set()
        for i in self.edges:
            e = self.graph.edges[i]
            out.add(sender_component(e.sender))
            out.update(receiver_components(self.graph, e.receiver))
        return frozenset(out)

    def heads(self) -> frozenset[Head]:
        """The node-collapsed circuit: every head that sends or (through q, or k/v of its KV
        group) receives a circuit edge."""
        return frozenset(Head(la, h) for kind, la, h in self.components() if kind == "head")

    def mask(self) -> np.ndarray:
        """``[n_edges]`` booleans, True on circuit edges."""
        out = np.zeros(len(self.graph), dtype=bool)
        out[list(self.edges)] = True
        return out

    def __repr__(self) -> str:
        return (
            f"EdgeCircuit({len(self)} of {len(self.graph)} edges, {self.rule} n={self.requested}"
            f"{', ' + self.method if self.method else ''}, {len(self.heads())} heads)"
        )


def check_size(graph: EdgeGraph, n: int) -> None:
    if not 0 <= n <= len(graph):
        raise WorkbenchError(
            f"edges: circuit size {n} is outside the graph's 0..{len(graph)} edges",
            f"choose a size between 0 and {len(graph)}",
        )


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise WorkbenchError(f"edges: unknown circuit rule {rule!r}", "use top_n or greedy")


def prune(graph: EdgeGraph, edges: Iterable[int]) -> frozenset[int]:
    """``edges`` without their dangling edges (module docstring)."""
    chosen = sorted(set(edges), key=lambda i: graph.edges[i].sender.stage)
    readers = [receiver_components(graph, r) for r in graph.receivers]
    fed: set[Component] = {EMBED}
    for i in chosen:  # senders in write order: a sender is fed before it sends
        if sender_component(graph.edges[i].sender) in fed:
            fed.update(readers[graph.receiver_index[i]])
    used: set[Component] = {LOGITS}
    for i in reversed(chosen):  # a reader in a later stage is decided before its senders
        if any(c in used for c in readers[graph.receiver_index[i]]):
            used.add(sender_component(graph.edges[i].sender))
    return frozenset(
        i
        for i in chosen
        if sender_component(graph.edges[i].sender) in fed
        and any(c in used for c in readers[graph.receiver_index[i]])
    )


def _keys(values: np.ndarray, absolute: bool) -> np.ndarray:
    keys: np.ndarray = np.abs(values) if absolute else values.astype(float)
    return np.where(np.isfinite(keys), keys, -np.inf)


def top_n(graph: EdgeGraph, scores: np.ndarray, n: int, *, absolute: bool = True) -> list[int]:
    """The ``n`` edge positions of largest key (``|score|``, or the score), ties by graph order;
    ``scores`` is ``[n_edges]`` over the whole graph (NaN: unscored, ranked last)."""
    check_size(graph, n)
    order = np.argsort(-_keys(scores, absolute), kind="stable")
    return [int(i) for i in order[:n]]


def greedy(graph: EdgeGraph, scores: np.ndarray, n: int, *, absolute: bool = True) -> list[int]:
    """Greedy from the logits (module docstring): ``n`` edge positions, in the order added."""
    check_size(graph, n)
    keys = _keys(scores, absolute)
    into: dict[Component, list[int]] = {}
    for i, r in enumerate(graph.receiver_index):
        for c in receiver_components(graph, graph.receivers[r]):
            into.setdefault(c, []).append(i)
    heap: list[tuple[float, int]] = []
    seen: set[int] = set()
    present: set[Component] = set()

    def enter(c: Component) -> None:
        if c in present:
            return
        present.add(c)
        for i in into.get(c, ()):
            if i not in seen:
                seen.add(i)
                heapq.heappush(heap, (-float(keys[i]), i))

    enter(LOGITS)
    out: list[int] = []
    while heap and len(out) < n:
        _, i = heapq.heappop(heap)
        out.append(i)
        enter(sender_component(graph.edges[i].sender))
    return out


def circuit_from_scores(
    graph: EdgeGraph,
    scores: np.ndarray,
    n: int,
    *,
    rule: str = "top_n",
    absolute: bool = True,
    method: str = "",
) -> EdgeCircuit:
    """The pruned circuit of ``n`` requested edges by ``rule`` over whole-graph ``scores``."""
    check_rule(rule)
    pick = top_n if rule == "top_n" else greedy
    chosen = pick(graph, scores, n, absolute=absolute)
    return EdgeCircuit(graph, prune(graph, chosen), rule, n, method)


def full_scores(scores: EdgeScores) -> np.ndarray:
    """``[n_edges]`` mean scores over the whole graph, NaN where an edge was not scored."""
    out = np.full(len(scores.graph), np.nan)
    out[scores.edges] = scores.scores
    return out


def edge_circuit(
    scores: EdgeScores, n: int, *, rule: str = "top_n", absolute: bool = True
) -> EdgeCircuit:
    """The pruned circuit of ``n`` requested edges of ``scores`` by ``rule``."""
    return circuit_from_scores(
        scores.graph, full_scores(scores), n, rule=rule, absolute=absolute, method=scores.method
    )


def from_names(graph: EdgeGraph, names: Sequence[str], *, pruned: bool = False) -> EdgeCircuit:
    """A circuit of the named edges (one-line errors for unknown or backwards names)."""
    positions = frozenset(graph.position(n) for n in names)
    return EdgeCircuit(graph, prune(graph, positions) if pruned else positions, "given", len(names))


def size_grid(n_edges: int, fractions: Sequence[float]) -> list[int]:
    """Edge counts ``int(f * n_edges)`` for each fraction (MIB's percentages), ascending and
    distinct, at least 1 edge each; 0 < f <= 1."""
    for f in fractions:
        if not 0 < f <= 1:
            raise WorkbenchError(
                f"edges: circuit fraction {f} is outside (0, 1]",
                "give fractions of the graph's edges, e.g. 0.001, 0.01, 0.1, 1",
            )
    return sorted({max(1, int(f * n_edges)) for f in fractions})

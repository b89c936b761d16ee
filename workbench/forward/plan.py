"""A KV-cache plan: which KV heads keep their whole cache, and how the others stream (torch-free).

A :class:`KVPlan` gives every KV head ``(layer, kv_head)`` of a model one policy: ``full`` (the
whole KV cache), or ``stream``: ``sink`` initial tokens, the ``window`` most recent ones and, with
``compensation``, one extra token holding the mean key and value of those dropped (RazorAttention).
For a context of ``N`` tokens a KV head caches ``N`` (full) or ``min(N, sink + window + c)``
(``c`` = 1 with compensation), and the plan's

``kv_fraction(N) = sum_g cache_g(N) / (n_kv_heads * N)``.

Layers the model itself slides (``native``) keep their own window. A plan is hashable, has a
content id (``plan_id``) and round-trips through JSON (:meth:`KVPlan.to_json`), so a serving
stack can read which heads to keep. :mod:`workbench.forward.streaming` runs a model under a
plan; :mod:`workbench.circuits.kvplans` builds plans from head scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.types import canonical_json, sha256_hex

PLAN_FORMAT = 1


@dataclass(frozen=True)
class KVPlan:
    """Full KV heads plus the stream policy of the others (module docstring)."""

    model: str
    grid: tuple[int, int]  # (n_layers, n_kv_heads)
    full: frozenset[tuple[int, int]]
    sink: int = 4
    window: int = 256
    compensation: bool = True
    weighted: bool = True  # the compensation token counts as the number of keys it replaces
    native: tuple[tuple[int, int], ...] = ()  # (layer, window) the model itself slides
    rule: str = ""
    params: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n_layers, n_kv = self.grid
        bad = [h for h in self.full if not (0 <= h[0] < n_layers and 0 <= h[1] < n_kv)]
        if bad:
            raise WorkbenchError(
                f"KV plan: heads {sorted(bad)[:3]} outside the {n_layers} x {n_kv} grid",
                "build the plan from this model's scores",
            )
        if self.sink < 0 or self.window < 1:
            raise WorkbenchError(
                f"KV plan: sink must be >= 0 and window >= 1 (got {self.sink}, {self.window})",
                "e.g. sink 4, window 256",
            )
        native = {lay for lay, _ in self.native}
        streamed = {lay for lay in native for g in range(n_kv) if (lay, g) not in self.full}
        if streamed:
            raise WorkbenchError(
                f"KV plan streams layer {min(streamed)}, which the model already slides",
                "keep natively sliding layers full (build_plan does)",
            )

    @property
    def n_kv_heads(self) -> int:
        return self.grid[0] * self.grid[1]

    def cache(self, head: tuple[int, int], n: int) -> int:
        """Tokens KV head ``head`` keeps for a context of ``n`` tokens."""
        native = dict(self.native).get(head[0])
        if native is not None:
            return min(n, native)
        if head in self.full:
            return n
        return min(n, self.sink + self.window + int(self.compensation))

    @property
    def streamable(self) -> list[tuple[int, int]]:
        """KV heads a plan may choose between full and stream (not natively sliding)."""
        native = {lay for lay, _ in self.native}
        return [
            (lay, g)
            for lay in range(self.grid[0])
            for g in range(self.grid[1])
            if lay not in native
        ]

    @property
    def n_full(self) -> int:
        """Full KV heads the plan chose (natively sliding layers not counted)."""
        native = {lay for lay, _ in self.native}
        return sum(1 for h in self.full if h[0] not in native)

    def policy(self, head: tuple[int, int]) -> str:
        if head[0] in dict(self.native):
            return "native"
        return "full" if head in self.full else "stream"

    def replace(self, full: Iterable[tuple[int, int]], rule: str, **params: Any) -> KVPlan:
        """The same stream policy with another set of full heads (native layers kept full)."""
        native = {(lay, g) for lay, _ in self.native for g in range(self.grid[1])}
        return KVPlan(
            self.model, self.grid, frozenset(set(full) | native), self.sink, self.window,
            self.compensation, self.weighted, self.native, rule, params, self.sources,
        )  # fmt: skip

    def kv_fraction(self, n: int) -> float:
        """``sum_g cache_g(n) / (n_kv_heads * n)``."""
        if n < 1:
            raise WorkbenchError(
                f"kv_fraction needs a context of >= 1 token, got {n}", "use N >= 1"
            )
        heads = [(lay, g) for lay in range(self.grid[0]) for g in range(self.grid[1])]
        return sum(self.cache(h, n) for h in heads) / (self.n_kv_heads * n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "grid": list(self.grid),
            "full": sorted([list(h) for h in self.full]),
            "stream": {
                "sink": self.sink,
                "window": self.window,
                "compensation": self.compensation,
                "weighted": self.weighted,
            },
            "native": [list(x) for x in self.native],
            "rule": self.rule,
            "params": dict(self.params),
            "sources": list(self.sources),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @property
    def plan_id(self) -> str:
        return sha256_hex("workbench.kvplan", canonical_json(self.to_dict()))[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KVPlan:
        try:
            stream = d["stream"]
            return cls(
                model=str(d["model"]),
                grid=(int(d["grid"][0]), int(d["grid"][1])),
                full=frozenset((int(a), int(b)) for a, b in d["full"]),
                sink=int(stream["sink"]),
                window=int(stream["window"]),
                compensation=bool(stream["compensation"]),
                weighted=bool(stream.get("weighted", True)),
                native=tuple((int(a), int(b)) for a, b in d.get("native", ())),
                rule=str(d.get("rule", "")),
                params=dict(d.get("params", {})),
                sources=tuple(str(s) for s in d.get("sources", ())),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise WorkbenchError(f"malformed KV plan JSON ({e})", "write it with to_json") from None

    def __str__(self) -> str:
        native = f", {len(self.native)} layers slide natively" if self.native else ""
        comp = " + compensation" if self.compensation else ""
        return (
            f"KVPlan({self.model}, {self.n_full} of {len(self.streamable)} KV heads full{native}, "
            f"stream sink {self.sink} + window {self.window}{comp}, rule {self.rule or '-'})"
        )

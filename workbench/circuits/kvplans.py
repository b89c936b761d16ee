"""KV-cache plans from head scores (torch-free): which KV heads keep their whole cache.

A :class:`KVPlan` gives every KV head ``(layer, kv_head)`` of a model one policy: ``full`` (the
whole KV cache), or ``stream``: ``sink`` initial tokens, the ``window`` most recent ones and, with
``compensation``, one extra token holding the mean key and value of those dropped (RazorAttention).
For a context of ``N`` tokens a KV head caches ``N`` (full) or ``min(N, sink + window + c)``
(``c`` = 1 with compensation), and the plan's

``kv_fraction(N) = sum_g cache_g(N) / (n_kv_heads * N)``

(the budget accounting of ``../shared/reference/metrics.md``). Rules over per-KV-head scores
(``scores[l, g]``, e.g. the ``kv_heads`` table of ``kv_head_scores``, max-pooled):

- ``razor``: the top ``induction_share`` (14 %) of KV heads by induction and the top
  ``echo_share`` (1 %, at least one head) by echo, ranked across all layers, are full
  (Tang et al. 2024); ``ceil(share * n)`` heads each;
- ``top_k``: the ``k`` KV heads with the largest score are full;
- ``threshold``: every KV head with score ``> threshold`` is full;
- ``quantile``: the top ``ceil((1 - quantile) n)`` KV heads by score are full (DuoAttention
  thresholds its gates at a quantile; by rank, so tied scores such as gates stuck at 1 still
  give the stated share);
- ``budget``: the most heads in score order such that ``kv_fraction(N) <= budget``.

NaN scores are never chosen; ties go by (layer, kv_head). A plan is hashable, has a content id
(``plan_id``) and provenance (rule, parameters, source runs), and round-trips through JSON
(:meth:`KVPlan.to_json`) so a serving stack can read which heads to keep.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.types import canonical_json, sha256_hex

RULES = ("razor", "top_k", "threshold", "quantile", "budget")
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


def _order(scores: np.ndarray) -> list[tuple[int, int]]:
    """KV heads by descending score, NaN left out, ties by (layer, kv_head)."""
    flat = np.asarray(scores, dtype=float).ravel()
    idx = [int(i) for i in np.argsort(-flat, kind="mergesort") if np.isfinite(flat[i])]
    n_kv = scores.shape[1]
    return [(i // n_kv, i % n_kv) for i in idx]


def kv_scores(kv_table: Any, metric: str, grid: tuple[int, int], column: str = "max") -> np.ndarray:
    """``[n_layers, n_kv_heads]`` scores of ``metric`` from a ``kv_heads`` table."""
    rows = kv_table[kv_table["metric"] == metric]
    if rows.empty:
        raise WorkbenchError(f"no KV-head scores of '{metric}'", "run kv_head_scores first")
    mat = np.full(grid, np.nan)
    mat[rows["layer"].to_numpy(), rows["kv_head"].to_numpy()] = rows[column].to_numpy()
    return mat


def pool_kv_heads(heads: Any, n_kv_heads: int, axis: str = "head") -> Any:
    """A ``kv_heads`` table (layer, kv_head, metric, max, mean, sum) from a per-head table
    (layer, head, metric, value) of query heads (``axis`` "head": KV head ``g`` pools query
    heads ``g * group .. (g + 1) * group - 1``) or of KV heads already (``axis`` "kv_head")."""
    import pandas as pd

    rows = heads.dropna(subset=["value"])
    if axis == "kv_head":
        out = rows.assign(kv_head=rows["head"], max=rows["value"], mean=rows["value"],
                          sum=rows["value"])  # fmt: skip
        return out[["layer", "kv_head", "metric", "max", "mean", "sum"]].reset_index(drop=True)
    if axis != "head":
        raise WorkbenchError(
            f"per-layer scores ({axis}) cannot rank KV heads", "use a per-head run"
        )
    n_heads = int(rows["head"].max()) + 1
    if n_heads % n_kv_heads:
        raise WorkbenchError(f"{n_heads} query heads do not split into {n_kv_heads} KV heads",
                             "check the model")  # fmt: skip
    group = n_heads // n_kv_heads
    g = rows.assign(kv_head=rows["head"] // group)
    agg = g.groupby(["layer", "kv_head", "metric"])["value"].agg(["max", "mean", "sum"])
    return pd.DataFrame(agg.reset_index())


def build_plan(
    model: str,
    rule: str,
    scores: Mapping[str, np.ndarray],
    *,
    sink: int = 4,
    window: int = 256,
    compensation: bool = True,
    weighted: bool = True,
    native: Mapping[int, int] | None = None,
    sources: Iterable[str] = (),
    **params: Any,
) -> KVPlan:
    """A plan by ``rule`` (module docstring) over ``scores`` (``{"induction": ..., "echo":
    ...}`` for razor; ``{"score": ...}`` for the others), each ``[n_layers, n_kv_heads]``."""
    if rule not in RULES:
        raise WorkbenchError(f"unknown KV plan rule '{rule}'", f"choose from {', '.join(RULES)}")
    first = next(iter(scores.values()))
    grid = (int(first.shape[0]), int(first.shape[1]))
    slide = tuple(sorted((int(k), int(v)) for k, v in (native or {}).items()))
    scores = {m: _without(v, slide) for m, v in scores.items()}
    n = (grid[0] - len(slide)) * grid[1]  # KV heads the rule chooses between
    if rule == "razor":
        ind_share = float(params.get("induction_share", 0.14))
        echo_share = float(params.get("echo_share", 0.01))
        if not (0 < ind_share <= 1 and 0 <= echo_share <= 1):
            raise WorkbenchError("razor: shares must be in (0, 1]", "e.g. induction_share 0.14")
        full = set(_order(scores["induction"])[: math.ceil(ind_share * n)])
        full |= set(_order(scores["echo"])[: max(1, math.ceil(echo_share * n))])
        used = {"induction_share": ind_share, "echo_share": echo_share}
    else:
        order = _order(scores["score"])
        if rule == "top_k":
            k = int(params.get("k", 0))
            if not 1 <= k <= len(order):
                raise WorkbenchError(f"top_k: k must be in 1..{len(order)}, got {k}", "fix k")
            full, used = set(order[:k]), {"k": k}
        elif rule == "threshold":
            t = float(params["threshold"])
            flat = np.asarray(scores["score"], dtype=float)
            full, used = {h for h in order if flat[h] > t}, {"threshold": t}
        elif rule == "quantile":
            q = float(params.get("quantile", 0.5))
            if not 0 <= q < 1:
                raise WorkbenchError(f"quantile must be in [0, 1), got {q}", "e.g. 0.5")
            keep = math.ceil((1 - q) * len(order))  # by rank: ties (gates at 1) still split
            full, used = set(order[:keep]), {"quantile": q, "kept": keep}
        else:  # budget
            budget, n_ctx = float(params.get("budget", 0)), int(params.get("n_ctx", 0))
            if not 0 < budget <= 1:
                raise WorkbenchError(f"budget must be in (0, 1], got {budget}", "e.g. 0.3")
            full, used = set(), {"budget": budget, "n_ctx": n_ctx}
            for head in order:
                trial = KVPlan(
                    model, grid, frozenset(full | {head} | _native_heads(slide, grid)), sink,
                    window, compensation, weighted, slide,
                )  # fmt: skip
                if trial.kv_fraction(n_ctx) > budget:
                    break
                full.add(head)
    return KVPlan(
        model, grid, frozenset(full | _native_heads(slide, grid)), sink, window, compensation,
        weighted, slide, rule, used, tuple(sources),
    )  # fmt: skip


def _native_heads(
    slide: tuple[tuple[int, int], ...], grid: tuple[int, int]
) -> set[tuple[int, int]]:
    return {(lay, g) for lay, _ in slide for g in range(grid[1])}


def _without(scores: np.ndarray, slide: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``scores`` with the natively sliding layers' rows NaN (never chosen)."""
    out = np.array(scores, dtype=float, copy=True)
    for lay, _ in slide:
        out[lay] = np.nan
    return out


def controls(
    plan: KVPlan, n_random: int, seed: int, scores: np.ndarray | None = None
) -> dict[str, KVPlan]:
    """Plans at ``plan``'s number of full KV heads to judge it against: ``n_random`` uniform
    random sets (``random_u{i}``), ``n_random`` with ``plan``'s per-layer counts of full heads
    (``random_l{i}``), ``all_stream``, ``all_full`` and, given the scores the plan was ranked
    by, the ``anti`` plan (the lowest-scored heads full). Seeded; every plan distinct from
    ``plan`` where the grid allows."""
    rng = np.random.default_rng(seed)
    pool = plan.streamable
    chosen = [h for h in pool if h in plan.full]
    k = len(chosen)
    out: dict[str, KVPlan] = {}
    for i in range(n_random):
        pick: list[int] = rng.choice(len(pool), size=k, replace=False).tolist() if k else []
        out[f"random_u{i}"] = plan.replace(
            [pool[j] for j in pick], "random_uniform", seed=seed, i=i
        )
    per_layer: dict[int, int] = {}
    for lay, _ in chosen:
        per_layer[lay] = per_layer.get(lay, 0) + 1
    for i in range(n_random):
        full = []
        for lay, c in per_layer.items():
            heads = [h for h in pool if h[0] == lay]
            full += [heads[j] for j in rng.choice(len(heads), size=c, replace=False)]
        out[f"random_l{i}"] = plan.replace(full, "random_layer_matched", seed=seed, i=i)
    out["all_stream"] = plan.replace([], "all_stream")
    out["all_full"] = plan.replace(pool, "all_full")
    if scores is not None:
        order = _order(-_without(scores, plan.native))
        out["anti"] = plan.replace(order[:k], "anti")
    return out


PLAN_ANALYSIS = "kv_plan"
"""Analysis name of a stored plan (derived from stored scores, not a registry entry)."""


def save_plan(store: Any, plan: KVPlan) -> str:
    """Store ``plan`` as a run of ``kv_plan`` keyed by its content (``plan_id``): table
    ``heads`` (layer, kv_head, policy), the plan JSON in the manifest; returns the run id."""
    import pandas as pd

    from workbench import __version__
    from workbench.types import RunKey

    fingerprint = data_hash = ""
    if plan.sources:
        source = store.load(plan.sources[0])
        fingerprint, data_hash = source.key["model_fingerprint"], source.key["data_hash"]
    key = RunKey(
        model=plan.model, model_fingerprint=fingerprint, analysis=PLAN_ANALYSIS,
        params={"plan_id": plan.plan_id, "rule": plan.rule}, task="kv_plan",
        data_hash=data_hash, code_version=f"{__version__}+{PLAN_ANALYSIS}.1",
    )  # fmt: skip
    rows = [
        {"layer": lay, "kv_head": g, "policy": "full" if (lay, g) in plan.full else "stream"}
        for lay in range(plan.grid[0])
        for g in range(plan.grid[1])
    ]
    return str(
        store.put(key, {"heads_policy": pd.DataFrame(rows)}, {"plan": plan.to_dict()}).run_id
    )


def load_plan(store: Any, run_id: str) -> KVPlan:
    """The plan stored by :func:`save_plan` under ``run_id`` (a prefix is enough)."""
    stored = store.load(run_id)
    body = stored.info.get("plan")
    if stored.key.get("analysis") != PLAN_ANALYSIS or body is None:
        raise WorkbenchError(
            f"run {stored.run_id} is a {stored.key.get('analysis')} run, not a KV plan",
            "give the run id save_plan returned",
        )
    return KVPlan.from_dict(body)

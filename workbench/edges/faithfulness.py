"""Faithfulness of edge circuits over circuit sizes, for a panel of ablations, with its summaries.

For a circuit ``C`` and an ablation (:mod:`workbench.edges.ablate`), two directions:

- ``ablate_complement`` (the circuit patched in, everything else ablated: is ``C`` sufficient?)
  ``M_in(C)``: every edge outside ``C`` ablated. Patching ``C``'s clean values into a run where
  every edge is ablated is the same computation (each edge is either in ``C`` or ablated, the
  embedding included), so it is not a separate direction.
- ``ablate_circuit`` (is ``C`` necessary?) ``M_out(C)``: the edges of ``C`` ablated.

Faithfulness (Hanna et al. 2024; MIB), with ``M(full)`` the clean run and ``M(empty)`` the run with
every edge ablated by the same ablation::

    f(C) = (mean M(C) - mean M(empty)) / (mean M(full) - mean M(empty))

(1 for the full graph in the ``ablate_complement`` direction, 0 for the empty circuit; the
``ablate_circuit`` curve falls from 1 towards 0). Bootstrap intervals resample prompts
(percentiles 2.5 / 97.5 of ``f`` recomputed on each resample). ``KL(p_clean || p_C)`` at the
final position is reported beside it.

Summaries of a curve, points ``(x_k, f_k)`` with ``x_k`` the pruned circuit's share of the
graph's edges, in increasing order:

- MIB's **CPR** (higher is better): ``sum_k (x_(k+1) - x_k) (f_k + f_(k+1)) / 2``;
- MIB's **CMD** (lower is better): the same over ``|1 - f|``;
- auto-circuit's area (``measurements_auc(log_x=True)``): over ``log10`` of the edge count, of
  the raw metric minus its value at 0 edges, ``sum_k (log x_(k+1) - log x_k) (h_k + h_(k+1)) / 2``;
  **normalised by random** orderings: this area divided by the mean area of the random
  orderings' curves (> 1: better than random).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.edges.ablate import ABLATIONS, EdgeAblator, check_ablation
from workbench.edges.circuit import EdgeCircuit
from workbench.errors import WorkbenchError

DIRECTIONS = ("ablate_complement", "ablate_circuit")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise WorkbenchError(
            f"edges: unknown direction {direction!r}", f"choose from {', '.join(DIRECTIONS)}"
        )


@dataclass(frozen=True)
class Ordering:
    """The circuits of one ordering of the edges (a method's scores, or a random one), one per
    requested size, ascending."""

    name: str  # e.g. "eap-ig", "random-0"
    circuits: tuple[EdgeCircuit, ...]
    random: bool = False


def faithfulness_ratio(values: np.ndarray, full: np.ndarray, empty: np.ndarray) -> float:
    """``(mean values - mean empty) / (mean full - mean empty)``; NaN when the baselines tie."""
    denom = float(full.mean() - empty.mean())
    if abs(denom) < 1e-9:
        return float("nan")
    return float((values.mean() - empty.mean()) / denom)


def bootstrap_ratio(
    values: np.ndarray, full: np.ndarray, empty: np.ndarray, idx: np.ndarray
) -> tuple[float, float]:
    """Percentiles 2.5 / 97.5 of :func:`faithfulness_ratio` over prompt resamples ``idx``
    ``[n_boot, n]`` (the same resamples for every curve point)."""
    if idx.size == 0:
        return float("nan"), float("nan")
    denom = full[idx].mean(1) - empty[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (values[idx].mean(1) - empty[idx].mean(1)) / denom
    f = f[np.isfinite(f)]
    if f.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(f, [2.5, 97.5])
    return float(lo), float(hi)


def curve_rows(
    ablator: EdgeAblator,
    orderings: Sequence[Ordering],
    ablations: Sequence[str] = ABLATIONS,
    directions: Sequence[str] = DIRECTIONS,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    random_panel: bool = False,
) -> list[dict[str, Any]]:
    """One row per (ordering, ablation, direction, size): ``n_requested``, ``n_edges`` (after
    pruning), ``fraction``, ``metric`` (mean ``M``), ``faithfulness`` and its bootstrap
    ``ci_low`` / ``ci_high``, ``kl`` (mean), ``n_heads`` (node-collapsed). The ``full`` and
    ``empty`` baselines of each ablation are rows with ``n_edges`` = all / 0 (``ordering``
    ``"baseline"``). Random orderings run the first ablation and direction only, unless
    ``random_panel``."""
    for a in ablations:
        check_ablation(a)
    for d in directions:
        check_direction(d)
    n = ablator.prompts.n
    total = len(ablator.graph)
    idx = (
        np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        if n > 1
        else np.zeros((0, n), dtype=int)
    )
    rows: list[dict[str, Any]] = []
    # no edge ablated is the clean run, whatever the ablation (tested): computed once
    full = ablator.clean_metric.double().cpu().numpy()
    kl_full = np.zeros_like(full)
    every = np.ones(total, dtype=bool)
    for ai, ablation in enumerate(ablations):
        (empty,), (kl_empty,) = ablator.run(every[None], ablation)
        for label, count, v, kl in (("full", total, full, kl_full), ("empty", 0, empty, kl_empty)):
            rows.append(_row("baseline", ablation, label, count, count, total, v, full, empty,
                             kl, idx, 0))  # fmt: skip
        for di, direction in enumerate(directions):
            for o in orderings:
                if o.random and not random_panel and (ai, di) != (0, 0):
                    continue
                masks = np.stack([c.mask() for c in o.circuits])
                if direction == "ablate_complement":
                    masks = ~masks
                values, kls = ablator.run(masks, ablation, desc=f"{o.name} {ablation} {direction}")
                for c, v, kl in zip(o.circuits, values, kls, strict=True):
                    rows.append(_row(o.name, ablation, direction, c.requested, len(c), total, v,
                                     full, empty, kl, idx, len(c.heads())))  # fmt: skip
    return rows


def _row(
    ordering: str,
    ablation: str,
    direction: str,
    requested: int,
    n_edges: int,
    total: int,
    values: np.ndarray,
    full: np.ndarray,
    empty: np.ndarray,
    kl: np.ndarray,
    idx: np.ndarray,
    n_heads: int,
) -> dict[str, Any]:
    lo, hi = bootstrap_ratio(values, full, empty, idx)
    return dict(
        ordering=ordering, ablation=ablation, direction=direction, n_requested=requested,
        n_edges=n_edges, fraction=n_edges / total, metric=float(values.mean()),
        faithfulness=faithfulness_ratio(values, full, empty), ci_low=lo, ci_high=hi,
        kl=float(kl.mean()), n_heads=n_heads,
    )  # fmt: skip


def cpr_cmd(fractions: Sequence[float], f: Sequence[float]) -> tuple[float, float]:
    """MIB's CPR and CMD of one curve (module docstring), trapezoids over ``fractions``."""
    pts = sorted(zip(fractions, f, strict=True))
    cpr = cmd = 0.0
    for (x1, y1), (x2, y2) in itertools.pairwise(pts):
        cpr += (x2 - x1) * (y1 + y2) / 2
        cmd += (x2 - x1) * (abs(1 - y1) + abs(1 - y2)) / 2
    return cpr, cmd


def log_area(counts: Sequence[int], metric: Sequence[float], at_zero: float) -> float:
    """auto-circuit's ``measurements_auc(log_x=True, log_y=False)``: the area of
    ``metric - at_zero`` over ``log10(edge count)``, segments touching 0 edges skipped."""
    pts = sorted(zip(counts, metric, strict=True))
    area = 0.0
    for (x1, y1), (x2, y2) in itertools.pairwise(pts):
        if x1 <= 0 or x2 <= 0:
            continue
        area += (math.log10(x2) - math.log10(x1)) * ((y1 - at_zero) + (y2 - at_zero)) / 2
    return area


def summaries(rows: list[dict[str, Any]], orderings: Sequence[Ordering]) -> list[dict[str, Any]]:
    """Per (ordering, ablation, direction): CPR, CMD, auto-circuit's log area and that area
    over the random orderings' mean area (``vs_random``), the smallest circuit reaching
    faithfulness 0.8 (``edges_to_0.8``; NaN if none does) and the random orderings' CPR."""
    random_names = {o.name for o in orderings if o.random}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    base: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["ordering"] == "baseline":
            base[(r["ablation"], r["direction"])] = r["metric"]
            continue
        groups.setdefault((r["ordering"], r["ablation"], r["direction"]), []).append(r)
    out: list[dict[str, Any]] = []
    areas: dict[tuple[str, str, str], float] = {}
    for (name, ablation, direction), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["n_requested"])
        f = [r["faithfulness"] for r in rs]
        cpr, cmd = cpr_cmd([r["fraction"] for r in rs], f)
        # the metric with 0 circuit edges: all ablated (complement), none ablated (circuit)
        at_zero = base[(ablation, "empty" if direction == "ablate_complement" else "full")]
        area = log_area([r["n_edges"] for r in rs], [r["metric"] for r in rs], at_zero)
        areas[(name, ablation, direction)] = area
        good = [direction == "ablate_complement" and bool(np.isfinite(r["faithfulness"]))
                and r["faithfulness"] >= 0.8 for r in rs]  # fmt: skip
        reach = [r["n_edges"] for r, g in zip(rs, good, strict=True) if g]
        stay = [r["n_edges"] for i, r in enumerate(rs) if all(good[i:])]
        out.append(dict(ordering=name, ablation=ablation, direction=direction, cpr=cpr, cmd=cmd,
                        log_area=area, random=name in random_names,
                        edges_to_08=min(reach) if reach else float("nan"),
                        edges_stay_08=min(stay) if stay else float("nan")))  # fmt: skip
    for row in out:
        key = (row["ablation"], row["direction"])
        rand = [areas[(n, *key)] for n in random_names if (n, *key) in areas]
        mean = float(np.mean(rand)) if rand else float("nan")
        row["random_log_area"] = mean
        row["vs_random"] = row["log_area"] / mean if rand and abs(mean) > 1e-12 else float("nan")
        rcpr = [r["cpr"] for r in out if r["random"] and (r["ablation"], r["direction"]) == key]
        row["random_cpr"] = float(np.mean(rcpr)) if rcpr else float("nan")
    return out

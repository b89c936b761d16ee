"""Overlap of two circuits (Merullo et al. 2023, "Circuit Component Reuse Across Tasks").

For head sets ``A`` and ``B`` of one model with ``N`` heads (torch-free; numpy only):

- ``share_a = |A & B| / |A|`` and ``share_b = |A & B| / |B|``: the share of each circuit found in
  the other (our denominators; the paper's is not in its code);
- Jaccard ``|A & B| / |A | B|``; overlap coefficient ``|A & B| / min(|A|, |B|)``;
- Spearman rank correlation of the two full per-head score vectors (when given; over the heads
  scored in both, ties averaged);
- significance of the intersection against random head sets of the same sizes: with ``B`` drawn
  uniformly among the ``N``-head subsets of size ``|B|``, ``X = |A & B|`` is hypergeometric,
  ``P(X = x) = C(|A|, x) C(N - |A|, |B| - x) / C(N, |B|)``, and ``p = P(X >= observed)``
  (exact, integer arithmetic); the permutation test draws ``n_permutations`` random ``B`` and
  reports ``(1 + #{X* >= observed}) / (1 + n_permutations)``.

Only heads enter the statistics (``N`` counts heads); other components of a circuit are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.stats import hypergeom_sf, permutation_p, spearman
from workbench.types import Circuit, Head

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["OverlapMatrix", "OverlapResult", "hypergeom_sf", "overlap", "overlap_matrix"]


@dataclass(frozen=True)
class OverlapResult:
    """The overlap statistics of two circuits (module docstring); ``table``, ``figure()``."""

    name_a: str
    name_b: str
    size_a: int
    size_b: int
    intersection: int
    share_a: float
    share_b: float
    jaccard: float
    overlap_coefficient: float
    spearman: float
    spearman_n: int
    expected_intersection: float
    p_hypergeometric: float
    p_permutation: float
    n_permutations: int
    n_total_heads: int
    shared: tuple[Head, ...] = ()

    @property
    def table(self) -> pd.DataFrame:
        import pandas as pd

        row = asdict(self)
        row["shared"] = ", ".join(str(h) for h in self.shared)
        return pd.DataFrame([row])

    def summary(self) -> str:
        return (
            f"{self.name_a} ({self.size_a}) vs {self.name_b} ({self.size_b}) of "
            f"{self.n_total_heads} heads: shared {self.intersection} "
            f"(expected {self.expected_intersection:.2f}); "
            f"|A&B|/|A| {self.share_a:.3f}, |A&B|/|B| {self.share_b:.3f}, Jaccard "
            f"{self.jaccard:.3f}, overlap coef. {self.overlap_coefficient:.3f}, Spearman "
            f"{self.spearman:.3f} (n={self.spearman_n}), p hypergeom {self.p_hypergeometric:.3g}, "
            f"p perm {self.p_permutation:.3g} ({self.n_permutations})"
        )

    def __repr__(self) -> str:
        return f"<OverlapResult {self.summary()}>"

    def figure(self) -> go.Figure:
        """Venn-like bars: only A, shared, only B, and the shared count expected at random."""
        import plotly.graph_objects as go

        bars = [
            (f"only {self.name_a}", self.size_a - self.intersection),
            ("shared", self.intersection),
            (f"only {self.name_b}", self.size_b - self.intersection),
            ("shared if random", self.expected_intersection),
        ]
        fig = go.Figure(
            go.Bar(
                x=[b[0] for b in bars],
                y=[b[1] for b in bars],
                marker_color=["#4c78a8", "#9467bd", "#e45756", "#bbbbbb"],
                hovertemplate="%{x}: %{y}<extra></extra>",
            )
        )
        fig.update_layout(
            title=f"{self.name_a} vs {self.name_b}: Jaccard {self.jaccard:.2f}, "
            f"p = {self.p_hypergeometric:.2g} (hypergeometric)",
            yaxis={"title": "heads"},
        )
        return fig


def _heads_of(c: Circuit | Iterable[Head], which: str) -> frozenset[Head]:
    heads = c.heads if isinstance(c, Circuit) else frozenset(c)
    if not heads:
        raise WorkbenchError(f"circuit {which} is empty (no heads)", "derive a non-empty circuit")
    if not all(isinstance(h, Head) for h in heads):
        raise WorkbenchError(f"circuit {which} holds non-heads", "pass heads (Head(layer, head))")
    return heads


def _vector(scores: Any, grid: tuple[int, int] | None, n_total: int) -> np.ndarray:
    if isinstance(scores, Mapping):
        if grid is None:
            raise WorkbenchError("per-head score dicts need the circuits' grid", "pass matrices")
        mat = np.full(grid, np.nan)
        for h, s in scores.items():
            mat[h.layer, h.head] = float(s)
        return mat.ravel()
    v = np.asarray(scores, dtype=np.float64).ravel()
    if v.size != n_total:
        raise WorkbenchError(
            f"a score vector has {v.size} entries for {n_total} heads", "give one score per head"
        )
    return v


def overlap(
    a: Circuit | Iterable[Head],
    b: Circuit | Iterable[Head],
    *,
    scores_a: Any | None = None,
    scores_b: Any | None = None,
    n_total_heads: int | None = None,
    n_permutations: int = 10000,
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
    allow_cross_model: bool = False,
) -> OverlapResult:
    """Overlap statistics of two circuits (module docstring).

    Circuits of different models are an error unless ``allow_cross_model`` (same head grid
    required, e.g. two models of one family). ``n_total_heads`` defaults to the circuits' grid.
    """
    ca, cb = a if isinstance(a, Circuit) else None, b if isinstance(b, Circuit) else None
    grid = ca.grid if ca else cb.grid if cb else None
    if ca is not None and cb is not None:
        if ca.model != cb.model and not allow_cross_model:
            raise WorkbenchError(
                f"circuits of different models ({ca.model} vs {cb.model})",
                "compare circuits of one model, or pass allow_cross_model=True for models of one "
                "family with the same head grid",
            )
        if ca.grid != cb.grid:
            raise WorkbenchError(
                f"circuits on different head grids ({ca.grid} vs {cb.grid})",
                "compare models with the same number of layers and heads",
            )
    ha, hb = _heads_of(a, names[0]), _heads_of(b, names[1])
    if n_total_heads is None:
        if grid is None:
            raise WorkbenchError("n_total_heads is unknown for plain head sets", "pass it")
        n_total_heads = grid[0] * grid[1]
    n = int(n_total_heads)
    for which, h in zip(names, (ha, hb), strict=True):
        if len(h) > n:
            raise WorkbenchError(
                f"circuit {which} has {len(h)} heads, more than the model's {n}",
                "pass the right n_total_heads",
            )
    n_heads_per_layer = grid[1] if grid else None
    if grid is not None and any(
        not (0 <= x.layer < grid[0] and 0 <= x.head < grid[1]) for x in ha | hb
    ):
        raise WorkbenchError(f"a head lies outside the {grid[0]} x {grid[1]} grid", "fix the heads")
    if n_permutations < 0:
        raise WorkbenchError("n_permutations must be >= 0", "pass 10000, say")
    inter = ha & hb
    x = len(inter)
    rho, rho_n = float("nan"), 0
    if scores_a is not None and scores_b is not None:
        rho, rho_n = spearman(_vector(scores_a, grid, n), _vector(scores_b, grid, n))
    if n_heads_per_layer is not None:
        a_idx = np.array([h.layer * n_heads_per_layer + h.head for h in ha])
    else:  # plain sets: any injective labelling of the heads will do
        labels = {h: i for i, h in enumerate(sorted(ha | hb))}
        a_idx = np.array([labels[h] for h in ha])
    p_perm = (
        permutation_p(a_idx, len(hb), n, x, n_permutations, seed)
        if n_permutations
        else float("nan")
    )
    return OverlapResult(
        name_a=names[0],
        name_b=names[1],
        size_a=len(ha),
        size_b=len(hb),
        intersection=x,
        share_a=x / len(ha),
        share_b=x / len(hb),
        jaccard=x / len(ha | hb),
        overlap_coefficient=x / min(len(ha), len(hb)),
        spearman=rho,
        spearman_n=rho_n,
        expected_intersection=len(ha) * len(hb) / n,
        p_hypergeometric=hypergeom_sf(x, n, len(ha), len(hb)),
        p_permutation=p_perm,
        n_permutations=n_permutations,
        n_total_heads=n,
        shared=tuple(sorted(inter)),
    )


@dataclass(frozen=True)
class OverlapMatrix:
    """Pairwise overlaps of several named circuits; ``table`` (one row per pair),
    ``matrix(stat)`` and ``figure(stat)``."""

    names: tuple[str, ...]
    results: tuple[OverlapResult, ...]

    @property
    def table(self) -> pd.DataFrame:
        import pandas as pd

        return pd.concat([r.table for r in self.results], ignore_index=True)

    def matrix(self, stat: str = "jaccard") -> pd.DataFrame:
        import pandas as pd

        m = pd.DataFrame(np.nan, index=list(self.names), columns=list(self.names))
        for r in self.results:
            v = float(getattr(r, stat))
            # for the asymmetric shares the row is the circuit whose share is given
            m.loc[r.name_a, r.name_b] = v
            m.loc[r.name_b, r.name_a] = float(getattr(r, _mirror(stat)))
        for n in self.names:
            m.loc[n, n] = 1.0 if stat in _UNIT_DIAGONAL else np.nan
        return m

    def figure(self, stat: str = "jaccard") -> go.Figure:
        import plotly.graph_objects as go

        m = self.matrix(stat)
        fig = go.Figure(
            go.Heatmap(
                z=m.values,
                x=list(m.columns),
                y=list(m.index),
                colorscale="Viridis",
                hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
                colorbar={"title": stat},
            )
        )
        fig.update_layout(title=f"circuit overlap: {stat}", yaxis={"autorange": "reversed"})
        return fig


_UNIT_DIAGONAL = {"jaccard", "share_a", "share_b", "overlap_coefficient", "spearman"}


def _mirror(stat: str) -> str:
    return {"share_a": "share_b", "share_b": "share_a"}.get(stat, stat)


def overlap_matrix(
    circuits: Mapping[str, Circuit],
    *,
    scores: Mapping[str, Any] | None = None,
    n_permutations: int = 10000,
    seed: int = 0,
    allow_cross_model: bool = False,
) -> OverlapMatrix:
    """:func:`overlap` of every pair of ``circuits`` (names as given)."""
    names = tuple(circuits)
    scores = scores or {}
    results = []
    for i, na in enumerate(names):
        for nb in names[i + 1 :]:
            results.append(
                overlap(
                    circuits[na],
                    circuits[nb],
                    scores_a=scores.get(na),
                    scores_b=scores.get(nb),
                    n_permutations=n_permutations,
                    seed=seed,
                    names=(na, nb),
                    allow_cross_model=allow_cross_model,
                )
            )
    return OverlapMatrix(names, tuple(results))

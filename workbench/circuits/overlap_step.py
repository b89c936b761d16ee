"""The ``[overlap]`` step of a spec: circuits from the spec's runs, and their overlap table.

```toml
[overlap]
rule = "top_share"          # top_k | threshold | top_share: the same rule for every circuit
share = 0.05                # (k = ... for top_k, threshold = ... for threshold)
absolute = true             # rank heads by |score| (patching effects of either sign)
n_permutations = 10000
seed = 0
circuits = { ioi = "activation_patching@ioi", induction = "head_detectors.induction@induction" }
pairs = [["ioi", "induction"]]   # default: every pair
```

A circuit selector is ``analysis[.metric]@task``; it names the one part of the spec (per model)
with that analysis and task (the metric defaults to the run's first). With ``absolute``, the
rank correlation is taken over ``|score|`` too (importance, whatever the sign).

``workbench overlap SPEC`` runs the spec (stored parts are read back), derives every circuit
per model, stores it (:func:`workbench.circuits.save_circuit`) and prints the overlap table.
Torch-free when every part is stored.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.circuits import derive_circuit, run_scores, save_circuit
from workbench.circuits.overlap import OverlapMatrix, OverlapResult, overlap
from workbench.errors import WorkbenchError
from workbench.types import Circuit

if TYPE_CHECKING:
    from workbench.spec import PartOutcome, Spec
    from workbench.store import ResultStore

_KEYS = {
    "rule",
    "k",
    "share",
    "threshold",
    "absolute",
    "n_permutations",
    "seed",
    "circuits",
    "pairs",
}


@dataclass(frozen=True)
class OverlapStep:
    rule: str
    circuits: dict[str, str]
    pairs: tuple[tuple[str, str], ...]
    k: int | None = None
    share: float | None = None
    threshold: float | None = None
    absolute: bool = False
    n_permutations: int = 10000
    seed: int = 0


@dataclass
class OverlapReport:
    """Per model: the circuits, their stored run ids and the pairwise overlap results."""

    circuits: dict[str, dict[str, Circuit]] = field(default_factory=dict)
    circuit_runs: dict[str, dict[str, str]] = field(default_factory=dict)
    results: dict[str, OverlapMatrix] = field(default_factory=dict)

    @property
    def table(self) -> Any:
        import pandas as pd

        frames = [m.table.assign(model=model) for model, m in self.results.items()]
        return pd.concat(frames, ignore_index=True)


def load_step(path: str | Path) -> OverlapStep:
    """The ``[overlap]`` table of a spec file, validated."""
    data = tomllib.loads(Path(path).read_text())
    raw = data.get("overlap")
    if not isinstance(raw, dict):
        raise WorkbenchError(
            f"{path} has no [overlap] table", "add one (see workbench.circuits.overlap_step)"
        )
    extra = sorted(set(raw) - _KEYS)
    if extra:
        raise WorkbenchError(
            f"{path} [overlap]: unknown key(s) {', '.join(extra)}",
            f"allowed keys: {', '.join(sorted(_KEYS))}",
        )
    circuits = raw.get("circuits")
    if not isinstance(circuits, dict) or len(circuits) < 2:
        raise WorkbenchError(
            f"{path} [overlap]: circuits must name at least two selectors",
            'write circuits = { a = "analysis@task", b = "analysis.metric@task" }',
        )
    names = list(circuits)
    pairs_raw = raw.get("pairs", [[a, b] for i, a in enumerate(names) for b in names[i + 1 :]])
    pairs = []
    for p in pairs_raw:
        if not (isinstance(p, list) and len(p) == 2 and all(x in circuits for x in p)):
            raise WorkbenchError(
                f"{path} [overlap]: bad pair {p!r}", f"pairs of circuit names: {', '.join(names)}"
            )
        pairs.append((str(p[0]), str(p[1])))
    return OverlapStep(
        rule=str(raw.get("rule", "top_k")),
        circuits={str(n): str(s) for n, s in circuits.items()},
        pairs=tuple(pairs),
        k=raw.get("k"),
        share=raw.get("share"),
        threshold=raw.get("threshold"),
        absolute=bool(raw.get("absolute", False)),
        n_permutations=int(raw.get("n_permutations", 10000)),
        seed=int(raw.get("seed", 0)),
    )


def _parse_selector(sel: str) -> tuple[str, str | None, str]:
    head, sep, task = sel.partition("@")
    if not sep or not head or not task:
        raise WorkbenchError(f"bad circuit selector '{sel}'", 'write "analysis[.metric]@task"')
    analysis, _, metric = head.partition(".")
    return analysis, metric or None, task


def _find_run(outcomes: list[PartOutcome], model: str, sel: str) -> tuple[str, str | None]:
    analysis, metric, task = _parse_selector(sel)
    hits = [
        o.run_id
        for o in outcomes
        if o.request.model == model
        and o.request.analysis == analysis
        and o.part.task == task  # resolved: the request's task or the entry's default
    ]
    if len(hits) != 1:
        raise WorkbenchError(
            f"circuit selector '{sel}' matches {len(hits)} parts of the spec for {model}",
            "name exactly one part (analysis and task)",
        )
    return hits[0], metric


def run_overlap_step(
    spec: Spec, step: OverlapStep, outcomes: list[PartOutcome], store: ResultStore
) -> OverlapReport:
    """Derive the circuits of every model of the spec and their pairwise overlaps."""
    report = OverlapReport()
    models = list(dict.fromkeys(o.request.model for o in outcomes))
    for model in models:
        circuits: dict[str, Circuit] = {}
        scores: dict[str, Any] = {}
        runs: dict[str, str] = {}
        for name, sel in step.circuits.items():
            run_id, metric = _find_run(outcomes, model, sel)
            c = derive_circuit(
                store,
                run_id,
                step.rule,
                metric=metric,
                k=step.k,
                threshold=step.threshold,
                share=step.share,
                absolute=step.absolute,
                role=name,
            )
            mat, _ = run_scores(store, run_id, metric)
            circuits[name], scores[name] = c, np.abs(mat) if step.absolute else mat
            runs[name] = save_circuit(store, c, mat)
        results: list[OverlapResult] = [
            overlap(
                circuits[a],
                circuits[b],
                scores_a=scores[a],
                scores_b=scores[b],
                n_permutations=step.n_permutations,
                seed=step.seed,
                names=(a, b),
            )
            for a, b in step.pairs
        ]
        report.circuits[model] = circuits
        report.circuit_runs[model] = runs
        report.results[model] = OverlapMatrix(tuple(circuits), tuple(results))
    return report


TABLE_COLUMNS = (
    "name_a",
    "name_b",
    "size_a",
    "size_b",
    "intersection",
    "expected_intersection",
    "share_a",
    "share_b",
    "jaccard",
    "overlap_coefficient",
    "spearman",
    "p_hypergeometric",
    "p_permutation",
)

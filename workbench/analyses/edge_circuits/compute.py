"""Edge circuits on a prompt-pair task: scores, circuits, faithfulness panel, exact check.

1. Scores of every edge of the GQA-native graph (:mod:`workbench.edges`) by each method: EAP and
   EAP-IG with ``steps = m`` (one meaning: the metric's change when that edge alone carries the
   corrupted value; ``|score|`` ranks).
2. Circuits of each requested size by ``rule`` (top-n or greedy from the logits), pruned of
   dangling edges (:mod:`workbench.edges.circuit`), and the same for ``n_random`` random
   orderings of the edges.
3. Faithfulness curves for every ablation x direction (:mod:`workbench.edges.faithfulness`):
   ``f = (M(C) - M(empty)) / (M(full) - M(empty))`` with bootstrap intervals over prompts, KL to
   the clean run; summaries MIB's CPR / CMD and auto-circuit's log-x area over random orderings.
4. Exact patching (:mod:`workbench.edges.exact`) of each method's top ``n_exact`` edges and
   ``n_exact`` random edges: Spearman and Pearson of estimate against exact per set; the
   edges where the two disagree most are flagged (largest ``|estimate - exact|``, top 10 per
   method and set).
5. The chosen circuit per method: the smallest of the curve from which every larger one has
   ``ablate_complement`` faithfulness >= ``threshold`` under the first ablation; its
   node-collapsed heads are overlapped with a stored head circuit when ``heads_run`` is given.

Per-head metrics for the atlas: ``{method}_out`` = the sum of ``|score|`` over the edges a head
sends. Every curve and summary row names the ablation and direction its numbers used.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.analyses.edge_circuits import EdgeCircuitsParams, split_list
from workbench.edges import eap_ig_scores, eap_scores, edge_graph, exact_edge_patching
from workbench.edges.ablate import EdgeAblator
from workbench.edges.circuit import (
    EdgeCircuit,
    check_size,
    circuit_from_scores,
    full_scores,
    size_grid,
)
from workbench.edges.common import EdgeScores
from workbench.edges.faithfulness import Ordering, curve_rows, summaries
from workbench.edges.graph import EdgeGraph, describe
from workbench.stats import pearson, spearman
from workbench.types import AnalysisOutput, Head, HeadMetric

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet

FLAGGED = 10


def _sizes(graph: EdgeGraph, params: EdgeCircuitsParams) -> list[int]:
    if split_list(params.sizes):
        sizes = sorted({int(s) for s in split_list(params.sizes)})
        for s in sizes:
            check_size(graph, s)
        return sizes
    return size_grid(len(graph), [float(f) for f in split_list(params.fractions)])


def _score(model: LoadedModel, prompts: PromptSet, p: EdgeCircuitsParams) -> dict[str, EdgeScores]:
    out: dict[str, EdgeScores] = {}
    for method in split_list(p.methods):
        if method == "eap":
            out[method] = eap_scores(model, prompts, metric=p.metric, batch_size=p.batch_size)
        else:
            out[method] = eap_ig_scores(
                model, prompts, steps=p.steps, metric=p.metric, batch_size=p.batch_size
            )
    return out


def _exact_check(
    model: LoadedModel,
    prompts: PromptSet,
    scores: dict[str, EdgeScores],
    p: EdgeCircuitsParams,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Exact patching of each method's top and random ``n_exact`` edges and the named
    ``edges``; per-edge rows and per (method, set) agreement."""
    graph = next(iter(scores.values())).graph
    extra = [graph.position(e) for e in split_list(p.edges)]  # one-line errors for bad names
    sets: dict[tuple[str, str], list[int]] = {}
    k = min(p.n_exact, len(graph))
    for method, s in scores.items():
        if k:
            order = np.argsort(-np.abs(full_scores(s)), kind="stable")
            sets[(method, "top")] = [int(i) for i in order[:k]]
            sets[(method, "random")] = [int(i) for i in rng.choice(len(graph), k, replace=False)]
        if extra:
            sets[(method, "named")] = extra
    chosen = sorted({i for v in sets.values() for i in v})
    if not chosen:
        return pd.DataFrame(), pd.DataFrame(), 0.0
    t = time.perf_counter()
    exact = exact_edge_patching(model, prompts, [graph.edges[i] for i in chosen], metric=p.metric)
    took = time.perf_counter() - t
    value = dict(zip(chosen, exact.scores.tolist(), strict=True))
    rows, agree = [], []
    for (method, which), positions in sets.items():
        est = full_scores(scores[method])[positions]
        ex = np.asarray([value[i] for i in positions])
        diff = np.abs(est - ex)
        flagged = set(np.argsort(-diff, kind="stable")[:FLAGGED].tolist())
        for j, (info, e, x) in enumerate(zip(describe(graph, positions), est, ex, strict=True)):
            rows.append(dict(**info, method=method, set=which, estimate=float(e), exact=float(x),
                             abs_diff=float(diff[j]), flagged=j in flagged))  # fmt: skip
        rho, _ = spearman(est, ex)
        agree.append(dict(method=method, set=which, n=len(positions), spearman=rho,
                          pearson=pearson(est, ex), max_abs_diff=float(diff.max()),
                          sign_agreement=float(np.mean(np.sign(est) == np.sign(ex)))))  # fmt: skip
    return pd.DataFrame(rows), pd.DataFrame(agree), took


def _head_out(graph: EdgeGraph, scores: np.ndarray) -> np.ndarray:
    """``[n_layers, n_heads]``: the sum of ``|score|`` over the edges each head sends."""
    out = np.zeros((graph.n_layers, graph.n_heads))
    a = np.nan_to_num(np.abs(scores))
    for edge, v in zip(graph.edges, a, strict=True):
        if edge.sender.kind == "head":
            out[edge.sender.layer, edge.sender.head] += v
    return out


def _chosen(
    curves: pd.DataFrame, orderings: dict[str, Ordering], p: EdgeCircuitsParams, first: str
) -> dict[str, EdgeCircuit]:
    out: dict[str, EdgeCircuit] = {}
    for name, o in orderings.items():
        if o.random:
            continue
        rows = curves[(curves.ordering == name) & (curves.ablation == first)
                      & (curves.direction == "ablate_complement")]  # fmt: skip
        rows = rows.sort_values("n_requested")
        good = (rows.faithfulness >= p.threshold).to_numpy()
        stay = [i for i in range(len(good)) if good[i:].all()]  # curves need not be monotone
        pick = o.circuits[-1]
        if stay:
            requested = int(rows.iloc[stay[0]].n_requested)
            pick = next(c for c in o.circuits if c.requested == requested)
        out[name] = pick
    return out


def _overlaps(
    chosen: dict[str, EdgeCircuit], head_circuit: dict[str, Any] | None, grid: tuple[int, int]
) -> pd.DataFrame:
    if not head_circuit:
        return pd.DataFrame()
    from workbench.circuits.overlap import overlap
    from workbench.circuits.rules import select_heads

    rows = []
    for method, c in chosen.items():
        mine = c.heads()
        if not mine:
            continue
        if "heads" in head_circuit:
            theirs = [Head(*map(int, h[1:].split("H"))) for h in head_circuit["heads"]]
        else:
            matrix = np.asarray(head_circuit["scores"], dtype=float)
            theirs = select_heads(matrix, rule="top_k", k=len(mine), absolute=True)
        res = overlap(mine, theirs, n_total_heads=grid[0] * grid[1],
                      names=(f"{method} edges", head_circuit["name"]))  # fmt: skip
        rows.append(dict(method=method, other=head_circuit["name"], **res.table.iloc[0].to_dict()))
    return pd.DataFrame(rows)


def edge_circuits(
    model: LoadedModel,
    prompts: PromptSet,
    params: EdgeCircuitsParams,
    head_circuit: dict[str, Any] | None = None,
) -> AnalysisOutput:
    """Scores, circuits, faithfulness panel and exact check (module docstring)."""
    p = params
    graph = edge_graph(model)
    sizes = _sizes(graph, p)
    ablations, directions = split_list(p.ablations), split_list(p.directions)
    rng = np.random.default_rng(p.seed)
    for name in split_list(p.edges):  # bad names fail before anything is computed
        graph.position(name)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    scores = _score(model, prompts, p)
    timings["scores_s"] = time.perf_counter() - t
    orderings: dict[str, Ordering] = {}
    for method, s in scores.items():
        full = full_scores(s)
        circuits = tuple(circuit_from_scores(graph, full, n, rule=p.rule, method=method)
                         for n in sizes)  # fmt: skip
        orderings[method] = Ordering(method, circuits)
    for i in range(p.n_random):
        r = rng.random(len(graph))
        circuits = tuple(circuit_from_scores(graph, r, n, rule=p.rule, method=f"random-{i}")
                         for n in sizes)  # fmt: skip
        orderings[f"random-{i}"] = Ordering(f"random-{i}", circuits, random=True)
    t = time.perf_counter()
    ablator = EdgeAblator(model, prompts, metric=p.metric, batch_tokens=p.batch_tokens)
    rows = curve_rows(ablator, list(orderings.values()), ablations, directions,
                      n_boot=p.n_boot, seed=p.seed, random_panel=p.random_panel)  # fmt: skip
    timings["curves_s"] = time.perf_counter() - t
    curves = pd.DataFrame(rows)
    summary = pd.DataFrame(summaries(rows, list(orderings.values())))
    exact_rows, agreement, timings["exact_s"] = _exact_check(model, prompts, scores, p, rng)
    chosen = _chosen(curves, orderings, p, ablations[0])

    edges = pd.DataFrame(describe(graph, range(len(graph))))
    for method, s in scores.items():
        edges[method] = full_scores(s)
        se = np.full(len(graph), np.nan)
        se[s.edges] = s.stderr
        edges[f"{method}_stderr"] = se
        mask = chosen[method].mask()
        edges[f"{method}_in_circuit"] = mask
    circuit_rows = []
    for method, c in chosen.items():
        for info in describe(graph, sorted(c.edges)):
            circuit_rows.append(dict(method=method, **info, score=float(edges.loc[
                graph.position(info["edge"]), method])))  # fmt: skip
    head_metrics = {
        f"{method}_out": HeadMetric(_head_out(graph, full_scores(s)), None, prompts.n)
        for method, s in scores.items()
    }
    first = next(iter(scores.values()))
    tables = {
        "edges": edges,
        "curves": curves,
        "summary": summary,
        "circuit": pd.DataFrame(circuit_rows),
        "exact_check": exact_rows,
        "exact_agreement": agreement,
        "overlap": _overlaps(chosen, head_circuit, (graph.n_layers, graph.n_heads)),
    }
    info = {
        "graph": graph.counts(),
        "grid": [graph.n_layers, graph.n_heads, graph.n_kv_heads],
        "sizes": sizes,
        "rule": p.rule,
        "ablations": ablations,
        "directions": directions,
        "first_ablation": ablations[0],
        "clean_metric": first.info.get("clean_metric"),
        "corrupt_metric": first.info.get("corrupt_metric"),
        "chosen": {
            m: {
                "n_edges": len(c),
                "requested": c.requested,
                "heads": sorted(str(h) for h in c.heads()),
            }
            for m, c in chosen.items()
        },
        "timings": timings,
        "n_prompts": prompts.n,
    }
    return AnalysisOutput(
        head_metrics=head_metrics,
        tables={k: v for k, v in tables.items() if len(v)},
        info=info,
    )

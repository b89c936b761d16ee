"""Edge circuits: pruning and greedy selection, the ablated forward (against the clean, the
corrupted and the exact-patching runs), faithfulness and its summaries, and the
``edge_circuits`` analysis through the runner (tables, bad input, nothing stored)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench.edges import build_graph, edge_graph, exact_edge_patching
from workbench.edges.ablate import EdgeAblator
from workbench.edges.circuit import (
    circuit_from_scores,
    from_names,
    greedy,
    prune,
    receiver_components,
    size_grid,
    top_n,
)
from workbench.edges.faithfulness import cpr_cmd, faithfulness_ratio, log_area
from workbench.errors import WorkbenchError
from workbench.runner import run_analysis
from workbench.tasks import build_task
from workbench.types import Head

SMALL = {"n_exact": 10, "n_boot": 50, "n_random": 2, "fractions": "0.05,0.2,0.5,1"}


def _positions(graph, names):
    return {graph.position(n) for n in names}


# ---------------------------------------------------------------- circuits


def test_prune_keeps_paths_from_the_embedding_to_the_logits():
    g = build_graph(2, 4, 2)
    path = ["embed->L0H1.q", "L0H1->L1H2.q", "L1H2->logits"]
    dangling = [
        "L0H3->L1H0.q",  # L1H0 sends nothing on: not used
        "L0H2->logits",  # L0H2 reads nothing: not fed
        "L1.mlp->logits",  # nothing feeds L1.mlp
    ]
    kept = prune(g, _positions(g, path + dangling))
    assert kept == _positions(g, path)
    assert prune(g, kept) == kept  # a fixed point


def test_a_kv_edge_feeds_every_query_head_of_its_group():
    g = build_graph(2, 4, 2)
    kv = g.receivers[g.receiver_index[g.position("embed->L1KV1.k")]]
    assert receiver_components(g, kv) == (("head", 1, 2), ("head", 1, 3))
    edges = ["embed->L1KV1.k", "L1H3->logits"]  # the key of KV head 1 feeds head 3
    assert prune(g, _positions(g, edges)) == _positions(g, edges)
    wrong = ["embed->L1KV0.k", "L1H3->logits"]  # KV head 0 serves heads 0 and 1 only
    assert prune(g, _positions(g, wrong)) == frozenset()


def test_top_n_and_greedy():
    g = build_graph(2, 4, 2)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=len(g))
    assert top_n(g, scores, 5) == list(np.argsort(-np.abs(scores), kind="stable")[:5])
    order = greedy(g, scores, 20)
    assert g.edges[order[0]].receiver.kind == "logits"
    present = {("logits", -1, -1)}
    for i in order:  # every edge added reads into a component already in the circuit
        e = g.edges[i]
        assert set(receiver_components(g, e.receiver)) & present
        present.add((e.sender.kind, e.sender.layer, e.sender.head))
    c = circuit_from_scores(g, scores, 20, rule="greedy")
    assert c.edges <= set(order) and c.requested == 20
    assert all(isinstance(h, Head) for h in c.heads())


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda g: top_n(g, np.zeros(len(g)), len(g) + 1), "outside the graph's 0..82"),
        (lambda g: size_grid(len(g), [1.5]), "outside (0, 1]"),
        (lambda g: circuit_from_scores(g, np.zeros(len(g)), 3, rule="best"), "unknown circuit"),
        (lambda g: from_names(g, ["L1H0->L0H1.q"]), "runs backwards"),
        (lambda g: from_names(g, ["L9H0->logits"]), "no L9H0"),
    ],
)
def test_bad_circuit_input_is_one_line(call, fragment):
    with pytest.raises(WorkbenchError) as info:
        call(build_graph(2, 4, 2))
    assert fragment in str(info.value) and "\n" not in str(info.value) and info.value.fix


# ---------------------------------------------------------------- the ablated forward


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_ablated_runs_match_clean_corrupted_and_exact_patching(load, name):
    """No edge ablated is the clean run; every edge ablated (corrupted) is the corrupted run;
    one edge ablated is exact edge patching of that edge."""
    model = load(name)
    ps = build_task("ioi", model.codec, {"n_prompts": 4})
    g = edge_graph(model)
    ablator = EdgeAblator(model, ps)
    none = np.zeros(len(g), dtype=bool)
    values, kl = ablator.run(np.stack([none, ~none]), "corrupted")
    scale = max(1.0, float(np.abs(ablator.clean_metric).max()))
    assert np.abs(values[0] - ablator.clean_metric.numpy()).max() <= 1e-5 * scale
    assert np.abs(values[1] - ablator.corrupt_metric.numpy()).max() <= 1e-5 * scale
    assert kl[0].max() <= 1e-5
    pick = np.random.default_rng(1).choice(len(g), 10, replace=False)
    masks = np.zeros((10, len(g)), dtype=bool)
    masks[np.arange(10), pick] = True
    single, _ = ablator.run(masks, "corrupted")
    exact = exact_edge_patching(model, ps, [g.edges[i] for i in pick])
    mine = (single - ablator.clean_metric.numpy()[None]).mean(1)
    assert np.abs(mine - exact.scores).max() <= 1e-5 * scale


def test_zero_and_mean_ablations_of_every_edge(load):
    """Zeroing every edge leaves the logits reading nothing but the final norm of 0: equal
    logits, logit difference 0; mean ablations replace each prompt's inputs by the mean."""
    model = load("tiny-llama")
    ps = build_task("ioi", model.codec, {"n_prompts": 4})
    ablator = EdgeAblator(model, ps)
    every = np.ones(len(edge_graph(model)), dtype=bool)
    zero, _ = ablator.run(every, "zero")
    assert np.abs(zero).max() <= 1e-6
    mean, _ = ablator.run(every, "mean_clean")
    assert np.ptp(mean) > 0  # the answers differ per prompt; the inputs do not
    with pytest.raises(WorkbenchError, match="unknown ablation"):
        ablator.run(every, "resample_all")


# ---------------------------------------------------------------- faithfulness numbers


def test_faithfulness_and_summaries_by_hand():
    full, empty = np.array([2.0, 4.0]), np.array([0.0, 0.0])
    assert faithfulness_ratio(np.array([1.5, 1.5]), full, empty) == pytest.approx(0.5)
    assert math.isnan(faithfulness_ratio(full, full, full))
    cpr, cmd = cpr_cmd([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
    assert cpr == pytest.approx(0.75) and cmd == pytest.approx(0.25)
    # auto-circuit: log10 x, metric minus its 0-edge value, segments touching 0 skipped
    area = log_area([0, 1, 10, 100], [1.0, 2.0, 3.0, 3.0], at_zero=1.0)
    assert area == pytest.approx(1 * (1 + 2) / 2 + 1 * (2 + 2) / 2)
    # a non-monotone curve: first reaching 0.8 is not staying there
    from workbench.edges.faithfulness import Ordering, summaries

    rows = [dict(ordering="baseline", ablation="corrupted", direction=d, metric=m)
            for d, m in (("full", 1.0), ("empty", 0.0))]  # fmt: skip
    for n, f in zip([1, 10, 100, 1000, 10000], [0.0, 0.9, 0.5, 0.85, 1.0], strict=True):
        rows.append(dict(ordering="eap", ablation="corrupted", direction="ablate_complement",
                         n_requested=n, n_edges=n, fraction=n / 10000, metric=f,
                         faithfulness=f))  # fmt: skip
    (row,) = summaries(rows, [Ordering("eap", ())])
    assert row["edges_to_08"] == 10 and row["edges_stay_08"] == 1000


# ---------------------------------------------------------------- the analysis


def test_edge_circuits_through_the_runner(load, store):
    model = load("tiny-llama")
    res = run_analysis("edge_circuits", model, "ioi", task_params={"n_prompts": 4}, store=store,
                       params=SMALL)  # fmt: skip
    t = res.tables
    assert {"edges", "curves", "summary", "circuit", "exact_check", "exact_agreement"} <= set(t)
    assert len(t["edges"]) == len(edge_graph(model))
    curves = t["curves"]
    # every number names its ablation and direction; the full graph is faithful by definition
    assert set(curves.ablation) == {"corrupted", "mean_clean", "mean_corrupt", "zero"}
    assert set(curves.direction) >= {"ablate_complement", "ablate_circuit", "full", "empty"}
    whole = curves[(curves.n_edges == len(t["edges"])) & (curves.direction == "ablate_complement")]
    assert np.allclose(whole.faithfulness, 1.0)
    removed = curves[(curves.n_edges == len(t["edges"])) & (curves.direction == "ablate_circuit")]
    assert np.allclose(removed.faithfulness, 0.0, atol=1e-6)
    assert {"cpr", "cmd", "log_area", "vs_random", "edges_stay_08"} <= set(t["summary"].columns)
    assert set(t["exact_agreement"].set) == {"top", "random"}
    assert set(res.info["chosen"]) == {"eap", "eap_ig"}
    assert {"eap_out", "eap_ig_out"} <= set(res.metrics)


def test_edge_circuits_on_the_toy_induction_model(load, store):
    """The trained toy's known mechanism: EAP's strongest edge into the logits comes from the
    induction head L1H0; both methods' chosen circuits (faithfulness >= 0.8, corrupted, the
    complement ablated) hold it, and EAP-IG's holds the previous-token head L0H2 too and
    needs fewer edges than EAP's (Hanna et al. 2024's finding)."""
    toy = load("toy-induction")
    res = run_analysis("edge_circuits", toy, "induction", store=store,
                       task_params={"n_prompts": 8, "seq_len": 8},
                       params={**SMALL, "ablations": "corrupted"})  # fmt: skip
    edges = res.tables["edges"]
    into_logits = edges[edges.receiver == "logits"]
    assert into_logits.loc[into_logits["eap"].abs().idxmax(), "sender"] == "L1H0"
    chosen = res.info["chosen"]
    assert "L1H0" in chosen["eap"]["heads"]
    assert {"L0H2", "L1H0"} <= set(chosen["eap_ig"]["heads"])
    assert chosen["eap_ig"]["n_edges"] < chosen["eap"]["n_edges"]
    summary = res.tables["summary"].set_index(["ordering", "direction"])
    assert summary.loc[("eap_ig", "ablate_complement"), "cpr"] > summary.loc[
        ("random-0", "ablate_complement"), "cpr"]  # fmt: skip


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"sizes": "5,100000"}, "outside the graph's"),
        ({"edges": "L1H0->L0H1.q"}, "runs backwards"),
        ({"edges": "L0H0->L1H0.x"}, "unknown edge name"),
        ({"steps": 0}, "steps (EAP-IG's m) must be >= 1"),
        ({"ablations": "corrupted,resample"}, "unknown ablation 'resample'"),
        ({"fractions": "0.1,2"}, "outside (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_stores_nothing(load, store, params, fragment):
    model = load("tiny-llama")
    with pytest.raises(WorkbenchError) as info:
        run_analysis("edge_circuits", model, "ioi", task_params={"n_prompts": 2}, store=store,
                     params={**SMALL, **params})  # fmt: skip
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert len(store.list_runs()) == 0


def test_a_stored_run_exports_and_reimports_both_layouts(load, store, tmp_path):
    from workbench.edges import (
        export_run,
        from_auto_circuit,
        from_eap_ig_json,
        load_json,
        run_circuit,
        run_scores,
        save_json,
    )

    model = load("tiny-llama")
    res = run_analysis("edge_circuits", model, "ioi", task_params={"n_prompts": 4}, store=store,
                       params={**SMALL, "methods": "eap_ig", "ablations": "corrupted"})  # fmt: skip
    again = store.load(res.run_id)  # from disk, no model
    scores = run_scores(again, "eap_ig")
    assert np.allclose(scores.scores, res.tables["edges"]["eap_ig"])
    path = save_json(export_run(again, "eap_ig", "eap-ig"), tmp_path / "graph.json")
    back, in_graph = from_eap_ig_json(load_json(path), edge_graph(model))
    assert np.allclose([back[n] for n in scores.names()], scores.scores)
    assert in_graph == set(run_circuit(again, "eap_ig"))
    table = from_auto_circuit(export_run(again, "eap_ig", "auto-circuit"), edge_graph(model))
    assert np.allclose([table[n] for n in scores.names()], scores.scores)
    with pytest.raises(WorkbenchError, match="no 'eap' scores"):
        run_scores(again, "eap")
    with pytest.raises(WorkbenchError, match="unknown edge export format"):
        export_run(again, "eap_ig", "acdc")


def test_chosen_heads_overlap_a_stored_head_run(load, store):
    """Node-collapsed edge circuits against a per-head patching run, by the overlap statistics."""
    model = load("tiny-llama")
    tp = {"n_prompts": 4}
    heads = run_analysis("activation_patching", model, "ioi", task_params=tp, store=store)
    res = run_analysis("edge_circuits", model, "ioi", task_params=tp, store=store,
                       params={**SMALL, "ablations": "corrupted", "heads_run": heads.run_id,
                               "heads_metric": "logit_diff"})  # fmt: skip
    ov = res.tables["overlap"]
    assert set(ov.method) == {"eap", "eap_ig"}
    assert {"jaccard", "p_hypergeometric", "intersection"} <= set(ov.columns)
    for _, row in ov.iterrows():
        n = len(res.info["chosen"][row.method]["heads"])
        assert row.size_a == row.size_b == n and 0 <= row.jaccard <= 1


def test_the_package_exports_work_after_the_circuit_module_is_imported():
    """``workbench.edges.circuit`` is a module; the function is ``edge_circuit``."""
    import workbench.edges.circuit  # noqa: F401
    from workbench.edges import EdgeCircuit, EdgeScores, edge_circuit

    g = build_graph(2, 4, 2)
    scores = EdgeScores(g, np.arange(len(g)), np.random.default_rng(0).normal(size=(2, len(g))),
                        "eap", "logit_diff")  # fmt: skip
    c = edge_circuit(scores, 10, rule="greedy")
    assert isinstance(c, EdgeCircuit) and c.method == "eap" and len(c) <= 10

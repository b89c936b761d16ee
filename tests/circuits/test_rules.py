"""Circuits: the frozen type, derivation rules, JSON and store round trips, faithfulness."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from workbench.circuits import (
    circuit_from_dict,
    circuit_to_dict,
    derive_circuit,
    load_circuit,
    save_circuit,
    select_heads,
    union,
)
from workbench.errors import WorkbenchError
from workbench.types import MLP, Circuit, Derivation, Edge, Head, RunKey

SCORES = np.array(
    [
        [0.1, -0.9, np.nan],
        [0.5, 0.5, 0.2],
    ]
)


def test_circuit_is_frozen_hashable_and_a_set():
    d = Derivation("manual")
    a = Circuit.of("m", [Head(0, 1), Head(1, 0)], d, (2, 3), {Head(0, 1): "mover"})
    b = Circuit.of("m", {Head(1, 0), Head(0, 1)}, d, (2, 3), {Head(0, 1): "mover"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.model = "x"  # type: ignore[misc]
    assert a.heads & {Head(1, 0)} == {Head(1, 0)}
    assert a.role_map == {Head(0, 1): "mover"} and a.n_total_heads == 6
    mixed = Circuit.of("m", [MLP(1), Head(0, 0), Edge(Head(0, 0), MLP(1))], d, (2, 3))
    assert [str(c) for c in mixed.sorted_components()] == ["L0H0", "MLP1", "L0H0->MLP1"]
    assert mixed.heads == {Head(0, 0)}
    assert circuit_from_dict(json.loads(json.dumps(circuit_to_dict(mixed)))) == mixed


def test_rules_by_hand():
    assert select_heads(SCORES, "top_k", k=2) == [Head(1, 0), Head(1, 1)]  # tie: layer, head order
    assert select_heads(SCORES, "top_k", k=1, absolute=True) == [Head(0, 1)]
    assert select_heads(SCORES, "threshold", threshold=0.15) == [Head(1, 0), Head(1, 1), Head(1, 2)]
    # top_share: ceil(share * 5 scored heads); NaN is never chosen
    assert select_heads(SCORES, "top_share", share=0.4) == [Head(1, 0), Head(1, 1)]
    assert select_heads(SCORES, "top_share", share=0.01) == [Head(1, 0)]
    assert len(select_heads(SCORES, "top_share", share=1.0)) == 5
    with pytest.raises(WorkbenchError, match="k = 6 is larger than the number of heads scored"):
        select_heads(SCORES, "top_k", k=6)
    with pytest.raises(WorkbenchError, match="no head scores above"):
        select_heads(SCORES, "threshold", threshold=2.0)
    with pytest.raises(WorkbenchError, match="unknown circuit rule"):
        select_heads(SCORES, "best")
    with pytest.raises(WorkbenchError, match="0 < share"):
        select_heads(SCORES, "top_share", share=0)


def _stored_run(store, scores, task="ioi", model="m"):
    key = RunKey(
        model, f"fp-{model}", "activation_patching", {"component": "z"}, task, f"d-{task}", "t"
    )
    la, he = np.meshgrid(np.arange(scores.shape[0]), np.arange(scores.shape[1]), indexing="ij")
    df = pd.DataFrame(
        {
            "model": model,
            "run_id": key.run_id,
            "analysis": "activation_patching",
            "metric": "logit_diff",
            "layer": la.ravel(),
            "head": he.ravel(),
            "value": scores.ravel(),
        }
    )
    return store.put(key, {"heads": df}).run_id


def test_derive_save_load_and_union(store):
    rid = _stored_run(store, SCORES)
    c = derive_circuit(store, rid, "top_k", k=2, absolute=True)
    assert c.heads == {Head(0, 1), Head(1, 0)} and c.grid == (2, 3)
    assert c.derivation.source_run == rid and c.derivation.params == {"absolute": True, "k": 2}
    assert c.role_map[Head(0, 1)] == "logit_diff (ioi)"
    cid = save_circuit(store, c, SCORES)
    assert load_circuit(store, cid) == c
    assert save_circuit(store, c, SCORES) == cid  # same derivation, same stored run
    comp = store.get(cid).tables["components"]
    assert list(comp["component"]) == ["L0H1", "L1H0"] and comp["score"].tolist() == [-0.9, 0.5]
    with pytest.raises(WorkbenchError, match="not a circuit"):
        load_circuit(store, rid)
    rid2 = _stored_run(store, SCORES[::-1].copy(), task="colored_objects")
    c2 = derive_circuit(store, rid2, "top_k", k=1, role="stage 2")
    u = union([c, c2])
    assert u.heads == c.heads | c2.heads and u.derivation.rule == "union"
    assert u.role_map[Head(0, 0)] == "stage 2"
    other = derive_circuit(store, _stored_run(store, SCORES, model="m2"), "top_k", k=1)
    with pytest.raises(WorkbenchError, match="different models"):
        union([c, other])
    with pytest.raises(WorkbenchError, match="larger than the number of heads"):
        derive_circuit(store, rid, "top_k", k=7)


def test_minimal_faithful_bisection_equals_linear_scan(toy):
    from workbench.circuits.faithfulness import (
        baselines,
        circuit_metric,
        faithfulness,
        minimal_faithful,
    )
    from workbench.tasks import build_task

    prompts = build_task("induction", toy.codec, {"seq_len": 6, "n_prompts": 8})
    rng = np.random.default_rng(0)
    scores = rng.random((toy.n_layers, toy.n_heads))
    scores[1, 0] = 2.0  # the trained induction head first
    all_heads = [Head(la, h) for la in range(toy.n_layers) for h in range(toy.n_heads)]
    assert faithfulness(toy, prompts, all_heads) == pytest.approx(1.0, abs=1e-6)
    assert faithfulness(toy, prompts, []) == pytest.approx(0.0, abs=1e-6)
    base = baselines(toy, prompts)
    order = select_heads(scores, "top_k", k=8)
    curve = [base.faithfulness(circuit_metric(toy, prompts, order[:k])) for k in range(1, 9)]
    for share in (0.3, 0.9):
        res = minimal_faithful(toy, prompts, scores, share=share)
        # the slow reference: the first k of the linear scan that reaches the share (the
        # curve is monotone here, which the bisection assumes)
        linear = next(k for k, f in enumerate(curve, 1) if f >= share)
        if all(b >= a - 1e-9 for a, b in itertools.pairwise(curve)):
            assert res.k == linear
        assert res.faithfulness >= share and res.heads == tuple(order[: res.k])
        assert res.faithfulness == pytest.approx(curve[res.k - 1], abs=1e-9)
        assert len(res.curve) <= 6  # doubling + bisection, not a scan of 8
    with pytest.raises(WorkbenchError, match="share must be"):
        minimal_faithful(toy, prompts, scores, share=1.5)


def test_derive_minimal_faithful_from_store(toy, store):
    from workbench.circuits.faithfulness import derive_minimal_faithful
    from workbench.runner import run_analysis
    from workbench.tasks import build_task

    tp = {"seq_len": 6, "n_prompts": 8}
    r = run_analysis("head_detectors", toy, "induction", task_params=tp, store=store)
    prompts = build_task("induction", toy.codec, tp)
    c = derive_minimal_faithful(toy, prompts, store, r.run_id, metric="induction", share=0.5)
    assert Head(1, 0) in c.heads and c.faithfulness is not None and c.faithfulness >= 0.5
    assert c.derivation.rule == "minimal_faithful" and c.derivation.params["k"] == len(c.heads)
    assert load_circuit(store, save_circuit(store, c)) == c


def test_minimal_faithful_search_finds_the_first_crossing(monkeypatch):
    """The search on a synthetic, non-monotone faithfulness curve (no model): doubling finds
    the first k that reaches the share, where a bisection over [0, N] would jump past it."""
    from types import SimpleNamespace

    import workbench.circuits.faithfulness as cf

    curve = {0: 0.0, 1: 0.1, 2: 0.3, 3: 0.85, 4: 0.9, 5: 0.2, 6: 0.3, 7: 0.5, 8: 1.0}
    calls: list[int] = []

    def fake_metric(model, prompts, keep, *, reference="clean", reference_acts=None):
        calls.append(len(keep))
        return curve[len(keep)]

    monkeypatch.setattr(cf, "circuit_metric", fake_metric)
    monkeypatch.setattr(cf, "baselines", lambda *a, **k: cf.Baselines(1.0, 0.0))
    monkeypatch.setattr(cf, "reference_activations", lambda *a, **k: {})
    model = SimpleNamespace(n_layers=2, n_heads=4)
    scores = np.arange(8.0).reshape(2, 4)
    res = cf.minimal_faithful(model, None, scores, share=0.8)
    assert res.k == 3 and res.faithfulness == 0.85
    assert res.heads == (Head(1, 3), Head(1, 2), Head(1, 1))
    assert sorted(calls) == [1, 2, 3, 4]  # doubling 1, 2, 4, then bisection at 3
    assert cf.minimal_faithful(model, None, scores, share=0.95).k == 8
    monkeypatch.setitem(curve, 8, 0.5)
    with pytest.raises(WorkbenchError, match=r"even all 8 scored heads keep only 0\.500"):
        cf.minimal_faithful(model, None, scores, share=0.95)

"""Edge scores and circuits out to, and back from, EAP-IG's graph JSON and auto-circuit's
PruneScores table: round trips edge for edge, the layouts, GQA's K/V copies, one-line errors."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from workbench.edges import build_graph
from workbench.edges.common import EdgeScores
from workbench.edges.interop import (
    from_auto_circuit,
    from_eap_ig_json,
    load_json,
    save_json,
    to_auto_circuit,
    to_eap_ig_json,
)
from workbench.errors import WorkbenchError

EAP_NODE = r"(input|a\d+\.h\d+|m\d+)"
EAP_EDGE = re.compile(rf"{EAP_NODE}->(a\d+\.h\d+<[qkv]>|m\d+|logits)")


def _scores(shape=(2, 4, 2), edges=None, seed=0) -> EdgeScores:
    g = build_graph(*shape)
    idx = np.arange(len(g)) if edges is None else np.asarray(edges)
    pp = np.random.default_rng(seed).standard_normal((3, len(idx)))
    return EdgeScores(graph=g, edges=idx, per_prompt=pp, method="eap", metric="logit_diff")


def _one_line(info: pytest.ExceptionInfo[WorkbenchError]) -> str:
    assert "\n" not in str(info.value) and info.value.fix
    return str(info.value)


def _json(obj):
    return json.loads(json.dumps(obj))


# ---------------------------------------------------------------- EAP-IG


@pytest.mark.parametrize("shape", [(2, 4, 2), (2, 4, 4), (3, 4, 1)])
def test_eap_round_trip(shape, tmp_path):
    s = _scores(shape)
    circuit = ["embed->L0.mlp", "L0H3->logits", "L0.mlp->L1H2.q"]
    data = load_json(save_json(to_eap_ig_json(s, circuit), tmp_path / "g.json"))
    scores, inside = from_eap_ig_json(data, s.graph)
    assert scores == s.as_dict() and list(scores) == s.graph.names()
    assert inside == frozenset(circuit)


def test_eap_round_trip_partial_scores_and_kv_circuit():
    g = build_graph(2, 4, 2)
    some = [g.position(n) for n in ("embed->L0KV1.k", "L0H1->L1KV0.v", "L1.mlp->logits")]
    s = _scores(edges=some)
    data = to_eap_ig_json(s, circuit=["L0H1->L1KV0.v"])
    assert sum(not np.isnan(e["score"]) for e in data["edges"].values()) == 2 + 2 + 1
    scores, inside = from_eap_ig_json(_json(data), g)
    assert scores == s.as_dict() and inside == {"L0H1->L1KV0.v"}
    # the KV edge's copies are in-graph, and every node they touch
    assert [n for n, e in data["edges"].items() if e["in_graph"]] == [
        "a0.h1->a1.h0<v>",
        "a0.h1->a1.h1<v>",
    ]
    assert {n for n, v in data["nodes"].items() if v["in_graph"]} == {
        "a0.h1",
        "a1.h0",
        "a1.h1",
        "logits",
    }


def test_eap_layout_names_counts_and_kv_copies():
    s = _scores((2, 4, 2))
    g, ours = s.graph, s.as_dict()
    data = to_eap_ig_json(s, d_model=64)
    assert data["cfg"] == {
        "n_layers": 2,
        "n_heads": 4,
        "parallel_attn_mlp": False,
        "d_model": 64,
        "n_kv_heads": 2,
        "kv_grouped": True,
    }
    edges = data["edges"]
    assert len(edges) == g.counts()["ungrouped"] == 110
    assert all(EAP_EDGE.fullmatch(n) for n in edges)
    assert all(set(e) == {"score", "in_graph"} and not e["in_graph"] for e in edges.values())
    layer = [*(f"a{{}}.h{h}" for h in range(4)), "m{}"]
    nodes = ["input", *(n.format(0) for n in layer), *(n.format(1) for n in layer), "logits"]
    assert list(data["nodes"]) == nodes
    # eap's Graph.from_model order: per layer sender-major over heads and q, k, v
    first = ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->a0.h1<q>"]
    assert list(edges)[:4] == first
    assert list(edges)[-1] == "m1->logits"
    assert edges["input->m0"]["score"] == ours["embed->L0.mlp"]
    assert edges["a0.h1->m0"]["score"] == ours["L0H1->L0.mlp"]
    assert edges["m1->logits"]["score"] == ours["L1.mlp->logits"]
    assert edges["a0.h3->a1.h2<q>"]["score"] == ours["L0H3->L1H2.q"]
    for h in range(4):  # query heads 0, 1 share KV head 0; heads 2, 3 share KV head 1
        assert edges[f"m0->a1.h{h}<k>"]["score"] == ours[f"L0.mlp->L1KV{h // 2}.k"]
        assert edges[f"input->a0.h{h}<v>"]["score"] == ours[f"embed->L0KV{h // 2}.v"]
    assert edges["m0->a1.h0<k>"]["score"] != edges["m0->a1.h2<k>"]["score"]


def _ungrouped(data: dict) -> dict:
    """As a real EAP-IG run would write it: no kv_grouped flag, unequal per-query-head copies."""
    data = copy.deepcopy(data)
    data["cfg"] = {k: data["cfg"][k] for k in ("n_layers", "n_heads", "parallel_attn_mlp")}
    data["edges"]["input->a0.h0<k>"]["score"] = 1.0
    data["edges"]["input->a0.h1<k>"]["score"] = -3.0
    return data


def test_eap_ungrouped_file_needs_reduce():
    s = _scores((2, 4, 2))
    data = _ungrouped(to_eap_ig_json(s))
    with pytest.raises(WorkbenchError) as info:
        from_eap_ig_json(data, s.graph)
    assert "embed->L0KV0.k" in _one_line(info) and "not written from a grouped graph" in str(
        info.value
    )
    assert "reduce=" in str(info.value.fix)
    ours = s.as_dict()
    expect = {"sum": -2.0, "mean": -1.0, "max_abs": -3.0}
    for how, value in expect.items():
        scores, _ = from_eap_ig_json(data, s.graph, reduce=how)
        assert list(scores) == list(ours) and scores["embed->L0KV0.k"] == value
        for name, v in ours.items():  # the other copies are equal: sum gives the group's total
            if name != "embed->L0KV0.k":
                kv = name.endswith((".k", ".v"))
                assert scores[name] == (2 * v if how == "sum" and kv else v)
    # a file flagged kv_grouped is never reduced
    flagged = copy.deepcopy(data)
    flagged["cfg"].update(kv_grouped=True, n_kv_heads=2)
    with pytest.raises(WorkbenchError) as info:
        from_eap_ig_json(flagged, s.graph, reduce="sum")
    assert "kv_grouped" in _one_line(info)


def _edit(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    *keys, last = path.split("/")
    target = data
    for k in keys:
        target = target[k]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return data


def _add_edge(data: dict, name: str) -> dict:
    return _edit(data, f"edges/{name}", {"score": 0.5, "in_graph": False})


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: _edit(d, "cfg/n_layers", 12), "12 layers"),
        (lambda d: _edit(d, "cfg/n_heads", 8), "8 heads"),
        (lambda d: _edit(d, "cfg/n_kv_heads", 4), "4 KV heads"),
        (lambda d: _edit(d, "cfg/parallel_attn_mlp", True), "parallel"),
        (lambda d: _edit(d, "cfg/n_layers", KeyError), "n_layers"),
        (lambda d: _edit(d, "edges", KeyError), "'edges'"),
        (lambda d: _edit(d, "nodes", []), "'nodes'"),
        (lambda d: [d], "list"),
        (lambda d: _add_edge(d, "input->a0.h0"), "unknown EAP-IG edge name"),
        (lambda d: _add_edge(d, "input->m0<q>"), "unknown EAP-IG edge name"),
        (lambda d: _add_edge(d, "L0H1->L1H2.q"), "unknown EAP-IG edge name"),
        (lambda d: _add_edge(d, "logits->m1"), "unknown EAP-IG edge name"),
        (lambda d: _add_edge(d, "a0.h7->m1"), "not in this graph"),
        (lambda d: _add_edge(d, "m5->logits"), "not in this graph"),
        (lambda d: _add_edge(d, "a1.h0->a0.h1<q>"), "runs backwards"),
        (lambda d: _add_edge(d, "a0.h0->a0.h1<k>"), "runs backwards"),
        (lambda d: _add_edge(d, "m1->m0"), "runs backwards"),
        (lambda d: _add_edge(d, "m0->m0"), "runs backwards"),
        (lambda d: _edit(d, "nodes/a9.h0", {"in_graph": True}), "not in this graph"),
        (lambda d: _edit(d, "nodes/attn0", {"in_graph": True}), "unknown EAP-IG node"),
        (lambda d: _edit(d, "nodes/m0", True), "not an object"),
        (lambda d: _edit(d, "edges/input->m0/score", "0.1"), "numeric 'score'"),
        (lambda d: _edit(d, "edges/input->m0/score", None), "numeric 'score'"),
        (lambda d: _edit(d, "edges/input->m0/in_graph", 1), "in_graph"),
        (lambda d: _edit(d, "edges/input->m0", 0.3), "numeric 'score'"),
    ],
)
def test_eap_bad_input_one_line(mutate, needle):
    s = _scores((2, 4, 2))
    data = mutate(to_eap_ig_json(s))
    with pytest.raises(WorkbenchError) as info:
        from_eap_ig_json(data, s.graph)
    assert needle in _one_line(info)


def test_eap_bad_reduce_and_circuit():
    s = _scores()
    with pytest.raises(WorkbenchError) as info:
        from_eap_ig_json(to_eap_ig_json(s), s.graph, reduce="median")
    assert "reduce" in _one_line(info)
    with pytest.raises(WorkbenchError) as info:
        to_eap_ig_json(s, circuit=["L1H0->L0H1.q"])
    assert "backwards" in _one_line(info)
    with pytest.raises(WorkbenchError) as info:  # a file for the MHA graph into the GQA one
        from_eap_ig_json(to_eap_ig_json(_scores((2, 4, 4))), s.graph)
    assert "4 KV heads" in _one_line(info)


# ---------------------------------------------------------------- auto-circuit


def test_auto_circuit_shapes_and_names():
    s = _scores((2, 4, 2), edges=np.arange(70))  # the logits' and L1 MLP's edges unscored
    data = _json(to_auto_circuit(s))
    shapes = {k: np.asarray(v).shape for k, v in data["prune_scores"].items()}
    assert shapes == {
        "blocks.0.hook_q_input": (4, 1),
        "blocks.0.hook_k_input": (2, 1),
        "blocks.0.hook_v_input": (2, 1),
        "blocks.0.hook_mlp_in": (5,),
        "blocks.1.hook_q_input": (4, 6),
        "blocks.1.hook_k_input": (2, 6),
        "blocks.1.hook_v_input": (2, 6),
        "blocks.1.hook_mlp_in": (10,),
        "blocks.1.hook_resid_post": (11,),
    }
    assert data["src_nodes"]["blocks.1.hook_resid_post"] == [
        "Resid Start",
        *(f"A0.{h}" for h in range(4)),
        "MLP 0",
        *(f"A1.{h}" for h in range(4)),
        "MLP 1",
    ]
    assert data["src_nodes"]["blocks.0.hook_q_input"] == ["Resid Start"]
    ours = s.as_dict()
    table = data["prune_scores"]
    assert table["blocks.1.hook_k_input"][1][5] == ours["L0.mlp->L1KV1.k"]
    assert table["blocks.1.hook_q_input"][3][2] == ours["L0H1->L1H3.q"]
    assert table["blocks.0.hook_mlp_in"][4] == ours["L0H3->L0.mlp"]
    assert all(np.isnan(table["blocks.1.hook_resid_post"]))
    # one KV head (MQA): the module has a single destination, so no head axis
    mqa = to_auto_circuit(_scores((2, 4, 1)))["prune_scores"]
    assert np.asarray(mqa["blocks.1.hook_v_input"]).shape == (6,)
    assert np.asarray(mqa["blocks.1.hook_q_input"]).shape == (4, 6)


@pytest.mark.parametrize("shape", [(2, 4, 2), (2, 4, 4), (3, 4, 1)])
def test_auto_circuit_round_trip(shape, tmp_path):
    s = _scores(shape)
    data = load_json(save_json(to_auto_circuit(s), tmp_path / "ac.json"))
    assert from_auto_circuit(data, s.graph) == s.as_dict()
    assert from_auto_circuit(data["prune_scores"], s.graph) == s.as_dict()  # bare PruneScores
    part = _scores(shape, edges=[3, 40, 41, len(s.graph) - 1])
    assert from_auto_circuit(_json(to_auto_circuit(part)), s.graph) == part.as_dict()


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: _edit(d, "prune_scores/blocks.2.hook_q_input", [[0.0]] * 4), "unknown"),
        (lambda d: _edit(d, "prune_scores/blocks.0.hook_resid_post", [0.0] * 5), "unknown"),
        (lambda d: _edit(d, "prune_scores/blocks.0.attn.hook_q_input", [0.0]), "unknown"),
        (lambda d: _edit(d, "prune_scores/blocks.1.hook_k_input", [[0.0] * 6] * 4), "[4, 6]"),
        (lambda d: _edit(d, "prune_scores/blocks.0.hook_mlp_in", [0.0] * 6), "[6]"),
        (lambda d: _edit(d, "prune_scores/blocks.0.hook_mlp_in", [[0.0], [1.0, 2.0]]), "numeric"),
        (lambda d: _edit(d, "prune_scores/blocks.0.hook_mlp_in", "x"), "numeric"),
        (lambda d: _edit(d, "src_nodes/blocks.0.hook_mlp_in", ["embed"] * 5), "src_nodes"),
        (lambda d: _edit(d, "cfg/n_layers", 3), "(3, 4, 2)"),
        (lambda d: _edit(d, "cfg/n_kv_heads", 4), "(2, 4, 4)"),
        (lambda d: _edit(d, "prune_scores", [1.0]), "not an object"),
        (lambda d: 3.0, "float"),
    ],
)
def test_auto_circuit_bad_input_one_line(mutate, needle):
    s = _scores((2, 4, 2))
    data = mutate(to_auto_circuit(s))
    with pytest.raises(WorkbenchError) as info:
        from_auto_circuit(data, s.graph)
    assert needle in _one_line(info)


# ---------------------------------------------------------------- files


def test_save_json_atomic_and_load_errors(tmp_path):
    path = save_json({"a": [1.0, float("nan")]}, tmp_path / "sub" / "x.json")
    save_json({"a": [2.0]}, path)  # replaces
    assert load_json(path) == {"a": [2.0]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp file left
    with pytest.raises(TypeError):
        save_json({"a": object()}, path)
    assert load_json(path) == {"a": [2.0]} and len(list(path.parent.iterdir())) == 1
    (tmp_path / "bad.json").write_text("{nope")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(WorkbenchError) as info:
            load_json(bad)
        _one_line(info)


# ---------------------------------------------------------------- a real run


def test_tiny_llama_eap_round_trips(load):
    from workbench.edges import eap_scores, edge_graph
    from workbench.tasks import build_task

    model = load("tiny-llama")
    s = eap_scores(model, build_task("ioi", model.codec, {"n_prompts": 2}))
    g = edge_graph(model)
    assert g.n_kv_heads < g.n_heads
    circuit = [name for name, _ in s.top(6)]
    data = _json(to_eap_ig_json(s, circuit, d_model=model.bridge.cfg.d_model))
    assert len(data["edges"]) == g.counts()["ungrouped"]
    scores, inside = from_eap_ig_json(data, g)
    assert scores == s.as_dict() and inside == frozenset(circuit)
    assert from_auto_circuit(_json(to_auto_circuit(s)), g) == s.as_dict()

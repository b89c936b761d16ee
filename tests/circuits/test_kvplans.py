"""KV-cache plans (torch-free): the budget formula, the rules, JSON round trips, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from workbench.circuits.kvplans import build_plan, kv_scores
from workbench.errors import WorkbenchError
from workbench.forward.plan import KVPlan

GRID = (10, 5)  # 50 KV heads
RNG = np.random.default_rng(0)
IND = RNG.random(GRID)
ECHO = RNG.random(GRID)


def test_kv_fraction_is_the_per_kv_head_budget():
    all_full = KVPlan("m", GRID, frozenset((a, b) for a in range(10) for b in range(5)))
    assert all_full.kv_fraction(2048) == 1.0
    none = KVPlan("m", GRID, frozenset(), sink=4, window=60, compensation=True)
    assert none.kv_fraction(1000) == pytest.approx(65 / 1000)
    assert none.kv_fraction(50) == 1.0  # a context shorter than sink + window keeps everything
    two = KVPlan("m", GRID, frozenset({(0, 0), (3, 4)}), sink=4, window=60, compensation=False)
    assert two.kv_fraction(1000) == pytest.approx((2 * 1000 + 48 * 64) / (50 * 1000))


def test_razor_keeps_the_top_induction_and_echo_heads():
    plan = build_plan("m", "razor", {"induction": IND, "echo": ECHO})
    order_ind = sorted(((IND[h], h) for h in np.ndindex(GRID)), reverse=True)
    top_ind = {h for _, h in order_ind[: math.ceil(0.14 * 50)]}
    top_echo = max(np.ndindex(GRID), key=lambda h: ECHO[h])
    assert plan.full == frozenset(top_ind | {top_echo})
    assert plan.params == {"induction_share": 0.14, "echo_share": 0.01} and plan.rule == "razor"


def test_top_k_threshold_and_budget_rules():
    s = IND.copy()
    s[0, 0] = np.nan
    top3 = build_plan("m", "top_k", {"score": s}, k=3)
    assert len(top3.full) == 3 and (0, 0) not in top3.full
    third = sorted((s[h] for h in np.ndindex(GRID) if np.isfinite(s[h])), reverse=True)[2]
    assert all(s[h] >= third for h in top3.full)
    thr = build_plan("m", "threshold", {"score": s}, threshold=0.9)
    assert thr.full == frozenset(h for h in np.ndindex(GRID) if s[h] > 0.9)
    plan = build_plan("m", "budget", {"score": s}, budget=0.3, n_ctx=1024, window=60)
    assert plan.kv_fraction(1024) <= 0.3
    rest = [h for h in np.ndindex(GRID) if h not in plan.full and np.isfinite(s[h])]
    one_more = KVPlan("m", GRID, plan.full | {max(rest, key=lambda h: s[h])}, window=60)
    assert one_more.kv_fraction(1024) > 0.3  # the most heads the budget allows


def test_json_round_trip_and_content_id():
    plan = build_plan("m", "razor", {"induction": IND, "echo": ECHO}, sources=["run1"])
    again = KVPlan.from_dict(__import__("json").loads(plan.to_json()))
    assert again == plan and again.plan_id == plan.plan_id and again.sources == ("run1",)
    other = build_plan("m", "razor", {"induction": IND, "echo": ECHO}, window=128)
    assert other.plan_id != plan.plan_id
    assert "KV heads full" in str(plan)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_plan("m", "nope", {"score": IND}), "unknown KV plan rule"),
        (lambda: build_plan("m", "budget", {"score": IND}, budget=1.5, n_ctx=10), r"\(0, 1\]"),
        (lambda: build_plan("m", "budget", {"score": IND}, budget=0, n_ctx=10), r"\(0, 1\]"),
        (lambda: build_plan("m", "top_k", {"score": IND}, k=99), "k must be in"),
        (lambda: KVPlan("m", GRID, frozenset({(10, 0)})), "outside the 10 x 5 grid"),
        (lambda: KVPlan.from_dict({"model": "m"}), "malformed KV plan JSON"),
        (lambda: KVPlan("m", GRID, frozenset()).kv_fraction(0), ">= 1 token"),
    ],
)
def test_bad_input_is_one_line(call, match):
    with pytest.raises(WorkbenchError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_a_razor_plan_from_stored_kv_head_scores(load, store):
    from workbench.runner import run_analysis

    model = load("tiny-llama")
    r = run_analysis("kv_head_scores", model, task_params={"length": 6, "repeats": 3},
                     store=store)  # fmt: skip
    grid = (model.n_layers, model.n_kv_heads)
    scores = {m: kv_scores(r.tables["kv_heads"], m, grid) for m in ("induction", "echo")}
    plan = build_plan(model.name, "razor", scores, sources=[r.run_id])
    assert plan.grid == grid and 1 <= len(plan.full) <= grid[0] * grid[1]
    assert plan.sources == (r.run_id,)
    with pytest.raises(WorkbenchError, match="no KV-head scores"):
        kv_scores(r.tables["kv_heads"], "retrieval", grid)


def test_cli_builds_stores_and_exports_a_plan(tmp_path, monkeypatch, capsys):
    import json

    from workbench.circuits.kvplans import load_plan
    from workbench.cli import main
    from workbench.store import ResultStore

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    spec = tmp_path / "s.toml"
    spec.write_text('[defaults]\nmodels = ["tiny-llama"]\n[[analysis]]\nname = "kv_head_scores"\n'
                    'tasks = [{ name = "repeated", length = 6, repeats = 3 }]\n')  # fmt: skip
    assert main(["run", str(spec), "--no-progress"]) == 0
    run_id = capsys.readouterr().out.split()[1]
    out = tmp_path / "plan.json"
    assert main(["kvplan", run_id, "--window", "8", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kv_fraction(2048)" in text and "stored as run" in text
    plan = KVPlan.from_dict(json.loads(out.read_text()))
    stored = load_plan(ResultStore(), text.split("stored as run ")[1].split()[0])
    assert stored == plan and plan.window == 8 and plan.sources == (run_id,)
    assert main(["kvplan", run_id, "--rule", "nope"]) == 2
    assert main(["kvplan", "ffffffff"]) == 2


def test_natively_sliding_layers_are_never_chosen_and_cost_their_window():
    plan = build_plan("m", "top_k", {"score": IND}, k=5, native={0: 8, 2: 8}, window=60)
    chosen = [h for h in plan.full if h[0] not in (0, 2)]
    assert len(chosen) == 5 and plan.n_full == 5 and len(plan.streamable) == 40
    assert all(plan.policy((0, g)) == "native" for g in range(5))
    n = 1000
    want = (5 * n + 10 * 8 + 35 * 65) / (50 * n)
    assert plan.kv_fraction(n) == pytest.approx(want)
    assert KVPlan.from_dict(json.loads(plan.to_json())) == plan
    with pytest.raises(WorkbenchError, match="already slides"):
        KVPlan("m", GRID, frozenset(), native=((0, 8),))


def test_quantile_rule_keeps_the_heads_above_the_quantile():
    plan = build_plan("m", "quantile", {"score": IND}, quantile=0.8)
    cut = np.quantile(IND, 0.8)
    assert plan.full == frozenset(h for h in np.ndindex(GRID) if IND[h] > cut)  # 10 of 50
    ties = np.ones(GRID)
    ties[0, :3] = 0.5
    assert build_plan("m", "quantile", {"score": ties}, quantile=0.5).n_full == 25
    with pytest.raises(WorkbenchError, match="quantile"):
        build_plan("m", "quantile", {"score": IND}, quantile=1.0)


def test_controls_match_the_plan_budget_and_layers():
    from collections import Counter

    from workbench.circuits.kvplans import controls

    plan = build_plan("m", "top_k", {"score": IND}, k=7)
    ctl = controls(plan, 20, seed=1, scores=IND)
    assert sum(n.startswith("random_u") for n in ctl) == 20
    assert sum(n.startswith("random_l") for n in ctl) == 20
    layers = Counter(a for a, _ in plan.full)
    for name, c in ctl.items():
        if name.startswith("random"):
            assert c.n_full == 7
        if name.startswith("random_l"):
            assert Counter(a for a, _ in c.full) == layers
    assert len({c.full for n, c in ctl.items() if n.startswith("random_u")}) > 15
    lowest = sorted(np.ndindex(GRID), key=lambda h: IND[h])[:7]
    assert ctl["anti"].full == frozenset(lowest)
    assert ctl["all_stream"].n_full == 0 and ctl["all_full"].n_full == 50
    assert controls(plan, 20, seed=1, scores=IND)["random_u3"] == ctl["random_u3"]  # seeded


def test_pool_kv_heads_pools_query_heads_per_kv_head():
    import pandas as pd

    from workbench.circuits.kvplans import pool_kv_heads

    heads = pd.DataFrame(
        [{"layer": lay, "head": h, "metric": "m", "value": float(10 * lay + h)}
         for lay in range(2) for h in range(4)]
    )  # fmt: skip
    kv = pool_kv_heads(heads, 2).set_index(["layer", "kv_head"])
    assert kv.loc[(1, 0), "max"] == 11 and kv.loc[(1, 0), "mean"] == 10.5
    assert kv.loc[(0, 1), "sum"] == 2 + 3
    same = pool_kv_heads(heads.assign(head=heads["head"] % 2), 2, axis="kv_head")
    assert len(same) == 8 and (same["max"] == same["sum"]).all()
    with pytest.raises(WorkbenchError, match="do not split"):
        pool_kv_heads(heads, 3)


def test_the_pooled_arrays_equal_the_pooled_table_and_old_tables_are_refused_in_one_line():
    from workbench.circuits.kvplans import KV_POOLS, head_rows, pool_kv_heads

    grid = np.arange(12.0).reshape(2, 6)
    kv = pool_kv_heads(head_rows({"m": grid}), 3)
    assert list(kv.columns) == ["layer", "kv_head", "metric", *KV_POOLS]
    for col in KV_POOLS:
        want = getattr(grid.reshape(2, 3, 2), col)(axis=-1)
        np.testing.assert_allclose(kv_scores(kv, "m", (2, 3), col), want)
    old = kv.drop(columns="sum")  # a kv_head_scores table stored before "sum" was written
    with pytest.raises(WorkbenchError, match="no 'sum' column"):
        kv_scores(old, "m", (2, 3), "sum")

"""The head atlas: one row per head, a column per stored analysis/metric, latest run wins."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from workbench.atlas import ROLE_RULES, build_atlas, column_name
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.runner import run_analysis
from workbench.store import ResultStore
from workbench.types import RunKey

FP = "fp-test"


def _put(store: ResultStore, analysis: str, task: str, metrics: dict, *, params=None, extra=None):
    """Store a hand-made per-head run (values given as [n_layers, n_heads] arrays)."""
    params = params or {}
    key = RunKey("m", FP, analysis, params, task, f"data-{task}-{params}", "t")
    frames = []
    for metric, arr in metrics.items():
        arr = np.asarray(arr, dtype=float)
        la, he = np.meshgrid(np.arange(arr.shape[0]), np.arange(arr.shape[1]), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "model": "m",
                    "run_id": key.run_id,
                    "analysis": analysis,
                    "metric": metric,
                    "layer": la.ravel(),
                    "head": he.ravel(),
                    "value": arr.ravel(),
                }
            )
        )
    store.put(key, {"heads": pd.concat(frames, ignore_index=True)}, extra or {})
    time.sleep(0.01)  # distinct created_at
    return key.run_id


def test_hand_made_store_latest_wins_roles_and_kv(store):
    ind_old = np.zeros((3, 4))
    ind_new = np.zeros((3, 4))
    ind_new[2, 1] = 0.9  # the one induction head (> 0.4)
    ind_new[1, 3] = 0.4  # exactly the threshold: not a head (strict >)
    old = _put(
        store, "head_detectors", "induction", {"induction": ind_old, "previous_token": ind_old}
    )
    new = _put(store, "head_detectors", "induction", {"induction": ind_new}, params={"x": 1})
    kv = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 2 KV heads for 4 query heads
    kv_run = _put(
        store,
        "activation_patching",
        "ioi",
        {"logit_diff": kv},
        params={"component": "k", "direction": "denoising"},
        extra={"head_axis": "kv_head"},
    )
    _put(store, "sinks", "ioi", {"sink_share": np.ones((3, 4))})
    atlas = build_atlas("m", store)
    assert (atlas.n_layers, atlas.n_heads) == (3, 4)
    assert len(atlas.table) == 12
    assert list(atlas.table["head_label"][:5]) == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    ind = column_name("head_detectors", "", "induction", "induction")
    prev = "head_detectors.previous_token@induction"
    kcol = "activation_patching[k,kv].logit_diff@ioi"
    sink = "sinks.sink_share@ioi"
    assert set(atlas.columns) == {ind, prev, kcol, sink}
    # the newer run gives the induction column; the older one still gives previous_token
    assert set(atlas.table[f"{ind}__run"]) == {new}
    assert set(atlas.table[f"{prev}__run"]) == {old}
    assert atlas.matrix(ind).loc[2, 1] == 0.9
    # KV head h // 2 broadcast to query heads
    np.testing.assert_array_equal(atlas.matrix(kcol).to_numpy(), np.repeat(kv, 2, axis=1))
    assert set(atlas.table[f"{kcol}__run"]) == {kv_run}
    # roles: exactly L2H1 is an induction head; every head is a sink head (sink_share 1 > 0.5)
    ind_roles = atlas.role_table[atlas.role_table["role"] == "induction head"]
    assert list(zip(ind_roles["layer"], ind_roles["head"], strict=True)) == [(2, 1)]
    assert atlas.roles_of(2, 1)[0] == f"induction head: {ind} > 0.4"
    assert (atlas.role_table["role"] == "sink head").sum() == 12
    assert "retrieval head" not in set(atlas.role_table["role"])  # no column, no rule applied
    assert any(r.role == "retrieval head" for r in ROLE_RULES)
    prov = atlas.provenance.set_index("column")
    assert prov.loc[kcol, "kv_broadcast"] and prov.loc[ind, "run_id"] == new
    fig = atlas.figure(ind)
    assert fig.data[0].z.shape == (3, 4)
    assert (
        fig.data[0].customdata[2][1][0] == new
        and "induction head" in fig.data[0].customdata[2][1][1]
    )
    assert "3 layers x 4 heads" in repr(atlas)
    with pytest.raises(WorkbenchError, match="no column"):
        atlas.figure("nope")


def test_no_runs_is_one_line_error(store):
    with pytest.raises(WorkbenchError, match="no per-head results of model 'm'"):
        build_atlas("m", store)


def test_tiny_model_runs_cli_and_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    store = ResultStore()
    run_analysis(
        "head_detectors",
        "tiny-llama",
        "induction",
        task_params={"seq_len": 8, "n_prompts": 2},
        store=store,
    )
    run_analysis(
        "direct_logit_attribution", "tiny-llama", "ioi", task_params={"n_prompts": 2}, store=store
    )
    atlas = build_atlas("tiny-llama", store)
    assert len(atlas.table) == 2 * 4
    assert {c.split(".")[0] for c in atlas.columns} == {
        "head_detectors",
        "direct_logit_attribution",
    }
    assert main(["atlas", "tiny-llama", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "head_detectors.induction@induction" in out and "L0H0" in out
    html = tmp_path / "a.html"
    assert main(["atlas", "tiny-llama", "--column", atlas.columns[0], "--html", str(html)]) == 0
    assert html.stat().st_size > 1000
    for fmt in ("csv", "parquet", "json"):
        path = tmp_path / f"atlas.{fmt}"
        assert main(["export", "--atlas", "tiny-llama", "--format", fmt, "-o", str(path)]) == 0
        df = (
            pd.read_csv(path)
            if fmt == "csv"
            else pd.read_parquet(path)
            if fmt == "parquet"
            else pd.read_json(path)
        )
        assert len(df) == 8 and set(atlas.columns) <= set(df.columns)
        np.testing.assert_allclose(df[atlas.columns[0]], atlas.table[atlas.columns[0]], rtol=1e-6)
    capsys.readouterr()
    assert main(["atlas", "nobody"]) == 2
    assert "no per-head results" in capsys.readouterr().err
    assert main(["export", "--atlas", "tiny-llama", "abc", "-o", str(tmp_path / "x.csv")]) == 2


@pytest.mark.models
def test_smollm2_atlas_has_270_rows(tmp_path):
    store = ResultStore(tmp_path / "store")
    run_analysis(
        "head_detectors",
        "smollm2-135m",
        "induction",
        task_params={"seq_len": 8, "n_prompts": 2},
        store=store,
    )
    atlas = build_atlas("smollm2-135m", store)
    assert len(atlas.table) == 270 and (atlas.n_layers, atlas.n_heads) == (30, 9)
    assert atlas.table["head_detectors.induction@induction"].notna().all()


def toy_analysis(model, prompts, params):
    """A registered-in-a-test analysis: head (l, h) scores ``(l * n_heads + h) * scale``."""
    from workbench.types import AnalysisOutput, HeadMetric

    n = model.n_layers * model.n_heads
    mean = np.arange(n, dtype=float).reshape(model.n_layers, model.n_heads) * params.scale
    return AnalysisOutput(head_metrics={"toy_score": HeadMetric(mean, None, prompts.n)})


def test_a_new_analysis_is_one_registry_entry(load, store, monkeypatch):
    """Adding an analysis touches its own code and one registry line: its entry declares the
    atlas roles and variants, and generic code (runner, atlas) needs nothing else."""
    from dataclasses import dataclass, field

    from workbench import registry
    from workbench.types import RoleRule

    @dataclass(frozen=True)
    class ToyParams:
        scale: float = field(default=1.0, metadata={"help": "score multiplier"})
        flavour: str = field(default="plain", metadata={"help": "a variant parameter"})

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    registry.register(
        registry.Analysis(
            name="toy_scores", description="toy", params_cls=ToyParams,
            loader=lambda: toy_analysis, default_task="induction", variant_params=("flavour",),
            roles=(RoleRule("toy head", "toy_score", ">", 5.5, "toy_scores"),),
        )
    )  # fmt: skip
    model = load("tiny-llama")
    run_analysis("toy_scores", model, task_params={"seq_len": 6, "n_prompts": 2}, store=store,
                 params={"flavour": "spicy"})  # fmt: skip
    atlas = build_atlas("tiny-llama", store)
    column = "toy_scores[spicy].toy_score@induction"
    assert column in atlas.columns
    assert atlas.roles_of(1, 3) == [f"toy head: {column} > 5.5"]  # value 7 (2 layers x 4 heads)
    assert atlas.roles_of(1, 1) == []  # value 5

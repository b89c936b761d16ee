"""Attention sinks: the fast in-hook reduction against the slow loop, the formulas on hand-made
patterns, the result's tables and BOS statement, bad input, and SmolLM2's first-token sink."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.analyses.attention_sinks import SinkParams
from workbench.analyses.attention_sinks.compute import (
    attention_sinks,
    collect_statistics,
    pattern_statistics,
)
from workbench.analyses.attention_sinks.figures import sink_rate_figure, sink_share_heatmap
from workbench.analyses.attention_sinks.reference import reference_statistics
from workbench.errors import WorkbenchError
from workbench.runner import _with_bos, run_analysis
from workbench.tasks import build_task

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gemma3"]


def _texts(model, **kw):
    return build_task("texts", model.codec, {"seq_len": 12, "n_per_domain": 1, **kw})


@pytest.mark.parametrize("name", TINY)
def test_fast_path_equals_slow_loop(load, name):
    model = load(name)
    tokens = _texts(model).clean
    fast = collect_statistics(model, tokens, batch_size=2)  # 3 samples: batches of 2 and 1
    slow = reference_statistics(model, tokens)
    for field in vars(fast):
        np.testing.assert_allclose(getattr(fast, field), getattr(slow, field), rtol=1e-5, atol=1e-6)
    assert fast.value_ratio.shape == (3, model.n_layers, model.n_kv_heads)


def _causal(t: int, rows: torch.Tensor) -> torch.Tensor:
    return rows.tril()[None, None]


def test_formulas_on_hand_made_patterns():
    t = 6
    # every query puts all its attention on position 0: a perfect dormant sink head
    sink = torch.zeros(t, t)
    sink[:, 0] = 1
    alpha, row, col = pattern_statistics(_causal(t, sink))
    assert torch.allclose(alpha[0, 0], torch.tensor([1.0, 0, 0, 0, 0, 0]))
    assert row.item() == pytest.approx(0.0, abs=1e-7)
    assert col.item() == pytest.approx(1.0, abs=1e-6)  # column 0 is uniform over all t queries
    # uniform causal attention: alpha_k = mean_{q>=k} 1/(q+1); every row entropy is 1
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    alpha, row, col = pattern_statistics(_causal(t, uniform))
    expect = [sum(1 / (q + 1) for q in range(k, t)) / (t - k) for k in range(t)]
    assert alpha[0, 0].tolist() == pytest.approx(expect, rel=1e-6)
    assert row.item() == pytest.approx(1.0, rel=1e-6)
    col_k0 = [1 / (q + 1) for q in range(t)]
    total = sum(col_k0)
    h0 = -sum(p / total * math.log(p / total) for p in col_k0) / math.log(t)
    assert col.item() >= h0 - 1e-6 and col.item() < 1.0


def test_result_tables_and_position_statement(load):
    model = load("tiny-llama")
    out = attention_sinks(model, _texts(model, n_per_domain=2), SinkParams(epsilon=0.3))
    info = out.info
    assert info["position_0_is_bos"] is False and info["position_0"].startswith("first text")
    assert info["domains"] == ["prose", "code", "repeated"]
    pos = out.tables["positions"]
    assert set(pos["domain"]) == {"all", "prose", "code", "repeated"}
    allp = pos[pos["domain"] == "all"]
    assert allp["k"].tolist() == list(range(1, 13)) and allp["position"].tolist() == list(range(12))
    assert info["sink_1_pct"]["all"] == pytest.approx(allp["sink_pct"].iloc[0])
    share = out.head_metrics["sink_share"].mean
    assert share.shape == (model.n_layers, model.n_heads)
    # Sink_1 is the mean over heads of the per-head sink share
    assert 100 * share.mean() == pytest.approx(allp["sink_pct"].iloc[0])
    # GQA: query heads 0,1 share KV head 0, heads 2,3 KV head 1
    v = out.head_metrics["value_norm_ratio"].mean
    assert np.allclose(v[:, 0], v[:, 1]) and np.allclose(v[:, 2], v[:, 3])
    hidden = out.tables["hidden_sinks"]
    assert (hidden["alpha"] > 0.3).all() and (hidden["position"] >= 1).all()
    assert (hidden["position"] <= 12 - 8).all()  # hidden_min_queries = 8
    dorm = out.tables["dormancy"]
    assert len(dorm) == 3 * model.n_layers * model.n_heads
    assert {"dormant_share_prose", "dormant_share_code", "dormant_share_repeated"} <= set(
        out.head_metrics
    )


def test_bos_is_stated_and_is_position_0(load):
    model = _with_bos(load("tiny-gpt2"), True)
    prompts = _texts(model, domains=["prose"])
    assert int(prompts.clean[0, 0]) == model.codec.bos_token_id and prompts.seq_len == 12
    out = attention_sinks(model, prompts, SinkParams())
    assert out.info["position_0_is_bos"] is True and out.info["position_0"].startswith("BOS")
    pos = out.tables["positions"]
    assert pos["role"].iloc[0] == "BOS"
    assert pos["token"].iloc[0] == model.codec.decode([model.codec.bos_token_id])


def test_repeated_domain_repeats_its_block(load):
    model = load("tiny-llama")
    p = build_task(
        "texts", model.codec, {"domains": ["repeated"], "seq_len": 10, "repeat_block": 4}
    )
    t = p.clean[0]
    assert torch.equal(t[:4], t[4:8]) and len(set(t[:4].tolist())) == 4


@pytest.mark.parametrize(
    ("params", "task_params", "needle"),
    [
        ({"epsilon": 0.0}, {}, "epsilon must be in (0, 1)"),
        ({"epsilon": 1.0}, {}, "epsilon must be in (0, 1)"),
        ({"epsilon": 1.5}, {}, "epsilon must be in (0, 1)"),
        ({}, {"seq_len": 1}, "seq_len must be >= 2"),
        ({}, {"seq_len": 129}, "longer than the model's context"),
        ({}, {"n_per_domain": 99}, "asked"),
    ],
)
def test_bad_input_is_one_line_and_stores_nothing(load, store, params, task_params, needle):
    model = load("tiny-llama")
    with pytest.raises(WorkbenchError) as err:
        run_analysis(
            "attention_sinks", model, "texts", params=params, task_params=task_params, store=store
        )
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert store.list_runs().empty


def test_figures_draw_the_stored_tables(load, store):
    model = load("tiny-gemma3")
    r = run_analysis(
        "attention_sinks", model, "texts", task_params={"seq_len": 10, "n_per_domain": 1},
        store=store,
    )  # fmt: skip
    pos = r.tables["positions"]
    bar = sink_rate_figure(pos, "prose")
    assert list(bar.data[0].y) == pos[pos["domain"] == "prose"]["sink_pct"].tolist()
    heat = sink_share_heatmap(r.heads)
    assert np.allclose(np.asarray(heat.data[0].z), r.matrix("sink_share").values)
    with pytest.raises(KeyError):
        sink_rate_figure(pos, "poetry")
    again = run_analysis(
        "attention_sinks", model, "texts", task_params={"seq_len": 10, "n_per_domain": 1},
        store=store,
    )  # fmt: skip
    assert again.from_store and again.manifest["extra"]["position_0_is_bos"] is False


@pytest.mark.models
def test_smollm2_first_token_is_the_sink(smollm2, store):
    r = run_analysis(
        "attention_sinks", smollm2, "texts", store=store,
        task_params={"domains": ["prose"], "n_per_domain": 3, "seq_len": 64},
    )  # fmt: skip
    extra = r.manifest["extra"]
    assert extra["position_0_is_bos"] is False and extra["prepend_bos"] is False
    pos = r.tables["positions"].query("domain == 'prose'").set_index("k")["sink_pct"]
    assert pos[1] > 50 and pos[1] > 10 * max(pos[32], 1.0)  # measured: ~70% vs ~0%
    # value-state drain and residual peak at the sink token
    assert r.tables["value_norms"]["ratio"].min() < 0.5
    assert r.tables["residual"].query("domain == 'prose'")["ratio"].max() > 10


def test_one_token_samples_are_refused(load):
    model = load("tiny-llama")
    one = _texts(model, domains=["repeated"], seq_len=2)
    one.clean = one.clean[:, :1]
    with pytest.raises(WorkbenchError, match="T >= 2"):
        attention_sinks(model, one, SinkParams())

"""MoA attention influence: equal to the plain loop, a first-order estimate of really dropping
the layout's entries, exactly 0 when nothing is dropped, pooled per KV head, end to end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from workbench.analyses.moa_influence import MoAInfluenceParams
from workbench.analyses.moa_influence.compute import drop_mask, moa_influence
from workbench.analyses.moa_influence.reference import (
    patterns_and_grads,
    reference_influence,
    true_drop_change,
)
from workbench.errors import WorkbenchError
from workbench.runner import run_analysis
from workbench.tasks import build_task

TASK = {"seq_len": 16, "n_per_domain": 1, "domains": ["prose", "code"]}


def _texts(model, **kw):
    return build_task("texts", model.codec, {**TASK, **kw})


def test_the_drop_mask_follows_the_layout():
    mask = drop_mask(8, sink=2, window=3).numpy()
    assert sorted(np.flatnonzero(mask[7])) == [2, 3, 4]  # keeps 0, 1 and 5, 6, 7
    assert not mask[:5].any()  # q - w < sink: nothing dropped
    assert not np.triu(mask).any()  # never a key the query does not see


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_equals_the_plain_loop(load, name):
    model = load(name)
    prompts = _texts(model)
    windows = (2, 5, 9)
    out = moa_influence(model, prompts, MoAInfluenceParams(sink=1, windows=windows, batch_size=2))
    ref = reference_influence(model, prompts, sink=1, windows=windows)
    for w in windows:
        got = out.head_metrics[f"moa_w{w}"]
        assert got.mean.shape == (model.n_layers, model.n_heads) and got.n == prompts.n
        np.testing.assert_allclose(got.mean, ref[w], atol=1e-6)
        assert np.abs(ref[w]).max() > 1e-4  # not a vacuous comparison
    losses = [patterns_and_grads(model, prompts.clean[s : s + 1])[2] for s in range(prompts.n)]
    assert out.info["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tracks_the_true_loss_change_of_dropping(load, name):
    """sink s, window T - 1 - s: each head drops one entry, (T - 1, s). Where its attention is
    small the first-order estimate must match the true change of zeroing it and renormalising."""
    model = load(name)
    prompts = _texts(model, domains=["prose"])
    t = prompts.seq_len
    pats, _, _ = patterns_and_grads(model, prompts.clean)
    checked = 0
    for sink in (1, 2, 3):
        window = t - 1 - sink
        out = moa_influence(model, prompts, MoAInfluenceParams(sink=sink, windows=(window,)))
        assert out.info["dropped_entries_per_head"][f"moa_w{window}"] == 1
        est = out.head_metrics[f"moa_w{window}"].mean
        for layer in range(model.n_layers):
            for head in range(model.n_heads):
                true = true_drop_change(model, prompts.clean, layer, head, sink, window)
                if pats[layer][head, t - 1, sink] > 0.01 or abs(true) < 1e-5:
                    continue  # second order matters, or the change is lost in float32 noise
                checked += 1
                assert np.sign(est[layer, head]) == np.sign(true)
                # 5 % relative, plus the float32 noise of a difference of two losses of ~4
                assert abs(est[layer, head] - true) < 0.05 * abs(true) + 2e-6, (sink, layer, head)
    assert checked >= 5


def test_a_window_as_long_as_the_sequence_gives_zero(load):
    model = load("tiny-llama")
    prompts = _texts(model)
    t = prompts.seq_len
    out = moa_influence(model, prompts, MoAInfluenceParams(sink=0, windows=(t, t + 7)))
    for w in (t, t + 7):
        assert (out.head_metrics[f"moa_w{w}"].mean == 0).all()
        assert out.info["dropped_entries_per_head"][f"moa_w{w}"] == 0
    assert (out.tables["kv_heads"][["max", "mean", "sum"]].to_numpy() == 0).all()


def test_pools_query_heads_per_kv_head(load):
    model = load("tiny-llama")  # grouped-query attention: 4 query heads on 2 KV heads
    group = model.n_heads // model.n_kv_heads
    assert group > 1
    out = moa_influence(model, _texts(model), MoAInfluenceParams(sink=1, windows=(3, 6)))
    kv = out.tables["kv_heads"]
    assert list(kv.columns) == ["layer", "kv_head", "metric", "max", "mean", "sum"]
    assert len(kv) == 2 * model.n_layers * model.n_kv_heads
    for row in kv.itertuples():
        block = np.asarray(out.head_metrics[row.metric].mean)[
            row.layer, row.kv_head * group : (row.kv_head + 1) * group
        ]
        assert row.max == pytest.approx(block.max())
        assert row.mean == pytest.approx(block.mean())
        assert row.sum == pytest.approx(block.sum())


@pytest.mark.parametrize(
    "bad",
    [{"sink": -1}, {"windows": ()}, {"windows": (0, 8)}, {"windows": (8, 8)}, {"batch_size": 0}],
)
def test_bad_params_are_refused(bad):
    with pytest.raises(WorkbenchError):
        replace(MoAInfluenceParams(), **bad).validate()


def test_runs_end_to_end_and_feeds_kv_plans(load, store):
    from workbench.circuits.kvplans import kv_scores

    model = load("tiny-llama")
    r = run_analysis("moa_influence", model, task_params=TASK, params={"sink": 1,
                     "windows": [4, 8]}, store=store)  # fmt: skip
    assert set(r.metrics) == {"moa_w4", "moa_w8"}
    assert r.matrix("moa_w4").shape == (model.n_layers, model.n_heads)
    assert r.info["n_sequences"] == 2 and r.info["windows"] == [4, 8] and r.info["loss"] > 0
    grid = (model.n_layers, model.n_kv_heads)
    sums = kv_scores(r.tables["kv_heads"], "moa_w4", grid, column="sum")
    heads = r.matrix("moa_w4").to_numpy().reshape(model.n_layers, model.n_kv_heads, -1)
    np.testing.assert_allclose(sums, heads.sum(-1), rtol=1e-6, atol=1e-12)
    again = run_analysis("moa_influence", model, task_params=TASK, params={"sink": 1,
                         "windows": [4, 8]}, store=store)  # fmt: skip
    assert again.from_store

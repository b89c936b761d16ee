"""RazorAttention's echo and induction scores: equal to the plain loop, pooled per KV head as
the paper says, and the toy model's trained induction head ranks first."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.analyses.kv_head_scores import KVHeadScoreParams
from workbench.analyses.kv_head_scores.compute import kv_head_scores, razor_masks
from workbench.analyses.kv_head_scores.reference import reference_scores
from workbench.errors import WorkbenchError
from workbench.runner import run_analysis
from workbench.tasks import build_task

TASK = {"length": 7, "repeats": 3, "n_prompts": 3}


def test_masks_follow_the_definition():
    echo, ind, scored = razor_masks(length=3, repeats=3, offset=1)
    assert echo.shape == (10, 10) and int(scored.sum()) == 6  # repeats 1 and 2 are scored
    q = 1 + 2 * 3 + 1  # repeat 2, i = 1
    assert sorted(np.flatnonzero(echo[q].numpy())) == [2, 5]
    assert sorted(np.flatnonzero(ind[q].numpy())) == [3, 6]
    assert not echo[:4].any() and not (echo & ~torch_tril(10)).any()


def torch_tril(t: int):
    import torch

    return torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=-1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_equals_the_plain_loop_and_pools_per_kv_head(load, name):
    model = load(name)
    prompts = build_task("repeated", model.codec, TASK)
    out = kv_head_scores(model, prompts, KVHeadScoreParams(batch_size=2))
    ref = reference_scores(model, prompts)
    for key in ("echo", "induction"):
        np.testing.assert_allclose(out.head_metrics[key].mean, ref[key], atol=1e-9)
    kv = out.tables["kv_heads"]
    group = model.n_heads // model.n_kv_heads
    assert len(kv) == 2 * model.n_layers * model.n_kv_heads
    for row in kv.itertuples():
        heads = np.asarray(
            out.head_metrics["induction" if row.metric == "induction" else "echo"].mean
        )
        block = heads[row.layer, row.kv_head * group : (row.kv_head + 1) * group]
        assert row.max == pytest.approx(block.max()) and row.mean == pytest.approx(block.mean())
        assert row.sum == pytest.approx(block.sum())  # every pool kv_plan_eval's column accepts


def test_the_trained_induction_head_ranks_first(load, store):
    toy = load("toy-induction")
    r = run_analysis("kv_head_scores", toy, task_params={"length": 10, "repeats": 3,
                     "n_prompts": 4}, store=store)  # fmt: skip
    ind = r.matrix("induction")
    layer, head = np.unravel_index(np.nanargmax(ind.to_numpy()), ind.shape)
    assert (int(layer), int(head)) == tuple(toy.extra["induction_head"])
    assert r.info["spearman_induction_vs_head_detectors"] > 0.9
    assert "kv_heads" in r.tables


def test_needs_the_repeated_task(load):
    model = load("tiny-llama")
    with pytest.raises(WorkbenchError, match="needs the 'repeated' task"):
        kv_head_scores(
            model, build_task("induction", model.codec, {"seq_len": 6}), KVHeadScoreParams()
        )
    with pytest.raises(WorkbenchError, match="exceed the model's context"):
        build_task("repeated", model.codec, {"length": 1000, "repeats": 40})

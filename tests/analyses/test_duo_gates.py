"""DuoAttention gates: gates at 1 (or a window covering the sequence) leave the model as it is,
gates at 0 give the plain streaming loop, training lowers the loss and keeps the gates in
[0, 1], natively sliding layers get no gate, end to end into a quantile KV plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.analyses.duo_gates import ENTRY, DuoGateParams
from workbench.analyses.duo_gates.compute import duo_gates, duo_hooks, duo_mix, stream_keep
from workbench.circuits.kvplans import build_plan, kv_scores
from workbench.errors import WorkbenchError
from workbench.forward.streaming import native_windows
from workbench.hooks import hook_name, record
from workbench.runner import run_analysis
from workbench.tasks import build_task

NEEDLE = {"context_lengths": [64], "depth_percents": [50], "n_needles": 2}


def _needles(model):
    return build_task("needle", model.codec, NEEDLE)


def _tokens(model):
    return _needles(model).samples[0].context[None]


def test_the_keep_mask_follows_the_layout():
    keep = stream_keep(10, sink=2, window=3).numpy()
    assert sorted(np.flatnonzero(keep[9])) == [0, 1, 7, 8, 9]
    assert keep[4].tolist() == [True] * 5 + [False] * 5  # q < sink + window: every past key
    assert not np.triu(keep, 1).any()  # never a future key


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_gates_at_one_or_a_covering_window_change_nothing(load, name):
    model = load(name)
    tokens = _tokens(model)
    t = int(tokens.shape[1])
    grid = (model.n_layers, model.n_kv_heads)
    with torch.no_grad():
        base = model.bridge(tokens, prepend_bos=False)
        with duo_mix(model, torch.ones(grid), sink=2, window=4):
            ones = model.bridge(tokens, prepend_bos=False)
        with duo_mix(model, torch.rand(grid), sink=2, window=t):
            covered = model.bridge(tokens, prepend_bos=False)
    torch.testing.assert_close(ones, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(covered, base, atol=1e-5, rtol=0)
    # z^stream itself (gates 0) equals z^full at every gated layer when the window covers T
    layers = [la for la in range(model.n_layers) if la not in native_windows(model)]
    points = [("z", la) for la in layers]
    clean = record(model.bridge, tokens, points)
    stream = record(model.bridge, tokens, points,
                    during=duo_hooks(model, torch.zeros(grid), sink=0, window=t))  # fmt: skip
    for point in points:
        torch.testing.assert_close(stream.acts[point], clean.acts[point], atol=1e-5, rtol=0)


def test_gates_at_zero_give_the_plain_streaming_loop(load):
    model = load("tiny-llama")
    tokens = _tokens(model)[:, :24]
    sink, window, layer = 2, 5, 0
    group = model.n_heads // model.n_kv_heads
    clean = record(model.bridge, tokens, [("scores", layer), ("v", layer)])
    scores, v = clean.acts[("scores", layer)][0].double(), clean.acts[("v", layer)][0].double()
    gates = torch.ones(model.n_layers, model.n_kv_heads)
    gates[layer] = 0.0
    mixed = record(model.bridge, tokens, [("z", layer)],
                   during=duo_hooks(model, gates, sink, window, layers=[layer]))  # fmt: skip
    z = mixed.acts[("z", layer)][0].double()
    t = int(tokens.shape[1])
    ref = torch.zeros_like(z)
    for h in range(model.n_heads):
        for q in range(t):
            kept = [k for k in range(q + 1) if k < sink or k > q - window]
            w = torch.softmax(scores[h, q, kept], dim=-1)
            ref[q, h] = sum(w[i] * v[k, h // group] for i, k in enumerate(kept))
    np.testing.assert_allclose(z.numpy(), ref.numpy(), atol=1e-5)
    assert not np.allclose(z.numpy(), record(model.bridge, tokens, [("z", layer)]).acts[
        ("z", layer)][0].numpy(), atol=1e-4)  # fmt: skip  # the window really drops keys


def test_training_lowers_the_loss_and_keeps_gates_in_range(load):
    model = load("tiny-llama")
    needles = _needles(model)
    params = DuoGateParams(sink=2, window=8, steps=6, lr=0.01, l1=0.5)
    out = duo_gates(model, needles, params)
    gates = out.tables["kv_heads"]["max"].to_numpy()
    assert out.info["final_loss"] < out.info["initial_loss"] == pytest.approx(params.l1)
    assert ((gates >= 0) & (gates <= 1)).all() and (gates < 1).any()
    training = out.tables["training"]
    assert list(training["step"]) == list(range(params.steps + 1))
    np.testing.assert_allclose(training["loss"], training["distill"] + training["l1"])
    assert training["distill"].iloc[0] == 0.0  # every gate 1: the full model
    again = duo_gates(model, needles, params)  # deterministic
    np.testing.assert_array_equal(again.tables["kv_heads"]["max"].to_numpy(), gates)
    # per query head: its KV head's gate
    group = model.n_heads // model.n_kv_heads
    per_kv = gates.reshape(model.n_layers, model.n_kv_heads)
    np.testing.assert_array_equal(out.head_metrics["duo_gate"].mean, np.repeat(per_kv, group, 1))
    # nothing dropped and no L1: the gates stay exactly 1
    flat = duo_gates(model, needles, DuoGateParams(sink=2, window=128, steps=3, l1=0.0))
    assert (flat.tables["kv_heads"]["max"] == 1.0).all()
    assert (flat.tables["training"]["loss"] == 0.0).all()


def test_native_sliding_layers_get_no_gate(load):
    model = load("tiny-gemma3")
    native = native_windows(model)
    assert native  # Gemma 3's local layers
    out = duo_gates(model, _needles(model), DuoGateParams(sink=2, window=8, steps=2))
    kv = out.tables["kv_heads"]
    heads = np.asarray(out.head_metrics["duo_gate"].mean)
    for layer in range(model.n_layers):
        rows = kv[kv["layer"] == layer][["max", "mean", "sum"]].to_numpy()
        if layer in native:
            assert np.isnan(rows).all() and np.isnan(heads[layer]).all()
        else:
            assert np.isfinite(rows).all() and np.isfinite(heads[layer]).all()
    assert out.info["native_layers"] == sorted(native)
    # the mix never hooks a native layer
    names = {n for n, _ in duo_hooks(model, torch.ones(model.n_layers, model.n_kv_heads), 2, 8)}
    assert not any(hook_name("z", layer) in names for layer in native)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sink": -1}, "sink must be >= 0"),
        ({"window": 0}, "window must be >= 1"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"l1": -0.1}, "l1 must be >= 0"),
    ],
)
def test_bad_params_are_one_line_errors(values, message):
    with pytest.raises(WorkbenchError) as err:
        ENTRY.parse_params(values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_needs_the_needle_task(load):
    model = load("tiny-llama")
    prompts = build_task("induction", model.codec, {"seq_len": 6, "n_prompts": 2})
    with pytest.raises(WorkbenchError, match="needs the 'needle' task"):
        duo_gates(model, prompts, DuoGateParams(steps=1))


def test_end_to_end_into_a_quantile_plan(load, store):
    model = load("tiny-llama")
    r = run_analysis("duo_gates", model, params={"sink": 2, "window": 8, "steps": 3},
                     task_params=NEEDLE, store=store)  # fmt: skip
    grid = (model.n_layers, model.n_kv_heads)
    scores = kv_scores(r.tables["kv_heads"], "duo_gate", grid)
    assert scores.shape == grid and np.isfinite(scores).all()
    assert set(r.tables["training"].columns) == {"step", "loss", "distill", "l1", "seconds"}
    assert r.info["n_samples"] == 2 and r.info["steps"] == 3
    assert r.matrix("duo_gate").shape == (model.n_layers, model.n_heads)
    plan = build_plan(model.name, "quantile", {"score": scores}, sink=2, window=8,
                      compensation=False, sources=[r.run_id], quantile=0.5)  # fmt: skip
    assert plan.grid == grid and plan.rule == "quantile"
    assert plan.n_full == plan.params["kept"] == int(np.ceil(0.5 * scores.size))
    assert min(scores[h] for h in plan.full) >= max(
        scores[h] for h in np.ndindex(grid) if h not in plan.full
    )

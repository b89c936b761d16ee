"""Path patching equals plainly written direct computations: sender -> logits is the sender's
output difference added to the final residual stream (plus the recomputed MLPs' changes when
they are not frozen); sender -> a head's q/k/v is the layer's input with that difference added.
Senders that cannot reach a receiver have no effect; bad input is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench import params as P
from workbench.analyses.path_patching import PathPatchingParams
from workbench.analyses.path_patching.compute import path_patch_sender, path_patching, run_caches
from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked
from workbench.tasks import build_task
from workbench.types import Head, PromptSet


def _task(name, codec, params) -> PromptSet:
    ps = build_task(name, codec, params)
    assert isinstance(ps, PromptSet)
    return ps


def _ld(logits, ps):
    return (logits.gather(-1, ps.correct[:, None]) - logits.gather(-1, ps.incorrect[:, None]))[:, 0]


def _run(model, tokens, hooks=(), capture=()):
    got = {}

    def save(name):
        def fn(act, hook):
            got[name] = act.detach().clone()
            return act

        return fn

    with torch.no_grad(), hooked(model.bridge, [*hooks, *[(n, save(n)) for n in capture]]):
        logits = model.bridge(tokens, prepend_bos=False)[:, -1]
    return logits, got


def _sender_delta(model, ps, layer, head, source, base):
    """(z_source - z_base) of one head through its slice of W_O: ``[batch, pos, d_model]``."""
    name = hook_name("z", layer)
    _, zs = _run(model, source, capture=[name])
    _, zb = _run(model, base, capture=[name])
    dz = zs[name][:, :, head] - zb[name][:, :, head]
    return dz @ model.bridge.W_O[layer, head]


def _logits_from_final_resid(model, resid):
    with torch.no_grad():
        return model.bridge.unembed(model.bridge.ln_final(resid))[:, -1]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_logits_receiver_equals_direct_path(load, name, direction):
    model = load(name)
    ps = _task("ioi", model.codec, {"n_prompts": 4})
    params = PathPatchingParams(direction=direction, freeze_mlps=True)
    got = path_patching(model, ps, params).head_metrics["path_patching"].mean
    base, source = (ps.corrupt, ps.clean) if direction == "denoising" else (ps.clean, ps.corrupt)
    final = hook_name("resid_post", model.n_layers - 1)
    base_logits, cache = _run(model, base, capture=[final])
    expected = np.zeros((model.n_layers, model.n_heads))
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            delta = _sender_delta(model, ps, layer, head, source, base)
            logits = _logits_from_final_resid(model, cache[final] + delta)
            expected[layer, head] = float((_ld(logits, ps) - _ld(base_logits, ps)).mean())
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    assert np.abs(expected).max() > 1e-3  # the comparison is not between zeros


def test_recomputed_mlps_are_the_only_difference(load):
    """freeze_mlps=False adds exactly the MLP outputs' changes (with every head frozen but
    the sender) to the frozen-MLP path; on tiny-gpt2 that difference is not zero."""
    model = load("tiny-gpt2")
    ps = _task("ioi", model.codec, {"n_prompts": 4})
    free = path_patching(model, ps, PathPatchingParams()).head_metrics["path_patching"].mean
    frozen = path_patching(model, ps, PathPatchingParams(freeze_mlps=True))
    frozen_m = frozen.head_metrics["path_patching"].mean
    final = hook_name("resid_post", model.n_layers - 1)
    mlps = [hook_name("mlp_out", lyr) for lyr in range(model.n_layers)]
    zs = [hook_name("z", lyr) for lyr in range(model.n_layers)]
    base_logits, corrupt = _run(model, ps.corrupt, capture=[final, *mlps, *zs])
    _, clean = _run(model, ps.clean, capture=zs)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):

            def freeze(act, hook, name=None):
                return corrupt[name].clone()

            def sender(act, hook, name=zs[layer], head=head):
                out = corrupt[name].clone()
                out[:, :, head] = clean[name][:, :, head]
                return out

            hooks = [(n, lambda a, hook, n=n: freeze(a, hook, n)) for n in zs if n != zs[layer]]
            _, recomputed = _run(model, ps.corrupt, [*hooks, (zs[layer], sender)], mlps)
            mlp_change = sum(recomputed[n] - corrupt[n] for n in mlps)
            delta = _sender_delta(model, ps, layer, head, ps.clean, ps.corrupt)
            logits = _logits_from_final_resid(model, corrupt[final] + delta + mlp_change)
            want = float((_ld(logits, ps) - _ld(base_logits, ps)).mean())
            assert free[layer, head] == pytest.approx(want, abs=2e-5, rel=1e-4)
    assert np.abs(free - frozen_m).max() > 1e-4


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_head_receiver_equals_hand_written_version(load, which):
    """tiny-llama (GQA, 4 heads / 2 KV heads): sender L0Hs -> receiver L1H3's ``which`` input
    equals running layer 1 on ``resid_pre_1(corrupt) + sender delta`` and patching only that
    input (KV head 1 for k/v)."""
    model = load("tiny-llama")
    ps = _task("ioi", model.codec, {"n_prompts": 4})
    receivers = ((1, 3, which),)
    out = path_patching(model, ps, PathPatchingParams(receivers=receivers, freeze_mlps=True))
    got = out.head_metrics["path_patching"].mean
    assert np.isnan(got[1]).all() and out.info["n_senders"] == model.n_heads
    resid, target = hook_name("resid_pre", 1), hook_name(which, 1)
    idx = 3 if which == "q" else 3 // (model.n_heads // model.n_kv_heads)
    base_logits, corrupt = _run(model, ps.corrupt, capture=[resid])
    for head in range(model.n_heads):
        delta = _sender_delta(model, ps, 0, head, ps.clean, ps.corrupt)
        shifted = corrupt[resid] + delta
        _, step2 = _run(
            model, ps.corrupt, [(resid, lambda a, hook, s=shifted: s.clone())], [target]
        )

        def patch(act, hook, new=step2[target]):
            act = act.clone()
            act[:, :, idx] = new[:, :, idx]
            return act

        logits, _ = _run(model, ps.corrupt, [(target, patch)])
        want = float((_ld(logits, ps) - _ld(base_logits, ps)).mean())
        assert got[0, head] == pytest.approx(want, abs=2e-5, rel=1e-4)
    assert np.abs(got[0]).max() > 1e-3  # the comparison is not between zeros
    if which != "q":  # query heads 2 and 3 share KV head 1: same receiver input, same effect
        other = path_patching(
            model, ps, PathPatchingParams(receivers=((1, 2, which),), freeze_mlps=True)
        )
        np.testing.assert_array_equal(other.head_metrics["path_patching"].mean[0], got[0])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_senders_at_or_after_the_receiver_have_no_effect(load, name):
    model = load(name)
    ps = _task("ioi", model.codec, {"n_prompts": 3})
    clean, _ = run_caches(model, ps.clean)
    corrupt, corrupt_logits = run_caches(model, ps.corrupt)
    last = model.n_layers - 1
    for which in ("q", "k", "v"):
        for head in range(model.n_heads):
            logits = path_patch_sender(
                model, ps.corrupt, Head(last, head), [(last, 0, which)], clean, corrupt
            )
            torch.testing.assert_close(logits, corrupt_logits, atol=1e-5, rtol=0)


def test_normalised_metric_and_params_from_json(load):
    model = load("tiny-gpt2")
    ps = _task("ioi", model.codec, {"n_prompts": 4})
    params = P.from_mapping(
        PathPatchingParams, {"receivers": [[1, 0, "v"]], "metric": "norm_logit_diff"}
    )
    assert params.receivers == ((1, 0, "v"),)
    raw = path_patching(model, ps, PathPatchingParams(receivers=((1, 0, "v"),)))
    norm = path_patching(model, ps, params)
    c, k = raw.info["clean_logit_diff"], raw.info["corrupt_logit_diff"]
    np.testing.assert_allclose(
        norm.head_metrics["path_patching"].mean[0],
        raw.head_metrics["path_patching"].mean[0] / (c - k),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"receivers": ((5, 0, "q"),)}, "out of range"),
        ({"receivers": ((1, 9, "q"),)}, "out of range"),
        ({"receivers": ((1, 0, "x"),)}, "bad receiver"),
        ({"receivers": "resid"}, "unknown receivers"),
        ({"receivers": ((1, 0, "q"),), "senders": ((1, 0),)}, "not before any receiver"),
        ({"senders": ((0, 7),)}, "out of range"),
        ({"metric": "kl"}, "unknown metric"),
    ],
)
def test_bad_input_is_a_one_line_error(load, kw, match):
    model = load("tiny-llama")
    ps = _task("ioi", model.codec, {"n_prompts": 2})
    with pytest.raises(WorkbenchError, match=match) as err:
        path_patching(model, ps, PathPatchingParams(**kw))
    assert "\n" not in str(err.value)


def test_hooks_removed_after_an_error(load):
    model = load("tiny-llama")
    ps = _task("ioi", model.codec, {"n_prompts": 2})

    def n_hooks():
        return sum(len(m._forward_hooks) for m in model.bridge.modules())

    before = n_hooks()
    clean, _ = run_caches(model, ps.clean)
    corrupt, _ = run_caches(model, ps.corrupt)
    with pytest.raises(IndexError):  # head 99 fails inside the receiver hook
        path_patch_sender(model, ps.corrupt, Head(0, 0), [(1, 99, "q")], clean, corrupt)
    assert n_hooks() == before


@pytest.mark.models
def test_smollm2_logits_receiver_equals_direct_path(smollm2):
    model = smollm2
    ps = _task("ioi", model.codec, {"n_prompts": 4})
    senders = ((9, 0), (20, 4), (29, 8))
    params = PathPatchingParams(senders=senders, freeze_mlps=True)
    got = path_patching(model, ps, params).head_metrics["path_patching"].mean
    final = hook_name("resid_post", model.n_layers - 1)
    base_logits, cache = _run(model, ps.corrupt, capture=[final])
    for layer, head in senders:
        delta = _sender_delta(model, ps, layer, head, ps.clean, ps.corrupt)
        logits = _logits_from_final_resid(model, cache[final] + delta)
        want = float((_ld(logits, ps) - _ld(base_logits, ps)).mean())
        assert got[layer, head] == pytest.approx(want, abs=1e-4, rel=1e-3)
    assert np.isnan(got).sum() == got.size - len(senders)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_batched_logits_sweep_equals_two_pass(load, name):
    """The batched, resumed logits-receiver sweep equals the two-pass algorithm for every sender,
    both directions, MLPs frozen or recomputed, suffix-only (first difference at 4) and, for
    tiny-gemma3 at 10 tokens (window 8), the full-resume path."""
    model = load(name)
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 50, (3, 10), generator=g)
    corrupt = clean.clone()
    corrupt[:, 4:] = torch.randint(0, 50, (3, 6), generator=g)
    ps = PromptSet("t", clean, corrupt, torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9]))
    for direction in ("denoising", "noising"):
        for freeze in (False, True):
            p = PathPatchingParams(direction=direction, freeze_mlps=freeze)
            fast = path_patching(model, ps, p)
            slow = path_patching(model, ps, p, reference=True)
            assert fast.info["method"] == "batched_resumed" and slow.info["method"] == "two_pass"
            for key in ("mean", "stderr"):
                a = getattr(fast.head_metrics["path_patching"], key)
                b = getattr(slow.head_metrics["path_patching"], key)
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
            assert np.abs(slow.head_metrics["path_patching"].mean).max() > 1e-3

"""Running KV-cache plans: the identities of the acceptance list (all-full and a window >= N are
the unmodified model, compensation over nothing changes nothing, mask mode equals real
eviction), the compensation against a plain per-query loop, and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.forward.eviction import CompactLayer, decode_with_eviction
from workbench.forward.plan import KVPlan
from workbench.forward.streaming import (
    StreamAttention,
    native_windows,
    plan_logits,
)
from workbench.hooks import record


def _tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, min(2000, model.cfg.d_vocab), (1, n), generator=g)


def _plan(model, full=(), *, sink=2, window=8, comp=True, weighted=True) -> KVPlan:
    native = tuple(sorted(native_windows(model).items()))
    full = set(full) | {(lay, g) for lay, _ in native for g in range(model.n_kv_heads)}
    return KVPlan(model.name, (model.n_layers, model.n_kv_heads), frozenset(full), sink, window,
                  comp, weighted, native)  # fmt: skip


def _base(model, toks):
    with torch.no_grad():
        return model.bridge(toks, prepend_bos=False, return_type="logits")


def _all(model):
    return [(a, b) for a in range(model.n_layers) for b in range(model.n_kv_heads)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt2"])
def test_all_full_and_a_long_window_are_the_unmodified_model(load, name):
    model = load(name)
    toks = _tokens(model, 40)
    base = _base(model, toks)
    assert (plan_logits(model, _plan(model, _all(model)), toks) - base).abs().max() <= 1e-6
    long = _plan(model, window=40)  # every global KV head streams, but nothing is dropped
    assert (plan_logits(model, long, toks) - base).abs().max() <= 1e-6
    short = _plan(model, window=8)
    assert (plan_logits(model, short, toks) - base).abs().max() > 1e-2  # the plan does act


def test_compensation_over_an_empty_dropped_set_changes_nothing(load):
    model = load("tiny-llama")
    toks = _tokens(model, 40)
    base = _base(model, toks)
    plan = _plan(model, sink=2, window=8)
    out = plan_logits(model, plan, toks)
    free = plan.sink + plan.window  # queries q < sink + window drop no key
    assert (out[:, :free] - base[:, :free]).abs().max() <= 1e-6
    assert (out[:, free:] - base[:, free:]).abs().max() > 1e-2
    off = plan_logits(model, _plan(model, sink=2, window=8, comp=False), toks)
    assert (off[:, :free] - out[:, :free]).abs().max() <= 1e-6
    assert (off[:, free:] - out[:, free:]).abs().max() > 1e-3  # and it acts where keys drop


def test_hooks_are_removed_even_after_an_error(load):
    model = load("tiny-llama")
    toks = _tokens(model, 30)
    base = _base(model, toks)
    with pytest.raises(RuntimeError), StreamAttention(model, _plan(model)):
        raise RuntimeError("boom")
    assert (_base(model, toks) - base).abs().max() == 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


@pytest.mark.parametrize(("comp", "weighted"), [(True, True), (True, False), (False, False)])
def test_mask_mode_equals_real_eviction(load, comp, weighted):
    model = load("tiny-llama")
    toks = _tokens(model, 48, seed=1)
    plan = _plan(model, [(1, 0)], sink=3, window=9, comp=comp, weighted=weighted)
    masked = plan_logits(model, plan, toks)[0]
    dec = decode_with_eviction(model, plan, toks[0], feed_last=20, chunk=16)
    assert dec.start == 28 and dec.logits.shape[0] == 20
    assert _rel(dec.logits, masked[dec.start :]) <= 1e-5
    # layers where every KV head streams hold sink + window positions, the others all 48
    compact = sum(all((lay, g) not in plan.full for g in range(model.n_kv_heads))
                  for lay in range(model.n_layers))  # fmt: skip
    assert 0 < compact < model.n_layers
    want = (model.n_layers - compact + compact * (3 + 9) / 48) / model.n_layers
    assert dec.cache_fraction == pytest.approx(want, rel=1e-12)
    full = _plan(model, _all(model))
    floor = decode_with_eviction(model, full, toks[0], feed_last=20, chunk=16)
    assert _rel(floor.logits, _base(model, toks)[0, dec.start :]) <= 1e-5
    assert floor.cache_fraction == 1.0 and floor.full_cache_bytes == dec.full_cache_bytes


def test_removal_next_to_a_natively_sliding_layer_equals_mask_mode(load):
    # tiny Gemma 3: layer 0 slides natively (window 8, its own cache layer), layer 1 is global
    # and streams both KV heads, so its entries are removed; positions come from layer 0
    model = load("tiny-gemma3")
    toks = _tokens(model, 40, seed=3)
    plan = _plan(model, sink=2, window=7)
    masked = plan_logits(model, plan, toks)[0]
    assert _rel(masked, _base(model, toks)[0]) > 1e-3
    dec = decode_with_eviction(model, plan, toks[0], feed_last=15, chunk=10)
    assert _rel(dec.logits, masked[dec.start :]) <= 1e-5
    assert dec.cache_fraction < 1.0


def test_a_cache_that_loses_the_absolute_length_is_refused(load, monkeypatch):
    # a compacted layer must still report the whole sequence's length, or positions go wrong
    model = load("tiny-llama")
    toks = _tokens(model, 30, seed=1)
    plan = _plan(model, [(1, 0)], sink=2, window=6)  # layer 0 streams every KV head
    monkeypatch.setattr(CompactLayer, "get_seq_length", CompactLayer.__mro__[1].get_seq_length)
    with pytest.raises(WorkbenchError, match="positions would be wrong") as err:
        decode_with_eviction(model, plan, toks[0], feed_last=10)
    assert "\n" not in str(err.value)


def test_greedy_decoding_in_decode_mode_follows_its_own_logits(load):
    model = load("tiny-llama")
    toks = _tokens(model, 40, seed=2)
    plan = _plan(model, [(0, 1)], sink=2, window=6)
    dec = decode_with_eviction(model, plan, toks[0], feed_last=5, max_new_tokens=4)
    assert len(dec.tokens) == 4 and dec.logits.shape[0] == 5 + 3
    assert dec.tokens[0] == int(dec.logits[4].argmax())
    assert dec.tokens[1:] == [int(x) for x in dec.logits[5:].argmax(-1)]
    # teacher forcing the same tokens gives the same logits
    forced = decode_with_eviction(
        model, plan, toks[0], feed_last=5, forced=torch.tensor(dec.tokens[:3])
    )
    assert _rel(forced.logits, dec.logits) <= 1e-6


def test_the_compensated_head_output_equals_a_per_query_loop(load):
    """z of a streaming head against softmax over [kept keys, virtual key] written out: the
    virtual key is the mean of the dropped rotated keys, counted |D(q)| times."""
    model = load("tiny-llama")
    toks = _tokens(model, 24, seed=3)
    sink, window, layer = 2, 5, 1
    plan = _plan(model, [(0, 0), (0, 1), (1, 1)], sink=sink, window=window)  # (1, 0) streams
    kinds = ["rot_q", "rot_k", "v", "z"]
    rec = record(
        model.bridge, toks, [(k, layer) for k in kinds], during=StreamAttention(model, plan).hooks()
    )
    q, k, v, z = (rec.acts[(kind, layer)][0].double() for kind in kinds)
    group = model.n_heads // model.n_kv_heads
    scale = model.bridge.blocks[layer].attn.original_component.scaling
    for h in range(group):  # the query heads of KV head 0
        for t in range(toks.shape[1]):
            kept = [j for j in range(t + 1) if j < sink or j > t - window]
            dropped = [j for j in range(t + 1) if j not in kept]
            logits = [float(q[t, h] @ k[j, 0]) * scale for j in kept]
            vals = [v[j, 0] for j in kept]
            if dropped:
                kc, vc = k[dropped, 0].mean(0), v[dropped, 0].mean(0)
                logits.append(float(q[t, h] @ kc) * scale + math.log(len(dropped)))
                vals.append(vc)
            w = torch.softmax(torch.tensor(logits, dtype=torch.double), 0)
            want = sum(wi * vi for wi, vi in zip(w, vals, strict=True))
            assert torch.allclose(z[t, h], want, atol=1e-5), (h, t)


def test_bad_plans_are_refused_in_one_line(load):
    llama, gemma = load("tiny-llama"), load("tiny-gemma3")
    other = KVPlan("tiny-gpt2", (llama.n_layers, llama.n_kv_heads), frozenset())
    with pytest.raises(WorkbenchError, match="built for tiny-gpt2"):
        StreamAttention(llama, other)
    with pytest.raises(WorkbenchError, match="grid"):
        StreamAttention(llama, KVPlan(llama.name, (9, 9), frozenset()))
    sliding = KVPlan(gemma.name, (gemma.n_layers, gemma.n_kv_heads), frozenset())
    with pytest.raises(WorkbenchError, match="already slides"):
        StreamAttention(gemma, sliding)
    with pytest.raises(WorkbenchError, match="mode"):
        StreamAttention(llama, _plan(llama), mode="fast")
    with pytest.raises(WorkbenchError, match="window"):
        KVPlan(llama.name, (2, 2), frozenset(), window=0)


def test_a_bridge_whose_scores_are_not_q_dot_k_is_refused(load, monkeypatch):
    model = load("tiny-llama")
    s = StreamAttention(model, _plan(model))
    for st in s.layers.values():
        st.scale *= 1.5  # what a changed score formula would look like to the compensation
    with pytest.raises(WorkbenchError, match="not q_rot"), s, torch.no_grad():
        model.bridge(_tokens(model, 20), prepend_bos=False, return_type="logits")


@pytest.mark.models
def test_smollm2_identities_and_mask_equals_eviction(smollm2):
    model = smollm2
    toks = _tokens(model, 300, seed=4)
    base = _base(model, toks)
    assert (plan_logits(model, _plan(model, _all(model)), toks) - base).abs().max() <= 1e-6
    assert (plan_logits(model, _plan(model, window=300), toks) - base).abs().max() <= 1e-6
    heads = [h for i, h in enumerate(_all(model)) if i % 5 == 0]
    plan = _plan(model, heads, sink=4, window=64)
    masked = plan_logits(model, plan, toks)[0]
    assert _rel(masked, base[0]) > 1e-2
    dec = decode_with_eviction(model, plan, toks[0], feed_last=12, chunk=128)
    assert _rel(dec.logits, masked[dec.start :]) <= 1e-5
    assert dec.cache_fraction < 0.9  # the layers without a full KV head really shrank

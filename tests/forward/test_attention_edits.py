"""ACT calibration and PASTA steering: identities (beta = 1, alpha = 1 change nothing), rows
still sum to one, the first sink column is never scaled down, both against plain loops written
from the papers' definitions, the sink criterion shared with attention_sinks, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import (
    calibrate_attention,
    calibrate_pattern,
    column_scores,
    sink_columns,
    sink_set,
    steer_attention,
)
from workbench.hooks import hook_name, hooked
from workbench.types import Head

MODELS = ["tiny-llama", "tiny-gemma3", "tiny-gpt2"]


def _tokens(model, n=2, t=14, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, min(60, model.cfg.d_vocab), (n, t), generator=gen)


def _logits(model, tokens):
    with torch.no_grad():
        return model.bridge(tokens, prepend_bos=False, return_type="logits")


def _patterns(model, tokens, layer):
    got = {}

    def keep(p, hook):
        got["p"] = p.detach().clone()

    with torch.no_grad(), hooked(model.bridge, [(hook_name("pattern", layer), keep)]):
        model.bridge(tokens, prepend_bos=False, return_type="logits")
    return got["p"]


def _act_loop(a: np.ndarray, tau: float, beta: float) -> np.ndarray:
    """ACT for one head's [q, k] pattern, written out: column scores, sink set, per row."""
    n = a.shape[0]
    s = [sum(a[i, j] for i in range(j, n)) / (n - j) for j in range(n)]
    over = [j for j in range(n) if s[j] > tau]
    sinks = set(over[1:])
    out = a.copy()
    for i in range(n):  # the freed mass goes to the other keys in proportion to their weights
        freed = (1 - beta) * sum(a[i, j] for j in sinks)
        rest = sum(a[i, j] for j in range(n) if j not in sinks)
        if rest <= 1e-12:
            continue
        for j in range(n):
            out[i, j] = beta * a[i, j] if j in sinks else a[i, j] + freed * a[i, j] / rest
    return out


@pytest.mark.parametrize("name", MODELS)
def test_beta_one_and_alpha_one_change_nothing(load, name):
    model = load(name)
    tokens = _tokens(model)
    heads = [Head(0, 0), Head(model.n_layers - 1, model.n_heads - 1)]
    base = _logits(model, tokens)
    with calibrate_attention(model, heads, tau=0.05, beta=1.0):
        same = _logits(model, tokens)
    with steer_attention(model, heads, [(3, 7)], alpha=1.0):
        same2 = _logits(model, tokens)
    torch.testing.assert_close(same, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(same2, base, atol=1e-6, rtol=0)
    with calibrate_attention(model, heads, tau=0.05, beta=0.2):
        moved = _logits(model, tokens)
    with steer_attention(model, heads, [(3, 7)], alpha=0.01):
        moved2 = _logits(model, tokens)
    assert (moved - base).abs().max() > 1e-4 and (moved2 - base).abs().max() > 1e-4
    torch.testing.assert_close(_logits(model, tokens), base, atol=0, rtol=0)  # hooks removed


def test_act_matches_the_written_out_definition_and_keeps_rows_summing_to_one(load):
    model = load("tiny-llama")
    tokens = _tokens(model, n=2, t=12)
    p = _patterns(model, tokens, 1)  # [b, h, q, k]
    for tau in (0.05, 0.1, 0.2):
        s = sink_columns(p, tau)
        new = calibrate_pattern(p, s, 0.4)
        torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)), atol=1e-5, rtol=0)
        for b in range(p.shape[0]):
            for h in range(p.shape[1]):
                want = _act_loop(p[b, h].double().numpy(), tau, 0.4)
                np.testing.assert_allclose(new[b, h].numpy(), want, atol=1e-6)
        over = column_scores(p) > tau
        first = over.float().argmax(-1)  # the first sink column found, per (row, head)
        has = over.any(-1)
        assert not s.gather(-1, first[..., None])[..., 0][has].any()  # never in S
        kept = new.gather(-1, first[..., None, None].expand(*first.shape, p.shape[2], 1))
        orig = p.gather(-1, first[..., None, None].expand(*first.shape, p.shape[2], 1))
        assert (kept >= orig - 1e-7).all()  # the first sink column is never scaled down


def test_act_inside_the_model_sums_to_one_and_touches_only_the_chosen_heads(load):
    model = load("tiny-llama")
    tokens = _tokens(model)
    seen = {}

    def after(p, hook):
        seen["p"] = p.detach().clone()

    before = _patterns(model, tokens, 1)
    with calibrate_attention(model, [Head(1, 2)], tau=0.05, beta=0.1):  # noqa: SIM117
        with hooked(model.bridge, [(hook_name("pattern", 1), after)]):
            _logits(model, tokens)
    got = seen["p"]
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5, rtol=0)
    others = [h for h in range(model.n_heads) if h != 2]
    torch.testing.assert_close(got[:, others], before[:, others], atol=0, rtol=0)
    assert (got[:, 2] - before[:, 2]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_pasta_equals_down_weighting_and_renormalising_the_pattern(load, name):
    model = load(name)
    tokens = _tokens(model, n=2, t=14)
    spans = [(2, 5), (6, 11)]
    layer = model.n_layers - 1
    before = _patterns(model, tokens, layer)
    seen = {}

    def after(p, hook):
        seen["p"] = p.detach().clone()

    with steer_attention(model, [Head(layer, 1)], spans, alpha=0.05):  # noqa: SIM117
        with hooked(model.bridge, [(hook_name("pattern", layer), after)]):
            _logits(model, tokens)
    got = seen["p"]
    for r, (a, b) in enumerate(spans):
        w = torch.full((tokens.shape[1],), 0.05)
        w[a:b] = 1.0
        want = before[r, 1] * w
        want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(got[r, 1], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[:, 0], before[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5, rtol=0)


def test_pasta_leaves_generated_keys_alone_under_a_kv_cache(load):
    """Cached decoding after a steered prompt: keys of the prompt outside the span keep their
    log alpha, the new token's own key is not steered; equals a full forward with the prompt
    length given."""
    model = load("tiny-llama")
    tokens = _tokens(model, n=1, t=12)
    heads = [Head(0, 1), Head(1, 0)]
    with torch.no_grad():
        with steer_attention(model, heads, [(2, 6)], alpha=0.1, prompt_lens=[10]):
            full = model.bridge(tokens, prepend_bos=False, return_type="logits")
        with steer_attention(model, heads, [(2, 6)], alpha=0.1):
            _, cache = model.bridge(tokens[:, :10], prepend_bos=False,
                                    return_type="logits_and_cache", use_cache=True)  # fmt: skip
            step = []
            for t in (10, 11):
                out, cache = model.bridge(tokens[:, t : t + 1], prepend_bos=False,
                                          return_type="logits_and_cache", use_cache=True,
                                          past_key_values=cache)  # fmt: skip
                step.append(out[0, -1])
    torch.testing.assert_close(torch.stack(step), full[0, 10:], atol=1e-5, rtol=1e-5)


def test_attention_sinks_hidden_sinks_are_acts_sink_columns(load):
    """The same column criterion: on the same patterns, attention_sinks' hidden sinks (at its
    epsilon, all positions) name exactly ACT's sink set."""
    from workbench.analyses.attention_sinks.compute import collect_statistics

    model = load("tiny-llama")
    tokens = _tokens(model, n=3, t=16, seed=3)
    stats = collect_statistics(model, tokens, 8)
    found = 0
    for eps in (0.05, 0.1, 0.3):
        hidden = sink_set(stats.alpha > eps)  # what _hidden_table lists
        for layer in range(model.n_layers):
            act = sink_columns(_patterns(model, tokens, layer), eps).numpy()
            assert (hidden[:, layer] == act).all()
        found += int(hidden.sum())
    assert found > 0  # the comparison saw sink columns


def test_bad_input_is_one_line_errors(load):
    model = load("tiny-llama")
    tokens = _tokens(model)
    with pytest.raises(WorkbenchError, match="outside its 14-token prompt"):  # noqa: SIM117
        with steer_attention(model, [Head(0, 0)], [(3, 20)]):
            _logits(model, tokens)
    for bad in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(WorkbenchError, match="alpha must be in"):  # noqa: SIM117
            with steer_attention(model, [Head(0, 0)], [(1, 2)], alpha=bad):
                pass
        with pytest.raises(WorkbenchError, match="beta must be in"):  # noqa: SIM117
            with calibrate_attention(model, [Head(0, 0)], beta=bad):
                pass
    with pytest.raises(WorkbenchError, match="outside the model"):  # noqa: SIM117
        with calibrate_attention(model, [Head(0, model.n_heads)]):
            pass
    before = _logits(model, tokens)
    with pytest.raises(WorkbenchError):  # noqa: SIM117
        with steer_attention(model, [Head(0, 0)], [(1, 2), (1, 3), (2, 3)]):
            _logits(model, tokens)  # 3 spans, 2 prompts: refused inside the forward
    torch.testing.assert_close(_logits(model, tokens), before, atol=0, rtol=0)  # hooks gone


@pytest.mark.models
def test_identities_on_smollm2(smollm2):
    tokens = _tokens(smollm2, n=1, t=24)
    heads = [Head(la, h) for la in range(smollm2.n_layers) for h in range(smollm2.n_heads)]
    base = _logits(smollm2, tokens)
    with calibrate_attention(smollm2, heads, beta=1.0):
        torch.testing.assert_close(_logits(smollm2, tokens), base, atol=1e-6, rtol=0)
    with steer_attention(smollm2, heads, [(5, 9)], alpha=1.0):
        torch.testing.assert_close(_logits(smollm2, tokens), base, atol=1e-6, rtol=0)
    with calibrate_attention(smollm2, heads, beta=0.4):
        assert (_logits(smollm2, tokens) - base).abs().max() > 1e-4


# ---- behaviours to know ------------------------------------------------------------------------


def _windowed(n: int, w: int, seed: int = 0) -> torch.Tensor:
    """A ``[1, 1, n, n]`` pattern with a sliding window: row ``i`` puts random positive weight on
    keys ``max(0, i - w + 1) .. i`` and 0 elsewhere, each row summing to one."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=gen, dtype=torch.float64) + 0.1
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    a = a * ((j <= i) & (i - j < w))
    return (a / a.sum(-1, keepdim=True))[None, None]


def test_column_score_divides_by_n_minus_j_on_sliding_window_layers_too():
    """Window 3 over 8 keys: key j is seen by min(3, 8 - j) queries, but s_j divides by 8 - j
    (the causal count), so early keys score lower than the mean over the queries that see them."""
    n, w = 8, 3
    p = _windowed(n, w)
    assert (p[0, 0].sum(-1) - 1).abs().max() < 1e-12
    got = column_scores(p)[0, 0].double()
    col = p[0, 0].sum(0)
    causal = torch.tensor([n - j for j in range(n)], dtype=torch.float64)
    seen = torch.tensor([min(w, n - j) for j in range(n)], dtype=torch.float64)
    torch.testing.assert_close(got, col / causal, atol=1e-6, rtol=0)
    early = seen < causal  # keys j < n - w
    assert early.sum() == n - w
    assert (got[early] < (col / seen)[early] - 1e-3).all()  # not the windowed mean there
    torch.testing.assert_close(got[~early], (col / seen)[~early], atol=1e-6, rtol=0)


def test_column_score_on_a_sliding_window_layer_of_tiny_gemma3(load):
    """tiny-gemma3's layer 0 attends to the last 8 keys: over 16 tokens its pattern is 0 past the
    window, and column_scores still divides by N - j."""
    model = load("tiny-gemma3")
    n = 16
    p = _patterns(model, _tokens(model, n=1, t=n), 0)  # [1, head, q, k]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    outside = (i - j >= 8) & (j <= i)
    assert outside.any() and p[..., outside].abs().max() == 0  # the window is in the pattern
    want = p.float().sum(-2) / torch.tensor([n - k for k in range(n)], dtype=torch.float32)
    torch.testing.assert_close(column_scores(p), want, atol=1e-6, rtol=0)


def test_rows_with_all_weight_on_the_sink_set_are_left_unchanged():
    """Sinks S = {1, 2}: row 2 puts all its weight on S (nothing outside S to give the mass to)
    and is returned unchanged; rows with weight on S and elsewhere are calibrated; rows with no
    weight on S are unchanged; every row sums to one."""
    p = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.3, 0.7, 0.0, 0.0],
            [0.0, 0.4, 0.6, 0.0],  # all on S
            [0.1, 0.2, 0.3, 0.4],
        ]
    )[None, None]  # float32, as patterns are (calibrate_pattern computes in float32)
    sinks = torch.tensor([False, True, True, False])[None, None]
    beta = 0.4
    new = calibrate_pattern(p, sinks, beta)
    torch.testing.assert_close(new[0, 0, 2], p[0, 0, 2], atol=0, rtol=0)
    torch.testing.assert_close(new[0, 0, 0], p[0, 0, 0], atol=0, rtol=0)  # m_0 = 0
    for i in (1, 3):
        assert (new[0, 0, i] - p[0, 0, i]).abs().max() > 0.05
        m = float(p[0, 0, i, 1:3].sum())
        want = p[0, 0, i].clone()
        want[1:3] *= beta
        want[[0, 3]] *= 1 + (1 - beta) * m / (1 - m)
        torch.testing.assert_close(new[0, 0, i], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(new.sum(-1), torch.ones(1, 1, 4), atol=1e-6, rtol=0)
    # the same row found through the sink criterion: s = (0.35, 1.3/3, 0.45, 0.4) > 0.3 on
    # every column, the first kept, so S = {1, 2, 3} and row 2 (all on S) stays as it is
    s = sink_columns(p, 0.3)
    assert s[0, 0].tolist() == [False, True, True, True]
    torch.testing.assert_close(calibrate_pattern(p, s, beta)[0, 0, 2], p[0, 0, 2], atol=0, rtol=0)


def test_one_cached_row_scores_its_own_columns():
    """A cached decoding step's pattern ``[.., 1, n_k]``: s_j is the row's own weight on j."""
    gen = torch.Generator().manual_seed(1)
    row = torch.softmax(torch.randn(2, 3, 1, 9, generator=gen), -1)
    torch.testing.assert_close(column_scores(row), row[..., 0, :], atol=0, rtol=0)
    assert sink_columns(row, 0.1).tolist() == sink_set(row[..., 0, :] > 0.1).tolist()


def test_act_under_a_kv_cache_is_not_full_forward_act(load):
    """tiny-llama, every head: the last token decoded with the KV cache under ACT (prefix
    prefilled with or without the edit) gives other logits than full-forward ACT at the last
    position; it equals a full forward in which only the last row is calibrated with that row's
    own sink set (prefix prefilled without the edit); at beta = 1 all of them are equal."""
    from workbench.forward.decode import forward_step

    model = load("tiny-llama")
    tokens = _tokens(model, n=1, t=16, seed=4)[0]
    heads = [Head(la, h) for la in range(model.n_layers) for h in range(model.n_heads)]
    tau = 0.1

    def full(beta):
        with calibrate_attention(model, heads, tau=tau, beta=beta):
            return _logits(model, tokens[None])[0, -1]

    def cached(beta, edit_prefix):
        with torch.no_grad():
            if edit_prefix:
                with calibrate_attention(model, heads, tau=tau, beta=beta):
                    _, cache = forward_step(model, tokens[:-1], None)
            else:
                _, cache = forward_step(model, tokens[:-1], None)
            with calibrate_attention(model, heads, tau=tau, beta=beta):
                out, _ = forward_step(model, tokens[-1:], cache)
        return out[-1]

    def last_row_only(beta):
        def hook(p, hook):
            out = p.clone()
            row = p[:, :, -1:]
            out[:, :, -1:] = calibrate_pattern(row, sink_columns(row, tau), beta)
            return out

        hooks = [(hook_name("pattern", la), hook) for la in range(model.n_layers)]
        with hooked(model.bridge, hooks):
            return _logits(model, tokens[None])[0, -1]

    base = _logits(model, tokens[None])[0, -1]
    assert (full(0.4) - base).abs().max() > 1e-3  # full-forward ACT moves the logits
    for edit_prefix in (False, True):
        assert (cached(0.4, edit_prefix) - full(0.4)).abs().max() > 1e-3
        torch.testing.assert_close(cached(1.0, edit_prefix), full(1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(cached(0.4, False), last_row_only(0.4), atol=1e-4, rtol=0)
    assert (cached(0.4, False) - base).abs().max() > 1e-4  # the new row's own sinks do move it

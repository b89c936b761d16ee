"""Activation patching: the fast exact sweep equals the slow reference loop and TransformerLens's
own ``patching`` functions, resuming equals a full forward, and the toy model's induction head
comes out on top."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching

from workbench.analyses.activation_patching import ActivationPatchingParams
from workbench.analyses.activation_patching.compute import activation_patching
from workbench.errors import WorkbenchError
from workbench.forward.resume import ResumableRun
from workbench.hooks import hook_name
from workbench.metrics import logit_diff
from workbench.tasks import build_task
from workbench.types import PromptSet

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gemma3"]
COMPONENTS = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]


def _pairs(n: int = 3, seq_len: int = 10, diff_from: int = 4) -> PromptSet:
    """Random clean/corrupt pairs equal up to ``diff_from``; 10 > tiny-gemma3's window of 8."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50, (n, seq_len), generator=g)
    corrupt = clean.clone()
    corrupt[:, diff_from:] = torch.randint(0, 50, (n, seq_len - diff_from), generator=g)
    return PromptSet("t", clean, corrupt, torch.arange(1, n + 1), torch.arange(10, 10 + n))


def _grid(out):
    return out.tables["grid"].sort_values(["layer", "head", "pos"]).reset_index(drop=True)


@pytest.mark.parametrize("name", TINY)
def test_resume_equals_full_forward(load, name):
    """Blocks l..L-1 called with the recorded arguments, then final norm + unembed of the last
    position only, give the full forward's final logits (batched variants, every l)."""
    model = load(name)
    tokens = _pairs().corrupt
    run = ResumableRun(model, tokens)
    with torch.inference_mode():
        full = model.bridge(tokens, prepend_bos=False)[:, -1]
    torch.testing.assert_close(run.final_logits, full, atol=1e-5, rtol=0)
    for layer in range(model.n_layers):
        got = run.run_from(layer, run.resid(layer).repeat(3, 1, 1))
        torch.testing.assert_close(got, full.repeat(3, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_last_block_for_the_final_query_only(load, name):
    """The last block run for the final query (keys and values of the other positions from a run
    stopped at the cache update) gives the whole block's final logits, suffix-only or not."""
    model = load(name)
    for seq_len, start in ((10, 4), (6, 2)):  # tiny-gemma3's window is 8: 10 disables the prefix
        run = ResumableRun(model, _pairs(seq_len=seq_len, diff_from=start).corrupt)
        prefix = run.prefix_kv(start)
        s = start if prefix is not None else 0
        for layer in range(model.n_layers):
            rows = {layer: run.resid(layer)[:, s:].repeat(2, 1, 1)}
            fast = run.run_wave(rows, start=s, prefix=prefix, last_query_only=True)
            full = run.run_wave(rows, start=s, prefix=prefix, last_query_only=False)
            torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
            torch.testing.assert_close(fast, run.final_logits.repeat(2, 1), atol=1e-5, rtol=0)
        assert run.last_query_ok  # the model called the cache: no fallback to the whole block


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("component", COMPONENTS)
def test_fast_equals_reference(load, name, component):
    """Every component, both directions, per position on/off: fast == reference (atol 1e-5),
    and skipping the identical prefix changes nothing (denoising: == reference computed over all
    positions)."""
    model = load(name)
    ps = _pairs()
    for direction in ("denoising", "noising"):
        for per_position in (False, True):
            kw = dict(component=component, direction=direction, per_position=per_position)
            ref_positions = "all" if direction == "denoising" else "from_first_diff"
            fast = _grid(
                activation_patching(model, ps, ActivationPatchingParams(**kw, batch_tokens=40))
            )
            ref = _grid(
                activation_patching(
                    model,
                    ps,
                    ActivationPatchingParams(**kw, positions=ref_positions),
                    reference=True,
                )
            )
            assert fast[["layer", "head", "pos"]].equals(ref[["layer", "head", "pos"]])
            torch.testing.assert_close(
                torch.tensor(fast.value.values), torch.tensor(ref.value.values), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                torch.tensor(fast.stderr.values), torch.tensor(ref.stderr.values), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("metric", ["norm_logit_diff", "prob", "loss", "kl"])
def test_metrics_fast_equals_reference(load, metric):
    model = load("tiny-llama")
    ps = _pairs()
    p = ActivationPatchingParams(component="z", per_position=True, metric=metric)
    fast = _grid(activation_patching(model, ps, p))
    ref = _grid(activation_patching(model, ps, p, reference=True))
    torch.testing.assert_close(
        torch.tensor(fast.value.values), torch.tensor(ref.value.values), atol=1e-5, rtol=0
    )


def _tl_clean_cache(model, ps):
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ps.clean, prepend_bos=False)
    return cache


def _tl_metric(ps):
    return lambda logits: logit_diff(logits[:, -1], ps.correct, ps.incorrect).mean()


def _ours(model, ps, component, per_position=False, layers=()):
    out = activation_patching(
        model,
        ps,
        ActivationPatchingParams(component=component, per_position=per_position, layers=layers),
    )
    return out, _grid(out)


@pytest.mark.parametrize("name", TINY)
def test_equals_transformer_lens(load, name):
    """TL's sweeps (one full forward per index) on the bridge give our numbers."""
    model = load(name)
    ps = _pairs(diff_from=3)
    cache, metric = _tl_clean_cache(model, ps), _tl_metric(ps)
    L, T = model.n_layers, ps.seq_len
    with torch.inference_mode():
        tl = {
            "z": patching.get_act_patch_attn_head_out_all_pos(
                model.bridge, ps.corrupt, cache, metric
            ),
            "q": patching.get_act_patch_attn_head_q_all_pos(
                model.bridge, ps.corrupt, cache, metric
            ),
            "k": patching.get_act_patch_attn_head_k_all_pos(
                model.bridge, ps.corrupt, cache, metric
            ),
            "v": patching.get_act_patch_attn_head_v_all_pos(
                model.bridge, ps.corrupt, cache, metric
            ),
            "pattern": patching.get_act_patch_attn_head_pattern_all_pos(
                model.bridge, ps.corrupt, cache, metric
            ),
            "resid_pre": patching.get_act_patch_resid_pre(model.bridge, ps.corrupt, cache, metric),
            "attn_out": patching.get_act_patch_attn_out(model.bridge, ps.corrupt, cache, metric),
            "mlp_out": patching.get_act_patch_mlp_out(model.bridge, ps.corrupt, cache, metric),
            "z_pos": patching.get_act_patch_attn_head_out_by_pos(
                model.bridge, ps.corrupt, cache, metric
            ),
        }
    for comp in ("z", "q", "k", "v", "pattern"):
        out, _ = _ours(model, ps, comp)
        got = torch.tensor(out.head_metrics["logit_diff"].mean, dtype=torch.float32)
        torch.testing.assert_close(got, tl[comp].float(), atol=1e-5, rtol=0)
    assert tl["k"].shape == tl["v"].shape == (L, model.n_kv_heads)  # GQA: per KV head, as ours
    assert tl["q"].shape == (L, model.n_heads)
    for comp in ("resid_pre", "attn_out", "mlp_out"):
        _, grid = _ours(model, ps, comp, per_position=True)
        got = torch.tensor(grid.value.values, dtype=torch.float32).reshape(L, T)
        torch.testing.assert_close(got, tl[comp].float(), atol=1e-5, rtol=0)
    _, grid = _ours(model, ps, "z", per_position=True)  # rows sorted by (layer, head, pos)
    got = torch.tensor(grid.value.values, dtype=torch.float32).reshape(L, model.n_heads, T)
    torch.testing.assert_close(got, tl["z_pos"].float().permute(0, 2, 1), atol=1e-5, rtol=0)


def test_toy_induction_head_first(load):
    """Denoising z on the induction task puts the trained induction head L1H0 first."""
    toy = load("toy-induction")
    ps = build_task("induction", toy.codec, {"n_prompts": 16, "seq_len": 8})
    out = activation_patching(toy, ps, ActivationPatchingParams(component="z"))
    mean = out.head_metrics["logit_diff"].mean
    layer, head = divmod(int(mean.argmax()), mean.shape[1])
    assert (layer, head) == (1, 0), mean


def test_output_shape_and_info(load):
    model = load("tiny-llama")
    ps = _pairs(diff_from=5)
    out = activation_patching(model, ps, ActivationPatchingParams(component="v", per_position=True))
    grid = out.tables["grid"]
    assert set(grid.columns) >= {
        "component",
        "layer",
        "head",
        "pos",
        "metric",
        "value",
        "stderr",
        "n",
    }
    assert grid["head"].max() == model.n_kv_heads - 1 and bool(grid.kv_head.all())
    assert out.info["first_diff_pos"] == 5
    assert out.info["positions_filled_with_baseline"] == [0, 1, 2, 3, 4]
    assert not grid[grid.pos < 5].computed.any() and grid[grid.pos >= 5].computed.all()
    base = out.info["baseline_corrupted"]
    assert (grid[grid.pos < 5].value - base).abs().max() < 1e-6
    assert out.info["cost_forward_equivalents"] < out.info["cost_one_forward_per_index"]
    assert out.info["recomputed_from_pos"] == 5  # suffix-only resume with the prefix's K/V
    gemma = load("tiny-gemma3")  # seq 10 > window 8: HF's sliding cache is cut, full resume
    assert (
        activation_patching(gemma, ps, ActivationPatchingParams()).info["recomputed_from_pos"] == 0
    )
    kv = activation_patching(model, ps, ActivationPatchingParams(component="k"))
    assert kv.head_metrics["logit_diff"].mean.shape == (model.n_layers, model.n_kv_heads)
    assert kv.info["head_axis"] == "kv_head"


def _no_hooks_left(bridge) -> bool:
    return all(not hp._forward_hooks for hp in bridge.hook_dict.values())


def test_hooks_removed_after_error(load):
    model = load("tiny-llama")
    run = ResumableRun(model, _pairs().corrupt)

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run.run_from(0, run.resid(0), [(hook_name("z", 1), boom)])
    assert _no_hooks_left(model.bridge)


def test_bad_input(load, monkeypatch):
    model = load("tiny-llama")
    ps = _pairs()
    p = ActivationPatchingParams()
    bad_shape = PromptSet("t", ps.clean, ps.corrupt[:, :-1], ps.correct, ps.incorrect)
    bad_ids = PromptSet("t", ps.clean, ps.corrupt, ps.correct + 10**6, ps.incorrect)
    cases = [
        (bad_shape, p, "token shapes differ"),
        (bad_ids, p, "outside the vocabulary"),
        (ps, ActivationPatchingParams(layers=(model.n_layers,)), "out of range"),
        (ps, ActivationPatchingParams(component="nope"), "unknown component"),  # type: ignore[arg-type]
        (ps, ActivationPatchingParams(batch_tokens=0), "batch_tokens"),
    ]
    for prompts, params, msg in cases:
        with pytest.raises(WorkbenchError, match=msg) as err:
            activation_patching(model, prompts, params)
        assert "\n" not in str(err.value)
    import workbench.metrics as M

    def sweep_must_not_run(*a, **k):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(M, "logit_diff", lambda logits, c, i: torch.full(c.shape, float("nan")))
    monkeypatch.setattr(
        "workbench.analyses.activation_patching.compute.fast_sweep", sweep_must_not_run
    )
    with pytest.raises(WorkbenchError, match="NaN"):
        activation_patching(model, ps, p)


# ---- real models ---------------------------------------------------------------------------


def _tl_subset(model, ps, fn, index_df):
    kw = fn.keywords
    with torch.inference_mode():
        return patching.generic_activation_patch(
            model.bridge,
            ps.corrupt,
            _tl_clean_cache(model, ps),
            _tl_metric(ps),
            patch_setter=kw["patch_setter"],
            activation_name=kw["activation_name"],
            index_df=index_df,
        )


@pytest.mark.models
def test_smollm2_ioi_equals_transformer_lens(smollm2, monkeypatch):
    """IOI on SmolLM2 (GQA 9/3): z per head, resid_pre / attn_out / mlp_out per position on a
    subset of layers (TL's full sweeps take minutes on 2 cores) equal TL's. Ours on the oneDNN
    linear backend (as shipped where it is faster), TL on the default one."""
    monkeypatch.setenv("WORKBENCH_LINEAR_BACKEND", "onednn")
    ps = build_task("ioi", smollm2.codec, {"n_prompts": 4})
    layers = (0, 13, 29)
    T, H = ps.seq_len, smollm2.n_heads
    df = patching.make_df_from_ranges([1, H], ["layer", "head"])
    z_df = pd.concat([df.assign(layer=layer) for layer in layers])
    tl = _tl_subset(smollm2, ps, patching.get_act_patch_attn_head_out_all_pos, z_df)
    out, _ = _ours(smollm2, ps, "z", layers=layers)
    got = torch.tensor(out.head_metrics["logit_diff"].mean[list(layers)], dtype=torch.float32)
    torch.testing.assert_close(got.reshape(-1), tl.float(), atol=1e-4, rtol=0)
    kv_df = patching.make_df_from_ranges([1, smollm2.n_kv_heads], ["layer", "head"])
    kv_df = pd.concat([kv_df.assign(layer=layer) for layer in layers])
    for comp, fn in (
        ("k", patching.get_act_patch_attn_head_k_all_pos),
        ("v", patching.get_act_patch_attn_head_v_all_pos),
    ):  # GQA: 3 KV heads, each shared by 3 query heads
        tl = _tl_subset(smollm2, ps, fn, kv_df)
        out, _ = _ours(smollm2, ps, comp, layers=layers)
        got = torch.tensor(out.head_metrics["logit_diff"].mean[list(layers)], dtype=torch.float32)
        assert got.shape == (len(layers), 3)
        torch.testing.assert_close(got.reshape(-1), tl.float(), atol=1e-4, rtol=0)
    pos_layers = (0, 29)
    pos_df = patching.make_df_from_ranges([1, T], ["layer", "pos"])
    pos_df = pd.concat([pos_df.assign(layer=layer) for layer in pos_layers])
    for comp, fn in (
        ("resid_pre", patching.get_act_patch_resid_pre),
        ("attn_out", patching.get_act_patch_attn_out),
        ("mlp_out", patching.get_act_patch_mlp_out),
    ):
        tl = _tl_subset(smollm2, ps, fn, pos_df)
        _, grid = _ours(smollm2, ps, comp, per_position=True, layers=pos_layers)
        got = torch.tensor(grid.value.values, dtype=torch.float32)
        torch.testing.assert_close(got, tl.float(), atol=1e-4, rtol=0)


@pytest.mark.models
def test_gemma3_equals_transformer_lens(gemma3):
    """Gemma 3 (sliding-window layers, 1 KV head): z per head on a few layers equals TL's."""
    ps = build_task("ioi", gemma3.codec, {"n_prompts": 4})
    layers = (0, 5, 17)
    df = patching.make_df_from_ranges([1, gemma3.n_heads], ["layer", "head"])
    df = pd.concat([df.assign(layer=layer) for layer in layers])
    tl = _tl_subset(gemma3, ps, patching.get_act_patch_attn_head_out_all_pos, df)
    out, _ = _ours(gemma3, ps, "z", layers=layers)
    assert out.info["recomputed_from_pos"] == out.info["first_diff_pos"] > 0  # suffix-only path
    got = torch.tensor(out.head_metrics["logit_diff"].mean[list(layers)], dtype=torch.float32)
    torch.testing.assert_close(got.reshape(-1), tl.float(), atol=1e-4, rtol=0)
    run = ResumableRun(gemma3, ps.corrupt)
    with torch.inference_mode():
        full = gemma3.bridge(ps.corrupt, prepend_bos=False)[:, -1]
    for layer in layers:
        torch.testing.assert_close(run.run_from(layer, run.resid(layer)), full, atol=1e-4, rtol=0)


@pytest.mark.models
def test_gemma3_sliding_window_equals_transformer_lens(gemma3):
    """A prompt longer than Gemma 3's sliding window (local layers see only the last ``w`` keys):
    z at a local layer (0), v (one KV head) at a local and a global layer (0, 5) equal TL's."""
    hf_cfg = gemma3.bridge._driver.underlying_model.config
    window, types = int(hf_cfg.sliding_window), list(hf_cfg.layer_types)
    assert types[0] == "sliding_attention" and types[5] == "full_attention"
    seq_len = window + 24
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(1000, 20000, (1, seq_len), generator=g)
    clean[:, 0] = gemma3.tokenizer.bos_token_id
    corrupt = clean.clone()
    corrupt[:, seq_len - 12] = torch.randint(1000, 20000, (1,), generator=g)
    ps = PromptSet("long", clean, corrupt, torch.tensor([5000]), torch.tensor([7000]))
    for comp, fn, n_h, layers in (
        ("z", patching.get_act_patch_attn_head_out_all_pos, gemma3.n_heads, (0,)),
        ("v", patching.get_act_patch_attn_head_v_all_pos, gemma3.n_kv_heads, (0, 5)),
    ):
        df = patching.make_df_from_ranges([1, n_h], ["layer", "head"])
        df = pd.concat([df.assign(layer=layer) for layer in layers])
        tl = _tl_subset(gemma3, ps, fn, df)
        out, _ = _ours(gemma3, ps, comp, layers=layers)
        got = torch.tensor(out.head_metrics["logit_diff"].mean[list(layers)], dtype=torch.float32)
        torch.testing.assert_close(got.reshape(-1), tl.float(), atol=1e-4, rtol=0)
        assert float(tl.abs().max()) > 1e-3  # the patches do something

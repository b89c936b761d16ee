"""The batched per-head sweep (resume at each variant's lowest layer, many variants per block
call) equals one full forward per variant inside the intervention's own context manager: ACT,
PASTA and zero ablation, single heads and multi-layer sets, tiny Llama (GQA-free), tiny Gemma 3
(sliding layers) and SmolLM2 (GQA)."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.forward.attention_edits import (
    act_edit,
    calibrate_attention,
    pasta_edit,
    steer_attention,
    steering_bias,
)
from workbench.forward.head_sweep import naive_sweep, sweep_heads, zero_edit
from workbench.forward.interventions import ablate_heads
from workbench.forward.resume import ResumableRun
from workbench.types import Head


def _variants(model):
    singles = [[Head(la, h)] for la in range(model.n_layers) for h in range(model.n_heads)]
    top = model.n_layers - 1
    return [*singles, [Head(0, 1), Head(top, 0)], [Head(top, h) for h in range(model.n_heads)]]


def _metric(logits):
    return torch.log_softmax(logits.float(), -1)[:, :50]


def _check(model, tokens, kind, edit, context, batch_tokens=10**6):
    variants = _variants(model)
    base = ResumableRun(model, tokens)
    fast, cost = sweep_heads(model, base, variants, kind, edit, _metric, batch_tokens=batch_tokens)
    slow = naive_sweep(model, tokens, variants, context, _metric)
    assert len(fast) == len(slow) == len(variants)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, atol=2e-5, rtol=1e-5)
    assert cost < len(variants)  # early-layer variants only recompute their own layers
    return fast


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("batch_tokens", [10**6, 40])  # one wave / a wave per variant
def test_sweep_equals_one_forward_per_variant(load, name, batch_tokens):
    model = load(name)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 60, (3, 12), generator=gen)
    spans, lens = [(2, 5), (4, 9), (0, 3)], [12, 12, 12]
    bias = steering_bias(spans, lens, 0.05, 12)
    _check(
        model,
        tokens,
        "pattern",
        act_edit(0.05, 0.3),
        lambda hs: calibrate_attention(model, hs, tau=0.05, beta=0.3),
        batch_tokens,
    )
    out = _check(
        model,
        tokens,
        "scores",
        pasta_edit(bias),
        lambda hs: steer_attention(model, hs, spans, alpha=0.05),
        batch_tokens,
    )
    _check(model, tokens, "z", zero_edit, lambda hs: ablate_heads(model, hs), batch_tokens)
    base = _metric(ResumableRun(model, tokens).final_logits)
    assert max(float((o - base).abs().max()) for o in out) > 1e-3  # the edits did something


def test_bad_variants_are_refused(load):
    model = load("tiny-llama")
    base = ResumableRun(model, torch.randint(5, 60, (1, 6)))
    with pytest.raises(WorkbenchError, match="outside the model"):
        sweep_heads(model, base, [[Head(0, 99)]], "z", zero_edit, _metric)
    with pytest.raises(WorkbenchError, match="no heads"):
        sweep_heads(model, base, [[]], "z", zero_edit, _metric)
    with pytest.raises(WorkbenchError, match="intervention point"):
        sweep_heads(model, base, [[Head(0, 0)]], "mlp_out", zero_edit, _metric)


@pytest.mark.models
def test_sweep_on_smollm2(smollm2):
    tokens = torch.randint(100, 5000, (2, 20), generator=torch.Generator().manual_seed(2))
    variants = [[Head(la, h)] for la in (0, 7, 15, 29) for h in (0, 4, 8)]
    variants.append([Head(3, 1), Head(20, 5), Head(29, 0)])
    base = ResumableRun(smollm2, tokens)
    for kind, edit, ctx in (
        ("pattern", act_edit(0.1, 0.4), lambda hs: calibrate_attention(smollm2, hs)),
        ("z", zero_edit, lambda hs: ablate_heads(smollm2, hs)),
    ):
        fast, _ = sweep_heads(smollm2, base, variants, kind, edit, _metric)
        slow = naive_sweep(smollm2, tokens, variants, ctx, _metric)
        for f, s in zip(fast, slow, strict=True):
            torch.testing.assert_close(f, s, atol=1e-4, rtol=1e-4)

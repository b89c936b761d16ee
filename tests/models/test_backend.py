"""The oneDNN linear backend of the fast paths: fp32 products, always restored, exact patching."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformer_lens import patching

from workbench.analyses.activation_patching import ActivationPatchingParams
from workbench.analyses.activation_patching.compute import activation_patching
from workbench.errors import WorkbenchError
from workbench.metrics import logit_diff
from workbench.models import backend
from workbench.models.backend import fast_linears, onednn_available
from workbench.types import PromptSet

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")


@pytest.fixture
def onednn(monkeypatch):
    """Force oneDNN for every product, however small (tiny models have tiny products)."""
    monkeypatch.setenv("WORKBENCH_LINEAR_BACKEND", "onednn")
    monkeypatch.setattr(backend, "MIN_OUTPUTS", 0)


def _switched(module: nn.Module) -> int:
    return sum("forward" in m.__dict__ for m in module.modules() if isinstance(m, nn.Linear))


@needs_onednn
def test_products_are_fp32_accurate(onednn):
    """Within the worst-case fp32 summation bound ``k * eps * (|x| |W|^T)`` of the float64
    product (bf16 arithmetic would break it), and as close as the default BLAS to it."""
    g = torch.Generator().manual_seed(0)
    x, lin = torch.randn(64, 576, generator=g), nn.Linear(576, 1536)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    bound = 576 * torch.finfo(torch.float32).eps * (x.abs() @ lin.weight.abs().T + 1).double()
    with torch.inference_mode():
        default = lin(x)
        with fast_linears(lin) as n:
            fast = lin(x)
    assert n == 1
    err = (fast.double() - ref).abs()
    assert bool((err <= bound).all())
    assert float(err.max()) <= 10 * float((default.double() - ref).abs().max()) + 1e-6


@needs_onednn
def test_switched_and_always_restored(load, onednn):
    model = load("tiny-llama")
    tokens = torch.randint(0, 50, (2, 7))
    with torch.inference_mode():
        ref = model.bridge(tokens, prepend_bos=False)
        with fast_linears(model.bridge) as n:
            assert n == _switched(model.bridge) > 0
            with fast_linears(model.bridge) as inner:  # nested: left to the outer block
                assert inner == 0
            got = model.bridge(tokens, prepend_bos=False)
        assert _switched(model.bridge) == 0
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="boom"), fast_linears(model.bridge):
            raise RuntimeError("boom")
    assert _switched(model.bridge) == 0


@needs_onednn
def test_gradients_fall_back_to_default(onednn):
    """The oneDNN op has no backward: inputs that need gradients take the default path."""
    lin = nn.Linear(16, 300)
    x = torch.randn(20, 16, requires_grad=True)
    with fast_linears(lin):
        lin(x).square().sum().backward()
    assert x.grad is not None
    expected = torch.autograd.grad(lin(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_backend_choice(monkeypatch):
    lin = nn.Linear(8, 8)
    monkeypatch.setenv("WORKBENCH_LINEAR_BACKEND", "default")
    with fast_linears(lin) as n:
        assert n == 0
    monkeypatch.setenv("WORKBENCH_LINEAR_BACKEND", "fastest")
    with pytest.raises(WorkbenchError, match="auto, default or onednn"), fast_linears(lin):
        pass
    assert "forward" not in lin.__dict__
    monkeypatch.delenv("WORKBENCH_LINEAR_BACKEND")
    assert backend.use_onednn() == backend.use_onednn()  # calibrated once, then cached


@needs_onednn
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("mode", ["onednn", "default"])
def test_patching_equals_transformer_lens_on_both_backends(load, monkeypatch, name, mode):
    """The fast sweep on either backend equals TL's sweep (default backend, one forward per
    index); the run states which backend it used."""
    monkeypatch.setenv("WORKBENCH_LINEAR_BACKEND", mode)
    monkeypatch.setattr(backend, "MIN_OUTPUTS", 0)
    model = load(name)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 50, (3, 10), generator=g)
    corrupt = clean.clone()
    corrupt[:, 4:] = torch.randint(0, 50, (3, 6), generator=g)
    ps = PromptSet("t", clean, corrupt, torch.arange(1, 4), torch.arange(10, 13))
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ps.clean, prepend_bos=False)

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logit_diff(logits[:, -1], ps.correct, ps.incorrect).mean()

        tl = patching.get_act_patch_attn_head_out_all_pos(model.bridge, ps.corrupt, cache, metric)
    out = activation_patching(model, ps, ActivationPatchingParams(component="z"))
    assert out.info["linear_backend"] == mode
    got = torch.tensor(out.head_metrics["logit_diff"].mean, dtype=torch.float32)
    torch.testing.assert_close(got, tl.float(), atol=1e-5, rtol=0)

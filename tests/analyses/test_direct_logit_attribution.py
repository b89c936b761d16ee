"""Direct logit attribution sums exactly to the logit difference, per-head results sum to the
attention output, the logit lens ends at the model's logits, and how TransformerLens's own DLA
compares on a bridge without compatibility mode."""

from __future__ import annotations

import pytest
import torch

from workbench.analyses.direct_logit_attribution import DLAParams
from workbench.analyses.direct_logit_attribution.compute import direct_logit_attribution
from workbench.analyses.logit_lens import LogitLensParams
from workbench.analyses.logit_lens.compute import lens_logits, logit_lens
from workbench.errors import WorkbenchError
from workbench.forward.unembed import attribute, final_components, final_norm
from workbench.hooks import hook_name, hooked
from workbench.metrics import logit_diff
from workbench.models.loading import load_model
from workbench.tasks import build_task
from workbench.types import PromptSet

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gemma3"]


def _perturbed(name):
    """A private copy of a tiny model whose norms are far from identity (random init leaves
    every norm weight at 1, or 0 for Gemma's ``1 + w``, and every bias at 0)."""
    model = load_model(name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.bridge.original_model.named_parameters():
            if "norm" in pname or ".ln" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module", params=TINY)
def perturbed(request):
    return _perturbed(request.param)


def _ioi(model, n=4) -> PromptSet:
    ps = build_task("ioi", model.codec, {"n_prompts": n})
    assert isinstance(ps, PromptSet)
    return ps


@pytest.mark.parametrize("name", TINY)
def test_components_sum_to_the_logit_difference(load, name):
    model = load(name)
    ps = _ioi(model, n=5)
    out = direct_logit_attribution(model, ps, DLAParams(batch_size=2))
    ident = out.info["identity"]
    assert ident["max_abs_error"] < 1e-4, ident
    table = out.tables["components"]
    assert table["value"].sum() == pytest.approx(ident["mean_logit_diff"], abs=1e-4)
    heads = table[table.component == "head"]
    assert len(heads) == model.n_layers * model.n_heads
    assert out.head_metrics["dla"].mean.shape == (model.n_layers, model.n_heads)
    assert out.head_metrics["dla"].n == 5


def test_identity_and_head_sums_with_non_identity_norms(perturbed):
    ps = _ioi(perturbed)
    comps = final_components(perturbed, ps.clean)
    res = attribute(perturbed, comps, ps.correct, ps.incorrect)
    torch.testing.assert_close(res["total"], res["target"], atol=1e-4, rtol=0)
    # per-head results (+ the bias share) rebuild hook_attn_out at the final position
    torch.testing.assert_close(
        comps.heads.sum(2) + comps.attn_bias, comps.attn_out, atol=1e-4, rtol=0
    )
    x = comps.resid_post[:, -1]
    module = perturbed.bridge.ln_final.original_component
    torch.testing.assert_close(final_norm(perturbed)(x), module(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_head_results_sum_to_hook_attn_out(load, name):
    model = load(name)
    ps = _ioi(model)
    comps = final_components(model, ps.clean)
    got = {}

    def grab(layer):
        def hook(x, hook):
            got[layer] = x[:, -1].detach().clone()

        return hook

    hooks = [(hook_name("attn_out", la), grab(la)) for la in range(model.n_layers)]
    with torch.no_grad(), hooked(model.bridge, hooks):
        model.bridge(ps.clean, prepend_bos=False, return_type=None)
    ref = torch.stack([got[la] for la in range(model.n_layers)], 1)
    torch.testing.assert_close(comps.heads.sum(2) + comps.attn_bias, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_logit_lens_last_layer_is_the_model_output(load, name):
    model = load(name)
    ps = _ioi(model)
    comps = final_components(model, ps.clean)
    with torch.no_grad():
        logits = model.bridge(ps.clean, prepend_bos=False)[:, -1]
    torch.testing.assert_close(
        lens_logits(model, comps.resid_post[:, -1]), logits, atol=1e-5, rtol=0
    )
    out = logit_lens(model, ps, LogitLensParams(batch_size=3))
    table = out.tables["logit_lens"]
    assert set(table.metric) == {"logit_diff", "prob", "rank"}
    last = table[(table.layer == model.n_layers - 1) & (table.metric == "logit_diff")]
    ld = (logits.gather(-1, ps.correct[:, None]) - logits.gather(-1, ps.incorrect[:, None])).mean()
    assert float(last.value.iloc[0]) == pytest.approx(float(ld), abs=1e-4)
    assert out.info["last_layer_max_abs_error_vs_model_logits"] < 1e-4
    assert (table[table.metric == "rank"].value >= 1).all()


def test_final_logit_softcap_identity_holds_before_the_cap():
    """Gemma's ``final_logit_softcapping`` (unset in Gemma 3 270M) caps the logits with
    ``cap * tanh(logits / cap)``: the identity holds for the logits before the cap, and the
    logit lens applies the cap so its last layer still equals the model's output."""
    model = load_model("tiny-gemma3")  # a private copy: its config is changed below
    model.bridge.original_model.config.final_logit_softcapping = 0.5
    ps = _ioi(model, n=3)
    comps = final_components(model, ps.clean)
    assert comps.logits.abs().max() <= 0.5 + 1e-6, "the bridge's forward applies the cap"
    res = attribute(model, comps, ps.correct, ps.incorrect)
    torch.testing.assert_close(res["total"], res["target"], atol=1e-4, rtol=0)
    capped = logit_diff(comps.logits, ps.correct, ps.incorrect)
    assert (res["target"] - capped).abs().max() > 0.1, "the target is the pre-cap difference"
    lens = lens_logits(model, comps.resid_post[:, -1])
    torch.testing.assert_close(lens, comps.logits, atol=1e-5, rtol=0)
    out = direct_logit_attribution(model, ps, DLAParams())
    assert out.info["identity"]["target"] == "pre-softcap logits"


def test_transformerlens_dla_without_compatibility_mode(perturbed):
    """TL 4.3's ``direct_logit_attribution`` refuses a bridge without compatibility mode (it
    raises; it is not silent). The cache methods underneath it (``stack_head_results`` +
    ``logit_attrs``), used directly, are silently wrong once the final norm has weights:
    their components no longer sum to the logit difference, ours do."""
    from transformer_lens.tools.analysis.direct_logit_attribution import (
        direct_logit_attribution as tl_dla,
    )

    ps = _ioi(perturbed, n=2)
    with pytest.raises(ValueError, match="compatibility mode"):
        tl_dla(perturbed.bridge, ps.clean, ps.correct, ps.incorrect, unit="head")
    _, cache = perturbed.bridge.run_with_cache(ps.clean, prepend_bos=False)
    stack = cache.stack_head_results(apply_ln=False, pos_slice=-1, incl_remainder=True)
    raw = cache.logit_attrs(stack, tokens=ps.correct, incorrect_tokens=ps.incorrect, pos_slice=-1)
    ours = attribute(perturbed, final_components(perturbed, ps.clean), ps.correct, ps.incorrect)
    b_u = perturbed.bridge.b_U
    raw_total = raw.sum(0) + b_u[ps.correct] - b_u[ps.incorrect]
    assert (raw_total - ours["target"]).abs().max() > 0.05, "raw TL path should miss the total"
    torch.testing.assert_close(ours["total"], ours["target"], atol=1e-4, rtol=0)


def test_transformerlens_with_compatibility_mode_agrees_on_llama_not_on_gemma3():
    """With compatibility mode (folded norms) TL agrees per head on Llama. On Gemma 3 its
    per-head results ignore the post-attention norm (only its remainder term makes the total
    right): TL's heads of a layer do not add up to that layer's attention output's DLA."""
    from transformer_lens.tools.analysis.direct_logit_attribution import (
        direct_logit_attribution as tl_dla,
    )

    for name, agrees in (("tiny-llama", True), ("tiny-gemma3", False)):
        model = _perturbed(name)
        ps = _ioi(model, n=2)
        comps = final_components(model, ps.clean)
        ours = attribute(model, comps, ps.correct, ps.incorrect)
        model.bridge.enable_compatibility_mode()
        tl = tl_dla(model.bridge, ps.clean, ps.correct, ps.incorrect, unit="head")
        tl_heads = tl.attribution[:-1].detach().T.reshape(ours["heads"].shape)
        gap = float((tl_heads - ours["heads"]).abs().max())
        assert (gap < 1e-4) == agrees, (name, gap)


def test_params_validate():
    with pytest.raises(WorkbenchError, match="batch_size"):
        DLAParams(batch_size=0).validate()
    with pytest.raises(WorkbenchError, match="batch_size"):
        LogitLensParams(batch_size=0).validate()


@pytest.mark.models
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_identity_on_real_models_with_ioi(request, fixture):
    model = request.getfixturevalue(fixture)
    ps = _ioi(model, n=8)
    out = direct_logit_attribution(model, ps, DLAParams(batch_size=8))
    assert out.info["identity"]["max_abs_error"] < 1e-3, out.info
    comps = final_components(model, ps.clean[:2])
    torch.testing.assert_close(
        comps.heads.sum(2) + comps.attn_bias, comps.attn_out, atol=1e-3, rtol=1e-4
    )
    lens = logit_lens(model, ps, LogitLensParams(batch_size=8))
    assert lens.info["last_layer_max_abs_error_vs_model_logits"] < 1e-3

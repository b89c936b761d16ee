"""Attribution patching: the gradient plumbing equals a finite-difference linearisation of the
patch, its ranking agrees with exact patching on the trained toy model, and ``agreement`` is
right on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.analyses.attribution_patching import AttributionParams
from workbench.analyses.attribution_patching.compute import attribution_patching, attribution_scores
from workbench.circuits.agreement import agreement
from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked
from workbench.tasks import build_task
from workbench.types import PromptSet


def _task(name, codec, params) -> PromptSet:
    ps = build_task(name, codec, params)
    assert isinstance(ps, PromptSet)
    return ps


def _ld(logits, ps):
    last = logits[:, -1]
    return (last.gather(-1, ps.correct[:, None]) - last.gather(-1, ps.incorrect[:, None]))[:, 0]


def _acts(model, tokens, name):
    box = {}

    def save(act, hook):
        box["a"] = act.detach().clone()
        return act

    with torch.no_grad(), hooked(model.bridge, [(name, save)]):
        model.bridge(tokens, prepend_bos=False)
    return box["a"]


def _interpolated_ld(model, ps, name, index, eps, base, source):
    """LD of the base run with ``a[index] = a_base + eps * (a_source - a_base)``."""
    src = _acts(model, source, name)

    def patch(act, hook):
        out = act.clone()
        out[index] = out[index] + eps * (src[index] - out[index])
        return out

    with torch.no_grad(), hooked(model.bridge, [(name, patch)]):
        return _ld(model.bridge(base, prepend_bos=False), ps)


def _derivative(model, ps, name, index, direction="denoising", eps=1e-2):
    """Central difference of the interpolated patch at eps = 0: the exact first-order term."""
    base, source = (ps.corrupt, ps.clean) if direction == "denoising" else (ps.clean, ps.corrupt)
    up = _interpolated_ld(model, ps, name, index, eps, base, source)
    down = _interpolated_ld(model, ps, name, index, -eps, base, source)
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_estimates_equal_the_linearised_patch(load, name, direction):
    model = load(name)
    ps = _task("ioi", model.codec, {"n_prompts": 4})
    got = attribution_scores(
        model, ps.clean, ps.corrupt, ps.correct, ps.incorrect, direction=direction
    )
    last = model.n_layers - 1
    pos = ps.seq_len - 2
    checks = [
        (hook_name("z", last), (slice(None), slice(None), 1), got["z"][:, last, :, 1].sum(1)),
        (hook_name("z", 0), (slice(None), pos, 2), got["z"][:, 0, pos, 2]),
        (hook_name("resid_pre", last), (slice(None), pos), got["resid_pre"][:, last, pos]),
        (hook_name("attn_out", 0), (slice(None),), got["attn_out"][:, 0].sum(1)),
        (hook_name("mlp_out", last), (slice(None), -1), got["mlp_out"][:, last, -1]),
    ]
    for hook, index, estimate in checks:
        ref = _derivative(model, ps, hook, index, direction)
        torch.testing.assert_close(estimate, ref, atol=2e-3, rtol=2e-2, msg=hook)
    # positions before the first difference have identical activations: zero attribution
    first = ps.meta["first_diff_pos"]
    assert got["resid_pre"][:, :, :first].abs().max() == 0


def _exact_head_patching(model, ps):
    """Slow reference: one forward per head with its clean z patched into the corrupted run."""
    ld_corrupt = _ld(model.bridge(ps.corrupt, prepend_bos=False), ps).mean()
    out = torch.zeros(model.n_layers, model.n_heads)
    for layer in range(model.n_layers):
        name = hook_name("z", layer)
        clean_z = _acts(model, ps.clean, name)
        for h in range(model.n_heads):

            def patch(act, hook, h=h, clean_z=clean_z):
                act = act.clone()
                act[:, :, h] = clean_z[:, :, h]
                return act

            with torch.no_grad(), hooked(model.bridge, [(name, patch)]):
                ld = _ld(model.bridge(ps.corrupt, prepend_bos=False), ps).mean()
            out[layer, h] = ld - ld_corrupt
    return out.numpy()


def test_toy_induction_agrees_with_exact_patching(toy):
    ps = _task("induction", toy.codec, {"n_prompts": 16, "seq_len": 8})
    out = attribution_patching(toy, ps, AttributionParams())
    attr = out.head_metrics["attribution"].mean
    exact = _exact_head_patching(toy, ps)
    agree = agreement(attr, exact, k=3)
    layer, head = toy.extra["induction_head"]
    assert (layer, head) == (1, 0)
    assert int(np.argmax(attr)) == layer * toy.n_heads + head
    assert int(np.argmax(exact)) == layer * toy.n_heads + head
    assert agree["spearman"] > 0.8, agree


def test_output_tables_and_normalised_metric(load):
    model = load("tiny-gpt2")
    ps = _task("ioi", model.codec, {"n_prompts": 6})
    raw = attribution_patching(model, ps, AttributionParams(batch_size=4))
    norm = attribution_patching(model, ps, AttributionParams(metric="norm_logit_diff"))
    denom = raw.info["clean_logit_diff"] - raw.info["corrupt_logit_diff"]
    np.testing.assert_allclose(
        norm.head_metrics["attribution"].mean,
        raw.head_metrics["attribution"].mean / denom,
        rtol=1e-4,
        atol=1e-6,
    )
    grid = raw.tables["grid"]
    assert list(grid.columns) == ["component", "layer", "pos", "metric", "value", "stderr", "n"]
    assert len(grid) == 3 * model.n_layers * ps.seq_len
    by_pos = raw.tables["heads_by_pos"]
    summed = by_pos.groupby(["layer", "head"])["value"].sum().to_numpy()
    np.testing.assert_allclose(
        summed, raw.head_metrics["attribution"].mean.ravel(), rtol=1e-5, atol=1e-6
    )
    layers = raw.tables["layers"]
    assert set(layers["component"]) == {"resid_pre", "attn_out", "mlp_out"}


def test_bad_params_and_hooks_removed_after_error(load):
    model = load("tiny-llama")
    with pytest.raises(WorkbenchError, match="unknown metric"):
        AttributionParams(metric="nope").validate()
    with pytest.raises(WorkbenchError, match="direction"):
        AttributionParams(direction="sideways").validate()  # type: ignore[arg-type]

    def n_hooks():
        return sum(len(m._forward_hooks) for m in model.bridge.modules())

    before = n_hooks()
    ps = _task("ioi", model.codec, {"n_prompts": 2})
    ps.correct = ps.correct + 10**7  # out-of-vocabulary answer id: fails inside the hooks
    with pytest.raises((IndexError, RuntimeError)):
        attribution_scores(model, ps.clean, ps.corrupt, ps.correct, ps.incorrect)
    assert n_hooks() == before


def test_agreement_on_hand_made_arrays():
    a = np.array([[0.1, 0.5], [2.0, -1.0]])
    assert agreement(a, a, k=2) == {"spearman": 1.0, "pearson": 1.0, "top_k_overlap": 1.0, "k": 2.0}
    rev = agreement(a, -a, k=4)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["pearson"] == pytest.approx(-1.0)
    # ties get averaged ranks: [1, 1, 2] ranks (0.5, 0.5, 2) vs (0, 1, 2)
    tie = agreement(np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0]), k=1)
    assert tie["spearman"] == pytest.approx(np.sqrt(3) / 2)
    assert tie["top_k_overlap"] == 1.0
    # top-k counts by absolute size: the largest |exact| cell (-5) must be found
    assert (
        agreement(np.array([0.0, 3.0, 1.0]), np.array([-5.0, 0.1, 0.2]), k=1)["top_k_overlap"]
        == 0.0
    )
    with pytest.raises(ValueError):
        agreement(np.zeros(3), np.zeros(4))


@pytest.mark.models
def test_smollm2_ioi_attribution_ranks_like_exact_patching(smollm2):
    """Exact patching of the 8 heads with the largest |attribution| and 8 random others (a full
    exact sweep of 270 heads takes minutes on CPU; measured over all heads: rho = 0.97)."""
    model = smollm2
    ps = _task("ioi", model.codec, {"n_prompts": 8})
    attr = attribution_patching(model, ps, AttributionParams()).head_metrics["attribution"].mean
    flat = np.abs(attr).ravel()
    top = np.argsort(-flat)[:8].tolist()
    rest = [i for i in np.random.default_rng(0).permutation(flat.size).tolist() if i not in top]
    cells = top + rest[:8]
    ld_corrupt = _ld(model.bridge(ps.corrupt, prepend_bos=False), ps).mean()
    exact = []
    for i in cells:
        layer, head = divmod(i, model.n_heads)
        name = hook_name("z", layer)
        clean_z = _acts(model, ps.clean, name)

        def patch(act, hook, head=head, clean_z=clean_z):
            act = act.clone()
            act[:, :, head] = clean_z[:, :, head]
            return act

        with torch.no_grad(), hooked(model.bridge, [(name, patch)]):
            exact.append(
                float(_ld(model.bridge(ps.corrupt, prepend_bos=False), ps).mean() - ld_corrupt)
            )
    agree = agreement(attr.ravel()[cells], np.array(exact), k=4)
    assert agree["spearman"] > 0.8, agree


def test_agreement_recorded_when_both_runs_are_stored(toy, store):
    """Storing attribution patching and an exact z sweep of the same prompts (either order)
    stores one agreement record whose numbers equal ``agreement`` of the two effect grids; an
    exact sweep that is not a per-head sweep over all layers gets none."""
    from workbench.circuits.agreement import AGREEMENT
    from workbench.runner import run_analysis

    task = {"n_prompts": 8, "seq_len": 8}
    other = run_analysis(
        "activation_patching",
        toy,
        "induction",
        params={"layers": [1]},
        task_params=task,
        store=store,
    )
    exact = run_analysis("activation_patching", toy, "induction", task_params=task, store=store)
    assert store.list_runs(analysis=AGREEMENT).empty  # no attribution run yet
    attr = run_analysis("attribution_patching", toy, "induction", task_params=task, store=store)
    records = store.list_runs(analysis=AGREEMENT)
    assert len(records) == 1
    rec = store.get(records.run_id[0]).tables["agreement"].iloc[0]
    assert (rec.attribution_run, rec.exact_run) == (attr.run_id, exact.run_id)
    assert other.run_id != rec.exact_run
    base = exact.manifest["extra"]["baseline_corrupted"]
    want = agreement(attr.matrix().to_numpy(), exact.matrix().to_numpy() - base, k=10)
    assert rec.spearman == pytest.approx(want["spearman"])
    assert rec.top_k_overlap == pytest.approx(want["top_k_overlap"])
    assert rec.spearman > 0.5  # the toy model's induction circuit is close to linear

"""Head detectors equal TransformerLens's ``detect_head`` on the same tokens, and find the
toy model's trained induction head."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.head_detector import detect_head

from workbench.analyses.head_detectors import HeadDetectorParams
from workbench.analyses.head_detectors.compute import head_detectors
from workbench.hooks import hooked
from workbench.tasks import build_task
from workbench.types import PromptSet

TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}


def _texts_and_tokens(model, n=3, seq_len=8):
    """Repeated-random-token texts, and the tokens TransformerLens itself makes of them."""
    ps = build_task("induction", model.codec, {"n_prompts": n, "seq_len": seq_len})
    bos = model.codec.bos_token_id
    texts = []
    for row in ps.clean.tolist():
        ids = row[1:] if model.codec.prepend_bos and row and row[0] == bos else row
        texts.append(model.codec.decode(ids))
    tokens = [model.bridge.to_tokens(t) for t in texts]
    return texts, tokens


def _ours(model, tokens, **kw):
    params = HeadDetectorParams(**kw)
    rows = []
    for t in tokens:  # lengths may differ after re-tokenisation: one set per text
        ps = PromptSet("t", t, t, t[:, -1], t[:, -1])
        out = head_detectors(model, ps, params)
        rows.append({d: torch.tensor(m.mean) for d, m in out.head_metrics.items()})
    return {d: torch.stack([r[d] for r in rows]).mean(0) for d in rows[0]}


def _check_against_tl(model, **kw):
    texts, tokens = _texts_and_tokens(model)
    ours = _ours(model, tokens, **kw)
    for ours_name, tl_name in TL_NAMES.items():
        ref = detect_head(model.bridge, texts, tl_name, **kw).double()
        torch.testing.assert_close(ours[ours_name], ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3", "toy-induction"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"exclude_bos": True},
        {"exclude_bos": True, "exclude_current_token": True},
        {"error_measure": "abs"},
    ],
    ids=["mul", "no-bos", "no-bos-no-current", "abs"],
)
def test_matches_transformerlens_on_test_models(load, name, kw):
    _check_against_tl(load(name), **kw)


def test_toy_model_planted_induction_head_ranks_first(toy):
    ps = build_task("induction", toy.codec, {"n_prompts": 16, "seq_len": 8, "seed": 3})
    out = head_detectors(toy, ps, HeadDetectorParams())
    scores = torch.tensor(out.head_metrics["induction"].mean)
    layer, head = toy.extra["induction_head"]
    flat = scores.flatten()
    assert int(flat.argmax()) == layer * toy.n_heads + head
    runner_up = flat.sort(descending=True).values[1]
    assert flat.max() > 2 * runner_up, "the trained induction head should stand out"
    prev = torch.tensor(out.head_metrics["previous_token"].mean).flatten()
    pl, ph = toy.extra["previous_token_head"]
    assert int(prev.argmax()) == pl * toy.n_heads + ph


def test_hooks_observe_only_and_are_removed(load):
    model = load("tiny-llama")
    toks = torch.randint(4, 60, (2, 10))
    with torch.no_grad():
        before = model.bridge(toks, prepend_bos=False)
    ps = PromptSet("t", toks, toks, toks[:, -1], toks[:, -1])
    head_detectors(model, ps, HeadDetectorParams())
    with torch.no_grad():
        after = model.bridge(toks, prepend_bos=False)
    torch.testing.assert_close(before, after, atol=0, rtol=0)

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), hooked(model.bridge, [("blocks.0.attn.hook_pattern", boom)]):
        model.bridge(toks, prepend_bos=False)
    with torch.no_grad():
        again = model.bridge(toks, prepend_bos=False)  # would raise if the hook were left on
    torch.testing.assert_close(before, again, atol=0, rtol=0)


def test_batching_does_not_change_scores(load):
    model = load("tiny-gpt2")
    ps = build_task("induction", model.codec, {"n_prompts": 5, "seq_len": 8})
    a = head_detectors(model, ps, HeadDetectorParams(batch_size=1))
    b = head_detectors(model, ps, HeadDetectorParams(batch_size=5))
    for d in a.head_metrics:
        torch.testing.assert_close(
            torch.tensor(a.head_metrics[d].mean),
            torch.tensor(b.head_metrics[d].mean),
            atol=1e-6,
            rtol=0,
        )


@pytest.mark.models
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_matches_transformerlens_on_real_models(request, which):
    model = request.getfixturevalue(which)
    _check_against_tl(model)
    _check_against_tl(model, exclude_bos=True)


@pytest.mark.models
def test_smollm2_has_induction_heads(smollm2):
    ps = build_task("induction", smollm2.codec, {"n_prompts": 4, "seq_len": 20})
    out = head_detectors(smollm2, ps, HeadDetectorParams(detectors=("induction",)))
    # TL's induction score counts first-half queries too, so its ceiling is about L / (2L)
    assert out.head_metrics["induction"].mean.max() > 0.3

"""Model registry, fingerprints, BOS policy and the converted-weights cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models.known import MODELS, fingerprint, get_entry


def test_registry_names_and_honest_descriptions():
    assert {"smollm2-135m", "gemma3-270m", "toy-induction"} <= set(MODELS)
    for name in ("smollm2-135m", "gemma3-270m"):
        assert "de-quantised" in MODELS[name].description


def test_unknown_short_name_is_a_one_line_error():
    with pytest.raises(WorkbenchError, match=r"unknown model 'nope'.*use one of"):
        get_entry("nope")


def test_hub_name_offline_fails_fast_naming_the_offline_models(monkeypatch):
    from workbench.models.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="offline, use one of: smollm2-135m, gemma3-270m"):
        load_model("some-org/some-model")


def test_fingerprints_are_stable_and_need_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from workbench.models.known import fingerprint\n"
        "print(fingerprint('toy-induction'), fingerprint('tiny-llama'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    ).stdout.split()
    assert out == [fingerprint("toy-induction"), fingerprint("tiny-llama")]
    assert len(set(out)) == 2


def test_tiny_models_follow_their_tokenizer_and_bos_override(load):
    from workbench.runner import _with_bos

    m = load("tiny-llama")
    assert m.prepend_bos is False  # the word tokenizer adds no BOS
    with_bos = _with_bos(m, True)
    ids = with_bos.codec.encode_prompt("Mary")
    assert ids[0] == m.codec.bos_token_id and len(ids) == 2
    assert m.codec.encode_prompt("Mary") == ids[1:]


def test_toy_model_carries_its_measured_mechanism(toy):
    assert toy.extra["induction_head"] == [1, 0]
    assert toy.n_layers == 2 and toy.n_heads == 4


@pytest.mark.models
def test_smollm2_loads_from_the_converted_cache_and_matches_hf(smollm2):
    from workbench.models.loading import converted_dir

    folder = converted_dir(smollm2.entry, smollm2.fingerprint)
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert smollm2.n_layers == 30 and smollm2.n_heads == 9 and smollm2.n_kv_heads == 3
    assert smollm2.prepend_bos is False  # SmolLM2's tokenizer adds no BOS
    toks = torch.tensor([smollm2.codec.encode_prompt("The capital of France is")])
    with torch.no_grad():
        ours = smollm2.bridge(toks, prepend_bos=False)
        hf = smollm2.bridge.original_model(toks).logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=0)
    assert smollm2.codec.decode([int(ours[0, -1].argmax())]).strip() == "Paris"


@pytest.mark.models
def test_warm_load_reads_the_cache(smollm2):
    from workbench.models.loading import load_model

    again = load_model("smollm2-135m")
    assert again.cache_hit and again.fingerprint == smollm2.fingerprint
    for (n1, p1), (n2, p2) in zip(
        smollm2.bridge.original_model.state_dict().items(),
        again.bridge.original_model.state_dict().items(),
        strict=True,
    ):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.models
def test_gemma3_boots_with_its_architecture_and_bos(gemma3):
    assert gemma3.n_layers == 18 and gemma3.n_heads == 4
    assert gemma3.prepend_bos is True
    cfg = gemma3.bridge.original_model.config
    assert cfg.architectures == ["Gemma3ForCausalLM"]
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    toks = torch.tensor([gemma3.codec.encode_prompt("The capital of France is")])
    with torch.no_grad():
        ours = gemma3.bridge(toks, prepend_bos=False)
        hf = gemma3.bridge.original_model(toks).logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=0)

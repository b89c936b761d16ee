"""Tiny offline models: the word tokenizer, random HF models in the bridge, the toy induction model.

Everything here runs on the CPU without the network in a few seconds. The toy-model tests
recompute the recorded mechanism from scratch (fresh sequences, attention patterns read through
the bridge) rather than trusting ``mechanism.json``.
"""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models.codec import default_prepend_bos
from workbench.models.tiny import (
    BOS_ID,
    N_SPECIAL,
    SPECIAL_TOKENS,
    boot_bridge,
    load_toy_induction,
    repeated_tokens,
    tiny_hf_model,
    word_tokenizer,
)

WORDS = ("Mary", "John", "went", "store", "the")
ARCHS = ("llama", "gpt2", "gemma3")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS, n_symbols=16)


# --- tokenizer ---------------------------------------------------------------------------


def test_vocabulary_layout(tok):
    vocab = tok.get_vocab()
    assert [vocab[s] for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert [vocab[f"t{i}"] for i in range(16)] == list(range(N_SPECIAL, N_SPECIAL + 16))
    words = sorted(WORDS)
    assert [vocab[w] for w in words] == list(range(N_SPECIAL + 16, N_SPECIAL + 16 + len(words)))
    assert len(tok) == N_SPECIAL + 16 + len(WORDS)


def test_leading_space_is_the_same_single_token(tok):
    mary = tok.convert_tokens_to_ids("Mary")
    assert tok(" Mary", add_special_tokens=False)["input_ids"] == [mary]
    assert tok("Mary", add_special_tokens=False)["input_ids"] == [mary]


def test_round_trip_and_unknown_words(tok):
    text = "John went to the store t3"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == "John went <unk> the store t3"
    known = "Mary went t0 t15"
    assert tok.decode(tok(known)["input_ids"]) == known


def test_adds_no_bos(tok):
    assert tok("Mary went", add_special_tokens=True)["input_ids"][0] != BOS_ID
    assert default_prepend_bos(tok) is False


def test_deterministic_and_order_free():
    a = word_tokenizer(WORDS, n_symbols=8).get_vocab()
    b = word_tokenizer((*reversed(WORDS), "Mary"), n_symbols=8).get_vocab()
    assert a == b


def test_word_that_would_be_split_is_refused():
    with pytest.raises(WorkbenchError, match="split"):
        word_tokenizer(["Mary's"])


# --- tiny random HF models in the bridge ------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_boots_and_matches_hf(arch, tok):
    model = tiny_hf_model(arch, len(tok), seed=0)
    assert model.config.architectures == [
        {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "gemma3": "Gemma3ForCausalLM"}[
            arch
        ]
    ]
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = torch.randint(N_SPECIAL, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits  # before boot: the bridge wraps the HF modules in place
    assert expected.std() > 0.5, "random logits too flat for the comparison to mean anything"

    bridge = boot_bridge(model, tok, f"workbench/tiny-{arch}")
    with torch.no_grad():
        got = bridge(ids, prepend_bos=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert bridge.cfg.tokenizer_prepends_bos is False
    # Strings get a BOS from the bridge unless told otherwise.
    assert bridge.to_tokens("t1 t2").tolist() == [[BOS_ID, N_SPECIAL + 1, N_SPECIAL + 2]]
    assert bridge.to_tokens("t1 t2", prepend_bos=False).tolist() == [[N_SPECIAL + 1, N_SPECIAL + 2]]


def test_tiny_model_is_deterministic():
    a = tiny_hf_model("llama", 40, seed=3).state_dict()
    b = tiny_hf_model("llama", 40, seed=3).state_dict()
    c = tiny_hf_model("llama", 40, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_llama_uses_grouped_query_attention():
    config = tiny_hf_model("llama", 40, n_heads=4).config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)


def test_gemma3_has_a_sliding_window_layer(tok):
    model = tiny_hf_model("gemma3", len(tok), sliding_window=8)
    types = model.config.layer_types
    assert "sliding_attention" in types and "full_attention" in types
    bridge = boot_bridge(model, tok, "workbench/tiny-gemma3")
    ids = torch.randint(N_SPECIAL, len(tok), (1, 24), generator=torch.Generator().manual_seed(2))
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(len(types))]
    _, cache = bridge.run_with_cache(ids, prepend_bos=False, names_filter=names)
    for layer, kind in enumerate(types):
        pattern = cache[names[layer]][0]  # [head q k]
        beyond_window = pattern.tril(-8).sum().item()  # keys 8 or more positions back
        if kind == "sliding_attention":
            assert beyond_window == 0.0
        else:
            assert beyond_window > 1.0


# --- the toy induction model --------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    model, tokenizer, mechanism = load_toy_induction()
    return boot_bridge(model, tokenizer, "workbench/toy-induction"), tokenizer, mechanism


def _fresh_repeated(tokenizer, half_len: int = 16, batch: int = 128) -> torch.Tensor:
    return repeated_tokens(batch, half_len, len(tokenizer) - N_SPECIAL, seed=20240607)


def test_toy_recorded_induction_head_is_the_top_one(toy):
    bridge, tokenizer, mechanism = toy
    half = 16
    tokens = _fresh_repeated(tokenizer, half)
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    _, cache = bridge.run_with_cache(tokens, prepend_bos=False, names_filter=names)
    induction, previous = {}, {}
    for layer in range(n_layers):
        pattern = cache[names[layer]]  # [batch head q k]
        for head in range(n_heads):
            p = pattern[:, head]
            # second-copy query L+i (token x_i) -> key i+1, right after x_i's first occurrence
            induction[(layer, head)] = torch.stack(
                [p[:, half + i, i + 1] for i in range(1, half + 1)]
            ).mean()
            previous[(layer, head)] = torch.stack(
                [p[:, q, q - 1] for q in range(2, 2 * half + 1)]
            ).mean()
    ranked = sorted(induction, key=lambda h: float(induction[h]), reverse=True)
    assert list(ranked[0]) == mechanism["induction_head"]
    assert induction[ranked[0]] - induction[ranked[1]] > 0.2
    top_previous = max(previous, key=lambda h: float(previous[h]))
    assert list(top_previous) == mechanism["previous_token_head"]
    assert top_previous[0] < ranked[0][0], "previous-token head must feed the induction head"


def test_toy_second_half_accuracy(toy):
    bridge, tokenizer, mechanism = toy
    half = 16
    tokens = _fresh_repeated(tokenizer, half)
    with torch.no_grad():
        logits = bridge(tokens, prepend_bos=False)
    pos = torch.arange(half + 1, 2 * half)  # predictions of x_2..x_L in the second copy
    accuracy = (logits[:, pos].argmax(-1) == tokens[:, pos + 1]).float().mean().item()
    assert accuracy > 0.9
    assert mechanism["second_half_accuracy"] > 0.9
    ablated = mechanism["ablated_induction_head_second_half_loss"]
    assert ablated > mechanism["second_half_loss"] + 1.0


def test_toy_data_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(WorkbenchError, match="missing"):
        load_toy_induction()

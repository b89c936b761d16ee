"""Tiny offline models for tests: a word-level tokenizer, random HF models, a trained toy.

Nothing here touches the network. Three things live in this module:

- :func:`word_tokenizer` builds a word-level ``PreTrainedTokenizerFast`` whose vocabulary is
  four special tokens (``<bos>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``<pad>`` 3), then the symbols
  ``t0 .. t{n-1}``, then the given words (sorted). It splits on whitespace and punctuation
  and adds no special tokens when encoding, so BOS is always an explicit choice of the caller.
- :func:`tiny_hf_model` builds a randomly initialised, seeded HF causal LM of one of three
  architectures (Llama with grouped-query attention, GPT-2, Gemma 3 with a sliding-window
  layer), and :func:`boot_bridge` wraps any such model in a TransformerLens ``TransformerBridge``
  on the CPU without touching the hub.
- :func:`load_toy_induction` loads the shipped two-layer GPT-2 toy trained by
  ``scripts/train_toy_induction.py`` on ``[<bos>, x_1..x_L, x_1..x_L]``: its induction head and
  previous-token head were measured after training and are recorded in ``mechanism.json``, so
  detectors and patching methods can be checked against a known answer (Olsson et al. 2022,
  "In-context learning and induction heads").

The data directory is ``<repo>/data`` unless the ``WORKBENCH_DATA_DIR`` environment variable
names another one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from workbench.errors import WorkbenchError
from workbench.home import data_dir

if TYPE_CHECKING:
    import torch
    from jaxtyping import Int
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

TinyArch = Literal["llama", "gpt2", "gemma3"]

SPECIAL_TOKENS: tuple[str, ...] = ("<bos>", "<eos>", "<unk>", "<pad>")
"""The special tokens, in id order: BOS 0, EOS 1, UNK 2, PAD 3."""

BOS_ID, EOS_ID, UNK_ID, PAD_ID = 0, 1, 2, 3
N_SPECIAL = len(SPECIAL_TOKENS)

TOY_INDUCTION_DIR = "toy_induction"
_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma3": "Gemma3ForCausalLM",
}


def symbol(i: int) -> str:
    """The ``i``-th symbol token's text, ``t{i}``; its id is ``N_SPECIAL + i``."""
    return f"t{i}"


def _wrap_tokenizer(backend: Any) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` with the special tokens set and no post-processor."""
    from transformers import PreTrainedTokenizerFast

    bos, eos, unk, pad = SPECIAL_TOKENS
    backend.post_processor = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )


def word_tokenizer(words: Sequence[str] = (), n_symbols: int = 64) -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer: specials, then ``t0..t{n_symbols-1}``, then ``words``.

    Text is split on whitespace and punctuation (``tokenizers``' ``Whitespace`` pre-tokenizer),
    so ``" Mary"`` and ``"Mary"`` are the same single token. Words already in the vocabulary
    (a special or a symbol) are not added twice. Encoding adds no BOS/EOS, decoding joins the
    words with single spaces. Raises :class:`WorkbenchError` for a word the pre-tokenizer
    would split (e.g. ``"Mary's"``), since it could never be encoded as one token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    if n_symbols < 0:
        raise WorkbenchError(f"n_symbols must be >= 0, got {n_symbols}", "pass n_symbols >= 0")
    pre = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(n_symbols):
        vocab[symbol(i)] = len(vocab)
    for word in sorted(set(words)):
        pieces = [p for p, _ in pre.pre_tokenize_str(word)]
        if pieces != [word]:
            raise WorkbenchError(
                f"word {word!r} is split by the tokenizer into {pieces}",
                "use words of letters, digits and underscores only",
            )
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[UNK_ID]))
    backend.pre_tokenizer = pre
    return _wrap_tokenizer(backend)


def load_word_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a ``tokenizer.json`` written from a :func:`word_tokenizer` (same special tokens)."""
    from tokenizers import Tokenizer

    return _wrap_tokenizer(Tokenizer.from_file(str(path)))


def _hf_config(
    arch: TinyArch,
    vocab_size: int,
    n_layers: int,
    n_heads: int,
    d_model: int,
    n_ctx: int,
    d_mlp: int,
    sliding_window: int,
    initializer_range: float,
) -> Any:
    """The HF config of a tiny model of ``arch`` (eager attention, fp32, no dropout)."""
    import torch
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    if d_model % n_heads:
        raise WorkbenchError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
    specials: dict[str, Any] = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    d_head = d_model // n_heads
    config: Any
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
            n_head=n_heads, n_inner=d_mlp, activation_function="gelu_new", resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=initializer_range, **specials,
        )  # fmt: skip
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2), head_dim=d_head,
            max_position_embeddings=n_ctx, initializer_range=initializer_range,
            tie_word_embeddings=False, **specials,
        )  # fmt: skip
    elif arch == "gemma3":
        # Every second layer attends globally, the others only to the last `sliding_window`
        # keys; layer 0 is always a sliding-window layer.
        layer_types = [
            "full_attention" if i % 2 == 1 else "sliding_attention" for i in range(n_layers)
        ]
        config = Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2), head_dim=d_head,
            query_pre_attn_scalar=d_head, max_position_embeddings=n_ctx,
            sliding_window=sliding_window, layer_types=layer_types,
            initializer_range=initializer_range, **specials,
        )  # fmt: skip
    else:
        raise WorkbenchError(f"unknown tiny architecture {arch!r}", f"use one of {_ARCHITECTURES}")
    config.architectures = [_ARCHITECTURES[arch]]
    config.dtype = torch.float32
    config._attn_implementation = "eager"
    return config


def _model_class(arch: str) -> Any:
    import transformers

    return getattr(transformers, _ARCHITECTURES[arch])


def tiny_hf_model(
    arch: TinyArch,
    vocab_size: int,
    seed: int = 0,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 64,
    n_ctx: int = 128,
    d_mlp: int | None = None,
    sliding_window: int = 8,
    initializer_range: float = 0.2,
) -> PreTrainedModel:
    """A randomly initialised HF causal LM of ``arch``, built offline, seeded, fp32, eval mode.

    - ``"llama"``: ``LlamaForCausalLM`` with grouped-query attention (``n_heads // 2`` KV heads).
    - ``"gpt2"``: ``GPT2LMHeadModel`` (tied embeddings, learned positions).
    - ``"gemma3"``: ``Gemma3ForCausalLM`` with a ``Gemma3TextConfig`` whose even layers use
      sliding-window attention of width ``sliding_window`` and odd layers full attention.

    ``d_mlp`` defaults to ``4 * d_model``. ``initializer_range`` is larger than the HF default
    (0.02) so that the random logits are far from uniform and comparisons of two forward passes
    mean something. Attention is the eager implementation, the one TransformerLens hooks.
    """
    import torch

    config = _hf_config(
        arch, vocab_size, n_layers, n_heads, d_model, n_ctx,
        d_mlp if d_mlp is not None else 4 * d_model, sliding_window, initializer_range,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = _model_class(arch)(config)
    return model.to(torch.float32).eval()


def boot_bridge(hf_model: PreTrainedModel, tokenizer: Any, name: str) -> TransformerBridge:
    """A tiny model's bridge on the CPU (:func:`workbench.models.boot.boot_bridge`, the
    in-memory tokenizer kept as given)."""
    from workbench.models.boot import boot_bridge as boot

    return boot(hf_model, tokenizer, name, in_memory_tokenizer=True)


def repeated_tokens(
    batch: int,
    half_len: int,
    n_symbols: int,
    seed: int = 0,
    bos: bool = True,
    prefix_len: int = 0,
) -> Int[torch.Tensor, "batch pos"]:
    """Random repeated sequences ``[<bos>, p_1..p_P, x_1..x_L, x_1..x_L]`` over ``t0..``.

    ``L = half_len`` and ``P = prefix_len`` (default 0: no filler prefix). All ``P + L``
    symbols of a row are distinct and drawn uniformly (a random permutation prefix), so every
    token of the second copy has exactly one earlier occurrence. Token ids are
    ``N_SPECIAL + symbol index``; seeded and independent of the global RNG.
    """
    import torch

    if half_len < 1 or prefix_len < 0 or prefix_len + half_len > n_symbols:
        raise WorkbenchError(
            f"cannot draw {prefix_len} + {half_len} distinct symbols out of {n_symbols}",
            "use a shorter sequence or more symbols",
        )
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand(batch, n_symbols, generator=gen).argsort(dim=-1) + N_SPECIAL
    prefix, half = draw[:, :prefix_len], draw[:, prefix_len : prefix_len + half_len]
    parts = [prefix, half, half]
    if bos:
        parts.insert(0, torch.full((batch, 1), BOS_ID, dtype=torch.long))
    return torch.cat(parts, dim=1)


def save_state_dict(model: PreTrainedModel, path: str | os.PathLike[str]) -> None:
    """Write the model's weights as safetensors, leaving out tied copies (e.g. GPT-2's head)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous()
    save_file(tensors, str(path))


def load_hf_model(directory: str | os.PathLike[str]) -> PreTrainedModel:
    """Build a model from ``config.json`` and fill it from ``model.safetensors`` (no pickle)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(
        load_file(directory / "model.safetensors"), strict=False
    )
    tied = {k for k, _ in _tied_keys(model)}
    if unexpected or set(missing) - tied:
        raise WorkbenchError(
            f"weights in {directory} do not fit the config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}",
            "re-create them with scripts/train_toy_induction.py",
        )
    model.tie_weights()
    return model.eval()


def _tied_keys(model: Any) -> list[tuple[str, str]]:
    """``(key, key_it_shares_storage_with)`` for every state-dict entry that is a tied copy."""
    first: dict[int, str] = {}
    pairs = []
    for key, value in model.state_dict().items():
        ptr = value.data_ptr()
        if ptr in first:
            pairs.append((key, first[ptr]))
        else:
            first[ptr] = key
    return pairs


def load_toy_induction() -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """The shipped toy induction model, its tokenizer and its measured mechanism.

    The mechanism dict (``mechanism.json``) names ``induction_head`` and
    ``previous_token_head`` as ``[layer, head]`` and holds every head's scores, the accuracy
    and loss on the repeated half, and the loss with the induction head zero-ablated.
    """
    directory = data_dir() / TOY_INDUCTION_DIR
    files = ("config.json", "model.safetensors", "tokenizer.json", "mechanism.json")
    absent = [f for f in files if not (directory / f).is_file()]
    if absent:
        raise WorkbenchError(
            f"toy induction model incomplete in {directory} (missing {', '.join(absent)})",
            "run scripts/train_toy_induction.py or set WORKBENCH_DATA_DIR",
        )
    model = load_hf_model(directory)
    tokenizer = load_word_tokenizer(directory / "tokenizer.json")
    mechanism = json.loads((directory / "mechanism.json").read_text())
    return model, tokenizer, mechanism

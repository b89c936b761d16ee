"""Induction on repeated random tokens (Elhage et al. 2021; Olsson et al. 2022).

Clean: ``[BOS?] x_1 .. x_L x_1 .. x_{L-1}``; the answer is ``x_L``, which only an induction
mechanism (find the previous occurrence of the current token, copy its successor) can predict.
Incorrect: a random pool token that occurs nowhere in the prompt. Corrupted: the same first
half followed by a fresh random second half ``y_1 .. y_{L-1}`` (same length), so the runs
differ from position ``L`` (``L + 1`` with BOS) on.

The ``x_i`` are ``L`` distinct ids drawn uniformly from a pool of ordinary tokens: never special
tokens; for a real tokenizer, tokens that decode to a space plus letters and re-encode to
themselves (so the decoded prompt text means the same tokens); for a tokenizer with too few of
those (a word-level test tokenizer), any token whose decoded text re-encodes to itself.
"""

from __future__ import annotations

import contextlib
import random
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import TaskSpec, check_n_prompts, make_prompt_set, with_bos
from workbench.types import PromptSet

MIN_POOL = 200
"""Use the space+letters pool when it has at least this many tokens."""


@dataclass(frozen=True)
class InductionParams:
    n_prompts: int = field(default=8, metadata={"help": "number of prompt pairs"})
    seq_len: int = field(default=20, metadata={"help": "length L of the repeated random block"})
    seed: int = field(default=0, metadata={"help": "seed of the token sampler"})

    def validate(self) -> None:
        check_n_prompts(self.n_prompts)
        if self.seq_len < 2:
            raise WorkbenchError(f"seq_len must be >= 2, got {self.seq_len}", "use seq_len >= 2")


def _round_trips(codec: TextCodec, ids: list[int], texts: list[str]) -> list[int]:
    if not ids:
        return []
    encoded = codec.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [i for i, e in zip(ids, encoded, strict=True) if list(e) == [i]]


_POOLS: weakref.WeakKeyDictionary[Any, tuple[int, list[int], str]] = weakref.WeakKeyDictionary()


def token_pool(codec: TextCodec) -> tuple[list[int], str]:
    """The ids random sequences are drawn from, and a description of the pool.

    Memoised per tokenizer object (decoding a large vocabulary takes a second or more).
    """
    tok = codec.tokenizer
    try:
        size, pool, description = _POOLS[tok]
        if size == codec.vocab_size:
            return list(pool), description
    except (KeyError, TypeError):
        pass
    pool, description = _compute_pool(codec)
    with contextlib.suppress(TypeError):
        _POOLS[tok] = (codec.vocab_size, pool, description)
    return list(pool), description


def _compute_pool(codec: TextCodec) -> tuple[list[int], str]:
    tok = codec.tokenizer
    special = {int(i) for i in tok.all_special_ids}
    ids = [i for i in range(codec.vocab_size) if i not in special]
    texts = list(tok.batch_decode([[i] for i in ids]))
    spaced = [(i, t) for i, t in zip(ids, texts, strict=True) if re.fullmatch(r" [A-Za-z]{2,}", t)]
    pool = _round_trips(codec, [i for i, _ in spaced], [t for _, t in spaced])
    if len(pool) >= MIN_POOL:
        return pool, "tokens that decode to a space plus letters and re-encode to themselves"
    plain = [(i, t) for i, t in zip(ids, texts, strict=True) if re.fullmatch(r"\S+", t)]
    pool = _round_trips(codec, [i for i, _ in plain], [t for _, t in plain])
    return pool, "non-special tokens whose decoded text re-encodes to themselves"


def _draw(rng: random.Random, pool: list[int], k: int, exclude: set[int]) -> list[int]:
    """``k`` distinct pool ids not in ``exclude`` (rejection sampling: the pool is large)."""
    out: list[int] = []
    seen = set(exclude)
    while len(out) < k:
        t = pool[rng.randrange(len(pool))]
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def build(codec: TextCodec, params: InductionParams) -> PromptSet:
    seq_len = params.seq_len
    pool, description = token_pool(codec)
    if len(pool) < 2 * seq_len + 1:
        raise WorkbenchError(
            f"induction: the token pool has {len(pool)} tokens, {2 * seq_len + 1} are needed "
            f"for seq_len {seq_len}",
            "use a smaller seq_len",
        )
    length = 2 * seq_len - 1 + int(codec.prepend_bos)
    if length > codec.n_ctx:
        raise WorkbenchError(
            f"induction: prompts of {length} tokens exceed the model's context {codec.n_ctx}",
            f"use seq_len <= {(codec.n_ctx + 1 - int(codec.prepend_bos)) // 2}",
        )
    rng = random.Random(params.seed)
    clean, corrupt, correct, incorrect = [], [], [], []
    for _ in range(params.n_prompts):
        xs = _draw(rng, pool, seq_len, set())
        ys = _draw(rng, pool, seq_len - 1, set(xs))
        (wrong,) = _draw(rng, pool, 1, set(xs) | set(ys))
        clean.append(with_bos(codec, xs + xs[:-1]))
        corrupt.append(with_bos(codec, xs + ys))
        correct.append(xs[-1])
        incorrect.append(wrong)
    meta = {
        "seq_len": seq_len,
        "pool": description,
        "pool_size": len(pool),
        "repeat_start": seq_len + int(codec.prepend_bos),
    }
    return make_prompt_set(
        "induction",
        codec,
        clean,
        corrupt,
        correct,
        incorrect,
        [codec.decode(c) for c in clean],
        [codec.decode(c) for c in corrupt],
        meta,
    )


SPEC = TaskSpec(
    name="induction",
    description="repeated random tokens x_1..x_L x_1..x_{L-1} -> x_L; "
    "corrupted: the second half replaced by fresh random tokens",
    params_cls=InductionParams,
    build=build,
    data_files=(),
    version="1",
)

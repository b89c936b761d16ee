"""Random tokens repeated several times (RazorAttention's probe, Tang et al. 2024).

Clean: ``[BOS?] x_1 .. x_L`` repeated ``R`` times, the ``x_i`` ``L`` distinct random ids from the
ordinary-token pool of :mod:`workbench.tasks.induction`. The paper's code uses 2500 ids x 4
repeats; the default here (400 x 4 = 1600 tokens) fits a 2048-token context. There is no
corruption (``corrupt`` equals ``clean``) and no answer to predict (``correct`` is ``x_1``,
``incorrect`` a pool token absent from the prompt): the set is for attention-pattern scores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import TaskSpec, check_n_prompts, make_prompt_set, with_bos
from workbench.tasks.induction import _draw, token_pool
from workbench.types import PromptSet


@dataclass(frozen=True)
class RepeatedParams:
    n_prompts: int = field(default=1, metadata={"help": "number of sequences"})
    length: int = field(default=400, metadata={"help": "length L of the random block"})
    repeats: int = field(default=4, metadata={"help": "times R the block is repeated (>= 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the token sampler"})

    def validate(self) -> None:
        check_n_prompts(self.n_prompts)
        if self.length < 2 or self.repeats < 2:
            raise WorkbenchError(
                f"repeated: length and repeats must be >= 2, got {self.length}, {self.repeats}",
                "use length = 400, repeats = 4",
            )


def build(codec: TextCodec, params: RepeatedParams) -> PromptSet:
    pool, description = token_pool(codec)
    if len(pool) < params.length + 1:
        raise WorkbenchError(
            f"repeated: the token pool has {len(pool)} tokens, {params.length + 1} are needed",
            "use a smaller length",
        )
    total = params.length * params.repeats + int(codec.prepend_bos)
    if total > codec.n_ctx:
        raise WorkbenchError(
            f"repeated: sequences of {total} tokens exceed the model's context {codec.n_ctx}",
            f"use length * repeats <= {codec.n_ctx - int(codec.prepend_bos)}",
        )
    rng = random.Random(params.seed)
    clean, correct, incorrect = [], [], []
    for _ in range(params.n_prompts):
        xs = _draw(rng, pool, params.length, set())
        (absent,) = _draw(rng, pool, 1, set(xs))
        clean.append(with_bos(codec, xs * params.repeats))
        correct.append(xs[0])
        incorrect.append(absent)
    meta = {
        "length": params.length,
        "repeats": params.repeats,
        "offset": int(codec.prepend_bos),
        "pool": description,
    }
    texts = [codec.decode(c) for c in clean]
    return make_prompt_set("repeated", codec, clean, clean, correct, incorrect, texts, texts, meta)


SPEC = TaskSpec(
    name="repeated",
    description="random tokens x_1..x_L repeated R times (RazorAttention's echo/induction probe)",
    params_cls=RepeatedParams,
    build=build,
    data_files=(),
    version="1",
)

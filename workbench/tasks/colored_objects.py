"""Colored objects (BIG-bench "reasoning about colored objects"; Merullo et al. 2023).

Clean: "On the table, I see a red pen, a blue book, and a green cup. What color is the book?
Answer: The color of the book is" -> correct " blue". Corrupted: the same prompt asking about
another object on the table (both mentions of the queried object swapped), so the answer
changes; its answer (a color present in the prompt) is the incorrect one. Objects and colors
are distinct within a prompt, and only colors, objects and surfaces that are one token with a
leading space are used, so all prompts of a set have one token length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import (
    TaskSpec,
    check_n_prompts,
    first_diff,
    make_prompt_set,
    read_json,
    single_tokens,
    tasks_data,
)
from workbench.types import PromptSet

DATA_FILE = Path("tasks/colored_objects.json")
MAX_TRIES = 50


@dataclass(frozen=True)
class ColoredObjectsParams:
    n_prompts: int = field(default=16, metadata={"help": "number of prompt pairs"})
    seed: int = field(default=0, metadata={"help": "seed of the object/color sampler"})
    n_objects: int = field(default=3, metadata={"help": "objects on the table (2 or more)"})
    n_shots: int = field(
        default=0,
        metadata={
            "help": "solved examples before each prompt (in-context, as BIG-bench's few-shot)"
        },
    )

    def validate(self) -> None:
        check_n_prompts(self.n_prompts)
        if self.n_shots < 0:
            raise WorkbenchError(f"n_shots must be >= 0, got {self.n_shots}", "use n_shots >= 0")
        if self.n_objects < 2:
            raise WorkbenchError(
                f"n_objects must be >= 2, got {self.n_objects}", "use n_objects >= 2"
            )


def _data() -> dict[str, Any]:
    return dict(read_json(tasks_data("colored_objects.json")))


def _texts() -> list[str]:
    d = _data()
    fixed = d["template"].replace("{surface}", "").replace("{items}", "")
    return [
        fixed.replace("{object}", ""),
        "a an and ,",
        *d["surfaces"],
        *d["colors"],
        *d["objects"],
    ]


def _items(colors: list[str], objects: list[str]) -> str:
    parts = [
        f"{'an' if c[0] in 'aeiou' else 'a'} {c} {o}" for c, o in zip(colors, objects, strict=True)
    ]
    if len(parts) == 2:
        return f"{parts[0]} and {parts[1]}"
    return ", ".join(parts[:-1]) + f", and {parts[-1]}"


def _solved(
    template: str,
    rng: random.Random,
    colors: list[str],
    objects: list[str],
    surfaces: list[str],
    n: int,
) -> str:
    """One in-context example: a prompt of the same form followed by its answer."""
    cs, os_ = rng.sample(colors, n), rng.sample(objects, n)
    q = rng.randrange(n)
    text = template.format(surface=rng.choice(surfaces), items=_items(cs, os_), object=os_[q])
    return f"{text} {cs[q]}.\n\n"


def build(codec: TextCodec, params: ColoredObjectsParams) -> PromptSet:
    data = _data()
    colors = single_tokens(codec, data["colors"])
    objects = single_tokens(codec, data["objects"])
    surfaces = list(single_tokens(codec, data["surfaces"]))
    n = params.n_objects
    if len(colors) < n or len(objects) < n or not surfaces:
        raise WorkbenchError(
            f"colored_objects: {len(colors)} colors, {len(objects)} objects and {len(surfaces)} "
            f"surfaces are single tokens for this tokenizer; n_objects is {n}",
            f"use n_objects <= {min(len(colors), len(objects))}",
        )
    template = str(data["template"])
    rng = random.Random(params.seed)
    color_names, object_names = list(colors), list(objects)
    length: int | None = None
    clean, corrupt, correct, incorrect = [], [], [], []
    texts, corrupt_texts = [], []
    query_pos: list[int] = []
    for _ in range(params.n_prompts):
        for _ in range(MAX_TRIES):
            cs, os_ = rng.sample(color_names, n), rng.sample(object_names, n)
            surface = rng.choice(surfaces)
            q, alt = rng.sample(range(n), 2)
            items = _items(cs, os_)
            shots = "".join(
                _solved(template, rng, color_names, object_names, surfaces, n)
                for _ in range(params.n_shots)
            )
            text = shots + template.format(surface=surface, items=items, object=os_[q])
            ctext = shots + template.format(surface=surface, items=items, object=os_[alt])
            ids, cids = codec.encode_prompt(text), codec.encode_prompt(ctext)
            if len(ids) == len(cids) and length in (None, len(ids)):
                break
        else:
            raise WorkbenchError(
                f"colored_objects: no prompt of {length} tokens after {MAX_TRIES} tries",
                "use another tokenizer or edit data/tasks/colored_objects.json",
            )
        length = len(ids)
        clean.append(ids)
        corrupt.append(cids)
        correct.append(colors[cs[q]])
        incorrect.append(colors[cs[alt]])
        texts.append(text)
        corrupt_texts.append(ctext)
        query_pos.append(first_diff(ids, cids))
    meta = {
        "n_objects": n,
        "query_pos": query_pos,
        "n_colors_usable": len(colors),
        "n_objects_usable": len(objects),
    }
    return make_prompt_set(
        "colored_objects", codec, clean, corrupt, correct, incorrect, texts, corrupt_texts, meta
    )


SPEC = TaskSpec(
    name="colored_objects",
    description="colored objects (BIG-bench; Merullo et al. 2023): 'On the table, I see a red "
    "pen, a blue book, and a green cup. What color is the book? ...' -> ' blue'; "
    "corrupted: the question asks about another object",
    params_cls=ColoredObjectsParams,
    build=build,
    data_files=(DATA_FILE,),
    version="1",
    texts=_texts,
)

"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

Clean: "When Mary and John went to the store, John gave a drink to" -> correct " Mary" (the
indirect object, IO), incorrect " John" (the subject, S). The corrupted prompt replaces the
repeated subject (S2, the second "John") with a third name C ("..., Alice gave a drink to"):
the standard "ABC" corruption, which leaves no repeated name, so the clean and corrupted runs
differ from S2 on. Templates come in ABBA order (IO first, as above) and BABA order (S first).

Only names, places and objects that are one token *with a leading space* for the given
tokenizer are used, so every name swap keeps the token length. A prompt set is one tensor, so
all its prompts must have the same length: among the templates, the largest group of equal
token length is used (``meta["templates_used"]``). Positions of IO, S1, S2 and the end are
recorded per prompt in ``meta["positions"]``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import (
    TaskSpec,
    check_n_prompts,
    make_prompt_set,
    read_json,
    single_tokens,
    tasks_data,
)
from workbench.types import PromptSet

DATA_FILE = Path("tasks/ioi.json")
MAX_TRIES = 50


@dataclass(frozen=True)
class IOIParams:
    n_prompts: int = field(default=16, metadata={"help": "number of prompt pairs"})
    seed: int = field(default=0, metadata={"help": "seed of the name/template sampler"})
    templates: Literal["ABBA", "BABA", "both"] = field(
        default="both",
        metadata={"help": "ABBA (IO named first), BABA (S named first) or both, alternating"},
    )

    def validate(self) -> None:
        check_n_prompts(self.n_prompts)


def _data() -> dict[str, Any]:
    return dict(read_json(tasks_data("ioi.json")))


def _texts() -> list[str]:
    d = _data()
    fills = [t.replace("[IO]", "").replace("[S]", "") for t in d["templates"]]
    fills = [t.replace("[PLACE]", "").replace("[OBJECT]", "") for t in fills]
    return [*fills, *d["names"], *d["places"], *d["objects"]]


def _fill(template: str, pattern: str, io: str, s: str, s2: str, place: str, obj: str) -> str:
    """Fill an ABBA-order template; BABA swaps the first two name slots; S2 may be renamed."""
    first, second = ("[IO]", "[S]") if pattern == "ABBA" else ("[S]", "[IO]")
    text = template.replace("[IO]", "{A}", 1).replace("[S]", "{B}", 1)
    text = text.replace("[S]", "{S2}", 1).replace("[PLACE]", place).replace("[OBJECT]", obj)
    names = {"[IO]": io, "[S]": s}
    return text.format(A=names[first], B=names[second], S2=s2)


def _positions(ids: list[int], tok: int, count: int) -> list[int] | None:
    found = [i for i, t in enumerate(ids) if t == tok]
    return found if len(found) == count else None


def build(codec: TextCodec, params: IOIParams) -> PromptSet:
    data = _data()
    names = single_tokens(codec, data["names"])
    places = list(single_tokens(codec, data["places"]))
    objects = list(single_tokens(codec, data["objects"]))
    if len(names) < 3 or not places or not objects:
        raise WorkbenchError(
            f"IOI: only {len(names)} names, {len(places)} places, {len(objects)} objects are "
            "single tokens with a leading space for this tokenizer",
            "add single-token names/places/objects to data/tasks/ioi.json",
        )
    name_list = list(names)
    # Group the templates by token length (filled with sample names), keep the largest group.
    groups: dict[int, list[str]] = defaultdict(list)
    a, b = name_list[0], name_list[1]
    for t in data["templates"]:
        groups[len(codec.encode_prompt(_fill(t, "ABBA", a, b, b, places[0], objects[0])))].append(t)
    length, templates = max(groups.items(), key=lambda kv: (len(kv[1]), -kv[0]))

    rng = random.Random(params.seed)
    clean, corrupt, correct, incorrect = [], [], [], []
    texts, corrupt_texts, patterns = [], [], []
    pos: dict[str, list[int]] = {"IO": [], "S1": [], "S2": [], "end": []}
    for i in range(params.n_prompts):
        pattern = params.templates
        if pattern == "both":
            pattern = "ABBA" if i % 2 == 0 else "BABA"
        for _ in range(MAX_TRIES):
            template = rng.choice(templates)
            io, s, c = rng.sample(name_list, 3)
            place, obj = rng.choice(places), rng.choice(objects)
            text = _fill(template, pattern, io, s, s, place, obj)
            ctext = _fill(template, pattern, io, s, c, place, obj)
            ids, cids = codec.encode_prompt(text), codec.encode_prompt(ctext)
            io_pos = _positions(ids, names[io], 1)
            s_pos = _positions(ids, names[s], 2)
            c_pos = _positions(cids, names[c], 1)
            if len(ids) == len(cids) == length and io_pos and s_pos and c_pos == [s_pos[1]]:
                break
        else:
            raise WorkbenchError(
                f"IOI: no prompt of {length} tokens with single-token names after {MAX_TRIES} "
                "tries (the tokenizer merges names with their context)",
                "use another tokenizer or edit data/tasks/ioi.json",
            )
        clean.append(ids)
        corrupt.append(cids)
        correct.append(names[io])
        incorrect.append(names[s])
        texts.append(text)
        corrupt_texts.append(ctext)
        patterns.append(pattern)
        pos["IO"].append(io_pos[0])
        pos["S1"].append(s_pos[0])
        pos["S2"].append(s_pos[1])
        pos["end"].append(length - 1)
    meta = {
        "positions": pos,
        "patterns": patterns,
        "positions_aligned": all(len(set(v)) == 1 for v in pos.values()),
        "n_names_usable": len(names),
        "n_templates_usable": len(templates),
        "n_templates_total": len(data["templates"]),
        "templates_used": templates,
    }
    return make_prompt_set(
        "ioi", codec, clean, corrupt, correct, incorrect, texts, corrupt_texts, meta
    )


SPEC = TaskSpec(
    name="ioi",
    description="indirect object identification (Wang et al. 2022): "
    "'When Mary and John went to the store, John gave a drink to' -> ' Mary'; "
    "corrupted: the repeated subject replaced by a third name",
    params_cls=IOIParams,
    build=build,
    data_files=(DATA_FILE,),
    version="1",
    texts=_texts,
)

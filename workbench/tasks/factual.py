"""Factual recall: "The Eiffel Tower is located in the city of" -> " Paris".

The shipped list (``data/tasks/factual.jsonl``: ``relation``, ``prompt``, ``answer``) holds
subject -> attribute prompts grouped by relation. Each clean prompt is paired with another
prompt of the same relation whose answer differs and whose prompt has the same token length
(the next such prompt in file order): that prompt is the corrupted one (a different subject:
"The Colosseum is located in the city of") and its answer is the incorrect one (" Rome"), so
the patching metric measures how much of the subject's attribute a component carries.

Only single-token answers are kept, prompts without a same-length partner are skipped, and since
a prompt set is one tensor, the largest group of pairs of equal token length is used. ``meta``
says how many survive each step.

``source="smollm2_verified"`` (default) reads ``data/tasks/factual_smollm2.jsonl``: the prompts
SmolLM2-135M-Instruct completes correctly with its greedy next token (written by
``scripts/check_factual.py``); ``source="all"`` reads the full list.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import TaskSpec, known_token, make_prompt_set, read_jsonl, tasks_data
from workbench.types import PromptSet

ALL_FILE = Path("tasks/factual.jsonl")
VERIFIED_FILE = Path("tasks/factual_smollm2.jsonl")
KEYS = ("relation", "prompt", "answer")


@dataclass(frozen=True)
class FactualParams:
    source: Literal["smollm2_verified", "all"] = field(
        default="smollm2_verified",
        metadata={"help": "the prompts SmolLM2-135M gets right, or the full shipped list"},
    )
    relation: str = field(
        default="all",
        metadata={"help": "one relation (capital, landmark_city, language, ...) or all"},
    )


def load_facts(source: str = "all") -> list[dict[str, Any]]:
    """The shipped fact records of ``source`` ("all" or "smollm2_verified")."""
    rel = ALL_FILE if source == "all" else VERIFIED_FILE
    path = tasks_data(rel.name)
    if source != "all" and not path.is_file():
        raise WorkbenchError(
            f"verified factual list not found: {path}",
            "run scripts/check_factual.py or use source = 'all'",
        )
    return read_jsonl(path, KEYS, what="factual prompt list")


def _texts() -> list[str]:
    rows = load_facts("all")
    return [str(r[k]) for r in rows for k in ("prompt", "answer")]


def build(codec: TextCodec, params: FactualParams) -> PromptSet:
    rows = load_facts(params.source)
    relations = sorted({str(r["relation"]) for r in rows})
    if params.relation != "all":
        if params.relation not in relations:
            raise WorkbenchError(
                f"factual: unknown relation '{params.relation}'",
                f"use all or one of {', '.join(relations)}",
            )
        rows = [r for r in rows if r["relation"] == params.relation]
    n_facts = len(rows)
    facts = []
    for r in rows:
        answer = known_token(codec, str(r["answer"]))
        if answer is not None:
            facts.append((str(r["relation"]), str(r["prompt"]), answer, str(r["answer"])))
    ids = [codec.encode_prompt(p) for _, p, _, _ in facts]

    by_relation: dict[str, list[int]] = defaultdict(list)
    for i, (relation, *_rest) in enumerate(facts):
        by_relation[relation].append(i)
    pairs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for members in by_relation.values():
        for k, i in enumerate(members):
            order = members[k + 1 :] + members[:k]
            partner = next(
                (j for j in order if facts[j][2] != facts[i][2] and len(ids[j]) == len(ids[i])),
                None,
            )
            if partner is not None:
                pairs[len(ids[i])].append((i, partner))
    if not pairs:
        raise WorkbenchError(
            f"factual: no prompt has a same-length partner with another single-token answer "
            f"({len(facts)} of {n_facts} answers are single tokens)",
            "use source = 'all' or another relation",
        )
    length, chosen = max(pairs.items(), key=lambda kv: (len(kv[1]), -kv[0]))
    meta = {
        "source": params.source,
        "n_facts": n_facts,
        "n_single_token_answers": len(facts),
        "n_paired": sum(len(v) for v in pairs.values()),
        "n_used": len(chosen),
        "prompt_length": length,
        "relations": sorted({facts[i][0] for i, _ in chosen}),
        "pairs_by_length": {str(k): len(v) for k, v in sorted(pairs.items())},
        "answers": [facts[i][3] for i, _ in chosen],
        "incorrect_answers": [facts[j][3] for _, j in chosen],
    }
    return make_prompt_set(
        "factual",
        codec,
        [ids[i] for i, _ in chosen],
        [ids[j] for _, j in chosen],
        [facts[i][2] for i, _ in chosen],
        [facts[j][2] for _, j in chosen],
        [facts[i][1] for i, _ in chosen],
        [facts[j][1] for _, j in chosen],
        meta,
    )


SPEC = TaskSpec(
    name="factual",
    description="factual recall: 'The Eiffel Tower is located in the city of' -> ' Paris'; "
    "corrupted: a same-length prompt about another subject of the same relation",
    params_cls=FactualParams,
    build=build,
    data_files=(ALL_FILE, VERIFIED_FILE),
    version="1",
    texts=_texts,
)

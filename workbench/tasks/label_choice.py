"""Label-choice classification: a short text, then its label out of a small set (in-context).

The style of the classification sets ACT evaluates (Yu et al. 2024: SST-2, AGNews, TREC, ...),
written for this project (``data/tasks/label_choice.jsonl``: ``task``, ``text``, ``label``;
88 examples) in three sub-tasks, each with a prompt template and a label set of single words:

- ``sentiment``: "Review: the food was cold and bland.\\nSentiment:" -> " negative"
  (positive, negative);
- ``topic``: "Headline: the bank raises interest rates ...\\nTopic:" -> " business"
  (world, sports, business, science);
- ``question``: "Question: how many legs does a spider have?\\nAnswer type:" -> " number"
  (person, place, number).

``correct`` is the gold label's token (with a leading space), ``incorrect`` the next label of
the set after it (cyclic; for two labels the other one). ``meta["choices"]`` lists, per prompt,
the token ids of its sub-task's whole label set (in the set's order) and ``meta["gold_index"]``
the gold label's place in it, so accuracy can be the argmax over the label set. A sub-task
whose labels are not all single tokens for the codec is skipped (counted in ``meta``). There is
no corruption: ``corrupt`` equals ``clean`` (as ``texts``), so patching analyses have nothing
to restore on this task.

Split (``split``, default ``select``): per sub-task and label, a seeded ``test_fraction`` of the
examples is "test", the rest "select" (drawn before any tokenizer filtering, so the same for
every model). ``shots`` solved demonstrations (default 2) come before each prompt, separated by
a blank line: drawn (seeded per example) from the *select* examples of the same sub-task other
than the prompt's own, one per label first (labels in random order), then any others; so a test
prompt never shows a test example.

Prompts differ in token length, so, as ``knowledge_conflict``, the result is a
:class:`PromptGroups` with one prompt set per length (shortest first), or a :class:`PromptSet`
when all have one length; per-prompt lists in ``meta`` (``subtasks``, ``gold_labels``,
``choices``, ``gold_index``, ``record_ids``, ``record_splits``, ``demo_ids``) follow the prompts
group by group; each group's own ``meta`` has its slice.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import (
    TaskSpec,
    by_length,
    known_token,
    make_prompt_set,
    read_jsonl,
    tasks_data,
)
from workbench.types import PromptGroups, PromptSet

DATA_FILE = Path("tasks/label_choice.jsonl")
KEYS = ("task", "text", "label")
SUBTASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sentiment": ("Review: {text}\nSentiment:", ("positive", "negative")),
    "topic": ("Headline: {text}\nTopic:", ("world", "sports", "business", "science")),
    "question": ("Question: {text}\nAnswer type:", ("person", "place", "number")),
}
"""Sub-task -> (prompt template, label set)."""
DEMO_SEPARATOR = "\n\n"
PER_PROMPT = ("subtasks", "gold_labels", "choices", "gold_index", "record_ids", "record_splits",
              "demo_ids")  # fmt: skip


@dataclass(frozen=True)
class LabelChoiceParams:
    subtasks: tuple[str, ...] = field(
        default=("sentiment", "topic", "question"),
        metadata={"help": "sub-tasks to include: sentiment, topic, question"},
    )
    split: Literal["select", "test", "all"] = field(
        default="select",
        metadata={"help": "which examples: the select split (calibration), test, or all"},
    )
    test_fraction: float = field(
        default=0.5, metadata={"help": "share of each label's examples in the test split"}
    )
    shots: int = field(
        default=2, metadata={"help": "solved demonstrations before each prompt (select split)"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the split and the demonstrations"})

    def validate(self) -> None:
        unknown = [s for s in self.subtasks if s not in SUBTASKS]
        if unknown or not self.subtasks:
            raise WorkbenchError(
                f"label_choice: unknown or no sub-tasks {unknown or list(self.subtasks)}",
                f"use some of {', '.join(SUBTASKS)}",
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise WorkbenchError(
                f"label_choice: test_fraction must be in (0, 1), got {self.test_fraction}",
                "use e.g. 0.5",
            )
        if self.shots < 0:
            raise WorkbenchError(
                f"label_choice: shots must be >= 0, got {self.shots}", "use shots = 2 (or 0)"
            )


@dataclass(frozen=True)
class _Example:
    id: str  # "line N" of the data file
    task: str
    text: str
    label: str


def load_examples() -> list[_Example]:
    """The shipped examples; a label outside its sub-task's set names its line."""
    out = []
    for i, row in enumerate(read_jsonl(tasks_data(DATA_FILE.name), KEYS, "label_choice data")):
        task, label = str(row["task"]), str(row["label"])
        if task not in SUBTASKS or label not in SUBTASKS[task][1]:
            raise WorkbenchError(
                f"label_choice data line {i + 1}: unknown task/label {task!r}/{label!r}",
                "fix data/tasks/label_choice.jsonl",
            )
        out.append(_Example(f"line {i + 1}", task, str(row["text"]), label))
    return out


def _splits(examples: list[_Example], params: LabelChoiceParams) -> dict[str, str]:
    """Per (sub-task, label), a seeded ``test_fraction`` of the examples is "test"."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for e in examples:
        groups[(e.task, e.label)].append(e.id)
    split = {e.id: "select" for e in examples}
    for key in sorted(groups):
        ids = sorted(groups[key])
        random.Random(f"label_choice split {params.seed} {key[0]} {key[1]}").shuffle(ids)
        for i in ids[: max(1, round(params.test_fraction * len(ids)))]:
            split[i] = "test"
    return split


def prompt_text(task: str, text: str) -> str:
    return SUBTASKS[task][0].format(text=text)


def _demos(e: _Example, pool: list[_Example], shots: int, seed: int) -> list[_Example]:
    """``shots`` select examples of ``e``'s sub-task (not ``e``): one per label first."""
    rng = random.Random(f"label_choice demos {seed} {e.id}")
    others = [d for d in pool if d.task == e.task and d.id != e.id]
    labels = list(SUBTASKS[e.task][1])
    rng.shuffle(labels)
    chosen: list[_Example] = []
    for label in labels:
        of_label = [d for d in others if d.label == label and d not in chosen]
        if of_label and len(chosen) < shots:
            chosen.append(rng.choice(of_label))
    rest = [d for d in others if d not in chosen]
    rng.shuffle(rest)
    chosen += rest[: max(0, shots - len(chosen))]
    rng.shuffle(chosen)
    return chosen


def _full_text(e: _Example, demos: list[_Example]) -> str:
    parts = [f"{prompt_text(d.task, d.text)} {d.label}" for d in demos]
    return DEMO_SEPARATOR.join([*parts, prompt_text(e.task, e.text)])


def build(codec: TextCodec, params: LabelChoiceParams) -> PromptSet | PromptGroups:
    examples = load_examples()
    split = _splits(examples, params)
    label_ids: dict[str, list[int]] = {}
    skipped: dict[str, list[str]] = {}
    for task in params.subtasks:
        ids = [known_token(codec, " " + label) for label in SUBTASKS[task][1]]
        bad = [lab for lab, t in zip(SUBTASKS[task][1], ids, strict=True) if t is None]
        if bad or len(set(ids)) != len(ids):
            skipped[task] = bad or ["duplicate label tokens"]
        else:
            label_ids[task] = [int(t) for t in ids if t is not None]
    pool = [e for e in examples if split[e.id] == "select"]
    rows: list[dict[str, Any]] = []
    for e in examples:
        if e.task not in label_ids or params.split not in ("all", split[e.id]):
            continue
        demos = _demos(e, pool, params.shots, params.seed)
        text = _full_text(e, demos)
        choices = label_ids[e.task]
        gold = SUBTASKS[e.task][1].index(e.label)
        rows.append({
            "clean": codec.encode_prompt(text), "prompt": text, "correct": choices[gold],
            "incorrect": choices[(gold + 1) % len(choices)], "subtasks": e.task,
            "gold_labels": e.label, "choices": list(choices), "gold_index": gold,
            "record_ids": e.id, "record_splits": split[e.id],
            "demo_ids": [d.id for d in demos],
        })  # fmt: skip
    if not rows:
        raise WorkbenchError(
            f"label_choice: no prompts (split '{params.split}', sub-tasks "
            f"{list(params.subtasks)}, skipped for multi-token labels: {sorted(skipped)})",
            "use other sub-tasks or split = 'all'",
        )
    by_len: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_len[len(row["clean"])].append(row)
    counts = {
        "split": params.split,
        "shots": params.shots,
        "label_sets": {t: list(SUBTASKS[t][1]) for t in params.subtasks},
        "skipped_subtasks": skipped,
        "n_examples": len(examples),
        "n_examples_by_split": {s: list(split.values()).count(s) for s in ("select", "test")},
        "n_prompts_by_subtask": {t: sum(r["subtasks"] == t for r in rows) for t in label_ids},
        "lengths": {str(n): len(v) for n, v in sorted(by_len.items())},
    }
    return by_length("label_choice", by_len, counts, PER_PROMPT, partial(_prompt_set, codec))


def _prompt_set(codec: TextCodec, rows: list[dict[str, Any]], meta: dict[str, Any]) -> PromptSet:
    def col(key: str) -> list[Any]:
        return [row[key] for row in rows]

    return make_prompt_set(
        "label_choice", codec, col("clean"), col("clean"), col("correct"), col("incorrect"),
        col("prompt"), col("prompt"), meta,
    )  # fmt: skip


def _texts() -> list[str]:
    out = [f"{prompt_text(e.task, e.text)} {e.label}" for e in load_examples()]
    return out + [" ".join(labels) for _, labels in SUBTASKS.values()]


SPEC = TaskSpec(
    name="label_choice",
    description="label-choice classification in context (sentiment, topic, question type; "
    "single-token labels, few-shot demos from the select split); correct = the gold label, "
    "incorrect = the next label; no corruption (corrupt = clean)",
    params_cls=LabelChoiceParams,
    build=build,
    data_files=(DATA_FILE,),
    version="1",
    texts=_texts,
)

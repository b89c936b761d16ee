"""Knowledge conflict: a context states a counterfactual before a question the model knows.

"The capital of France is Rome.\\nThe capital of France is" -> memory answer o_m (" Paris", the
model's own) or context answer o_c (" Rome"); the memory rate is the share of answers equal to
o_m, the context rate the share equal to o_c. Two context formats (JUICE compares them): a
one-sentence substitution (``sentence``: "{prompt}{o_c}.") and a short coherent paragraph of
false context stating o_c twice (``paragraph``); the question (the record's own prompt) follows
on a new line.

Records are the factual task's (``load_facts(source)``, default the ones SmolLM2-135M gets
right) with single-token answers; a record's o_c is the answer of another record of the same
relation with a different single-token answer (a seeded choice). ``records_file`` reads the
user's own JSONL instead (``relation``, ``prompt``, ``answer``, ``counterfactual``; answers as
the model would continue the prompt, usually with a leading space); a counterfactual equal to
its answer stops the build.

Each prompt pairs clean = the conflict prompt (context with o_c, then the question) with
corrupt = the same prompt with o_m in the context (context agreeing with memory); correct = o_m,
incorrect = o_c, so ``logit_diff`` is logit(o_m) - logit(o_c). A prompt is skipped (counted
in ``meta``) unless its two versions tokenise to the same length and differ exactly at the
context's answer tokens. The question alone (no conflict) is ``meta["questions"]``.

Record split (``split``): per relation, a seeded ``test_fraction`` of the records is "test" and
the rest "select"; every record of ``heldout_relations`` is "test". The split is drawn before
any tokenizer filtering, so it is the same for every model.

Prompts differ in token length (relations, formats), so, as ``custom`` does, the result is a
:class:`PromptGroups` with one prompt set per length (the runner analyses each and merges them
into one result), or a :class:`PromptSet` when all have one length. Per-prompt lists in ``meta``
(``formats``, ``relations``, ``memory_answers``, ``context_answers``, ``questions``, ...) follow
the prompts group by group, shortest first; each group's own ``meta`` has its slice.
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
    read_jsonl_numbered,
)
from workbench.tasks.factual import ALL_FILE, VERIFIED_FILE, load_facts
from workbench.types import PromptGroups, PromptSet

FORMATS = ("sentence", "paragraph")
SEPARATOR = "\n"
TEMPLATES = {
    "sentence": "{prompt}{answer}.",
    "paragraph": "{prompt}{answer}. This has been checked by many historians and writers, and "
    "{prompt_lc}{answer}, as reference books now state. It is a widely known fact today.",
}
USER_KEYS = ("relation", "prompt", "answer", "counterfactual")
PER_PROMPT = ("formats", "relations", "memory_answers", "context_answers", "questions",
              "record_ids", "record_splits", "context_answer_positions",
              "question_start")  # fmt: skip


@dataclass(frozen=True)
class KnowledgeConflictParams:
    source: Literal["smollm2_verified", "all"] = field(
        default="smollm2_verified",
        metadata={"help": "the factual records SmolLM2-135M gets right, or the full list"},
    )
    records_file: str = field(
        default="",
        metadata={
            "help": "your own .jsonl (relation, prompt, answer, counterfactual) instead of source"
        },
    )
    format: Literal["sentence", "paragraph", "both"] = field(
        default="both",
        metadata={"help": "the false context: one sentence, a short paragraph, or both"},
    )
    split: Literal["all", "select", "test"] = field(
        default="all", metadata={"help": "which records: the select split, the test split, or all"}
    )
    test_fraction: float = field(
        default=0.5, metadata={"help": "share of each relation's records in the test split"}
    )
    heldout_relations: tuple[str, ...] = field(
        default=(), metadata={"help": "relations whose records all go to the test split"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the split and the counterfactuals"})

    def validate(self) -> None:
        if not 0.0 <= self.test_fraction <= 1.0:
            raise WorkbenchError(
                f"knowledge_conflict: test_fraction must be in [0, 1], got {self.test_fraction}",
                "use e.g. 0.5",
            )
        if self.records_file and Path(self.records_file).suffix.lower() != ".jsonl":
            raise WorkbenchError(
                f"knowledge_conflict: records_file must be a .jsonl file: {self.records_file}",
                "write one JSON object per line",
            )


@dataclass(frozen=True)
class _Record:
    id: str  # "line N" of its file
    relation: str
    prompt: str
    answer: str
    counterfactual: str | None  # given by a user file; chosen at build time otherwise


def _path(params: KnowledgeConflictParams) -> Path:
    path = Path(params.records_file).expanduser()
    if not path.is_file():
        raise WorkbenchError(f"knowledge_conflict records file not found: {path}", "check the path")
    return path


def _records(params: KnowledgeConflictParams) -> list[_Record]:
    if not params.records_file:
        rows = load_facts(params.source)
        return [
            _Record(f"line {i + 1}", str(r["relation"]), str(r["prompt"]), str(r["answer"]), None)
            for i, r in enumerate(rows)
        ]
    path = _path(params)
    out = []
    for lineno, row in read_jsonl_numbered(path, USER_KEYS, what="knowledge_conflict records"):
        bad = [k for k in USER_KEYS if not isinstance(row[k], str) or not row[k].strip()]
        if bad:
            raise WorkbenchError(
                f"{path} line {lineno}: {', '.join(bad)} empty or not text", "fill in every key"
            )
        out.append(_Record(f"line {lineno}", row["relation"], row["prompt"], row["answer"],
                           row["counterfactual"]))  # fmt: skip
        if row["counterfactual"].strip() == row["answer"].strip():
            _same(path, out[-1])
    return out


def _same(path: Path | str, r: _Record) -> None:
    raise WorkbenchError(
        f"{path} {r.id}: counterfactual {r.counterfactual!r} equals the answer {r.answer!r} "
        f"({r.prompt!r})",
        "give a counterfactual that differs from the true answer",
    )


def _splits(records: list[_Record], params: KnowledgeConflictParams) -> list[str]:
    relations = sorted({r.relation for r in records})
    unknown = sorted(set(params.heldout_relations) - set(relations))
    if unknown:
        raise WorkbenchError(
            f"knowledge_conflict: unknown held-out relation(s) {', '.join(unknown)}",
            f"use some of {', '.join(relations)}",
        )
    split = ["test" if r.relation in params.heldout_relations else "select" for r in records]
    for relation in relations:
        if relation in params.heldout_relations:
            continue
        members = [i for i, r in enumerate(records) if r.relation == relation]
        random.Random(f"knowledge_conflict split {params.seed} {relation}").shuffle(members)
        for i in members[: round(params.test_fraction * len(members))]:
            split[i] = "test"
    return split


def _lower_first(prompt: str) -> str:
    first, _, rest = prompt.partition(" ")
    return f"{first.lower()} {rest}" if first in ("The", "A", "An") and rest else prompt


def _text(fmt: str, r: _Record, answer: str) -> str:
    lower = _lower_first(r.prompt)
    context = TEMPLATES[fmt].format(prompt=r.prompt, prompt_lc=lower, answer=answer)
    return context + SEPARATOR + r.prompt


def build(codec: TextCodec, params: KnowledgeConflictParams) -> PromptSet | PromptGroups:
    records = _records(params)
    splits = _splits(records, params)
    formats = FORMATS if params.format == "both" else (params.format,)
    memory = [known_token(codec, r.answer) for r in records]
    pool: dict[str, dict[int, str]] = defaultdict(dict)  # relation -> single-token answers
    for r, tok in sorted(zip(records, memory, strict=True), key=lambda x: x[0].answer):
        if tok is not None:
            pool[r.relation].setdefault(tok, r.answer)
    skipped: dict[str, list[str]] = defaultdict(list)
    usable: list[tuple[int, str, int, int]] = []  # record index, o_c text, o_m id, o_c id
    for i, (r, m) in enumerate(zip(records, memory, strict=True)):
        if m is None:
            skipped["multi_token_answer"].append(r.id)
            continue
        if r.counterfactual is None:
            options = sorted((a, t) for t, a in pool[r.relation].items() if t != m)
            if not options:
                skipped["no_counterfactual"].append(r.id)
                continue
            cf, c = random.Random(f"knowledge_conflict cf {params.seed} {r.id}").choice(options)
        else:
            cf, tok = r.counterfactual, known_token(codec, r.counterfactual)
            if tok is None:
                skipped["multi_token_counterfactual"].append(r.id)
                continue
            if tok == m:
                _same(params.records_file, r)
            c = tok
        usable.append((i, cf, m, c))
    rows: list[dict[str, Any]] = []
    skipped_prompts: dict[str, list[str]] = defaultdict(list)
    chosen = [u for u in usable if params.split in ("all", splits[u[0]])]
    for fmt in formats:
        for i, cf, m, c in chosen:
            r = records[i]
            clean_text, corrupt_text = _text(fmt, r, cf), _text(fmt, r, r.answer)
            clean, corrupt = codec.encode_prompt(clean_text), codec.encode_prompt(corrupt_text)
            n_occ = TEMPLATES[fmt].count("{answer}")
            diff = [p for p, (a, b) in enumerate(zip(clean, corrupt, strict=False)) if a != b]
            if (
                len(clean) != len(corrupt)
                or len(diff) != n_occ
                or any((clean[p], corrupt[p]) != (c, m) for p in diff)
            ):
                skipped_prompts[fmt].append(r.id)
                continue
            question = codec.encode(r.prompt)
            start = len(clean) - len(question)
            rows.append({
                "clean": clean, "corrupt": corrupt, "correct": m, "incorrect": c,
                "prompt": clean_text, "corrupt_prompt": corrupt_text,
                "formats": fmt, "relations": r.relation, "memory_answers": r.answer,
                "context_answers": cf, "questions": r.prompt, "record_ids": r.id,
                "record_splits": splits[i], "context_answer_positions": diff,
                "question_start": start if clean[start:] == question else None,
            })  # fmt: skip
    by_len: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_len[len(row["clean"])].append(row)
    shipped = ALL_FILE if params.source == "all" else VERIFIED_FILE
    counts = {
        "records_from": params.records_file or shipped.name,
        "split": params.split,
        "n_records": len(records),
        "n_records_by_split": {s: splits.count(s) for s in ("select", "test")},
        "n_usable_records": len(usable),
        "n_kept_records": len({row["record_ids"] for row in rows}),
        "skipped_records": dict(skipped),
        "n_skipped_records": {k: len(v) for k, v in skipped.items()},
        "skipped_prompts": {f: skipped_prompts.get(f, []) for f in formats},
        "n_prompts_by_format": {f: sum(r["formats"] == f for r in rows) for f in formats},
        "lengths": {str(n): len(v) for n, v in sorted(by_len.items())},
    }  # fmt: skip
    if not rows:
        raise WorkbenchError(
            f"knowledge_conflict: no prompts ({len(records)} records, {len(usable)} with "
            f"single-token answers and a counterfactual, split '{params.split}')",
            "use split = 'all', another source, or another records file",
        )
    return by_length("knowledge_conflict", by_len, counts, PER_PROMPT, partial(_prompt_set, codec))


def _prompt_set(codec: TextCodec, rows: list[dict[str, Any]], meta: dict[str, Any]) -> PromptSet:
    def col(key: str) -> list[Any]:
        return [row[key] for row in rows]

    return make_prompt_set(
        "knowledge_conflict", codec, col("clean"), col("corrupt"), col("correct"),
        col("incorrect"), col("prompt"), col("corrupt_prompt"), meta,
    )  # fmt: skip


def _user_files(params: KnowledgeConflictParams) -> tuple[Path, ...]:
    return (_path(params),) if params.records_file else ()


def _texts() -> list[str]:
    rows = [_Record("", str(r["relation"]), str(r["prompt"]), str(r["answer"]), None)
            for r in load_facts("all")]  # fmt: skip
    return [_text(fmt, r, r.answer) for r in rows for fmt in FORMATS]


SPEC = TaskSpec(
    name="knowledge_conflict",
    description="context vs memory: a counterfactual context ('The capital of France is Rome.', "
    "one sentence or a paragraph) before the question; correct = the model's memory answer, "
    "incorrect = the context's; corrupted: the context agrees with memory",
    params_cls=KnowledgeConflictParams,
    build=build,
    data_files=(ALL_FILE, VERIFIED_FILE),
    version="1",
    user_files=_user_files,
    texts=_texts,
)

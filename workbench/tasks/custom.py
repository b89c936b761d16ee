"""A user's own clean/corrupted prompt pairs from a JSONL or CSV file.

Each record (a JSON object per line, or a CSV row with a header) has ``clean``, ``corrupt``,
``correct`` and ``incorrect``; the answers are text as the model would continue the prompt,
usually with a leading space (``" Mary"``), and must be single tokens. Clean and corrupted
prompts of a record must have the same token length. Records of different lengths are grouped
by length (``on_length_mismatch="group"``, the default: a :class:`PromptGroups`, one prompt set
per length, which the runner analyses group by group and merges into one result);
``"drop"`` keeps the most common length instead (the dropped rows are listed in ``meta``), and
``"error"`` stops.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import TaskSpec, make_prompt_set, read_jsonl_numbered
from workbench.types import PromptGroups, PromptSet

COLUMNS = ("clean", "corrupt", "correct", "incorrect")
EXTENSIONS = (".jsonl", ".csv")


@dataclass(frozen=True)
class CustomParams:
    path: str = field(
        default="",
        metadata={"help": "a .jsonl or .csv file with clean, corrupt, correct, incorrect"},
    )
    on_length_mismatch: Literal["group", "error", "drop"] = field(
        default="group",
        metadata={
            "help": "rows of different token lengths: run them grouped by length into one "
            "result, stop, or keep the most common length only"
        },
    )

    def validate(self) -> None:
        if not self.path:
            raise WorkbenchError("custom task: no file given", "set path to a .jsonl or .csv file")
        suffix = Path(self.path).suffix.lower()
        if suffix not in EXTENSIONS:
            raise WorkbenchError(
                f"custom task: unknown file type '{suffix or self.path}'",
                "use a .jsonl or .csv file",
            )


def _path(params: CustomParams) -> Path:
    path = Path(params.path).expanduser()
    if not path.is_file():
        raise WorkbenchError(f"custom task file not found: {path}", "check the path")
    return path


def load_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` per record; ``where`` is "line N" of the file."""
    if path.suffix.lower() == ".jsonl":
        rows = read_jsonl_numbered(path, COLUMNS, what="custom task file")
        return [(f"line {n}", {k: r[k] for k in COLUMNS}) for n, r in rows]
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise WorkbenchError(
                f"{path}: missing column(s) {', '.join(missing)}",
                f"the header needs {', '.join(COLUMNS)}",
            )
        records = [(f"line {reader.line_num}", {k: row[k] for k in COLUMNS}) for row in reader]
    if not records:
        raise WorkbenchError(f"custom task file has no rows: {path}", "add at least one row")
    return records


def _answer(codec: TextCodec, text: object, key: str, where: str, path: Path) -> int:
    if not isinstance(text, str) or not text:
        raise WorkbenchError(f"{path} {where}: '{key}' is empty", "give the answer as text")
    ids = codec.encode(text)
    unk = getattr(codec.tokenizer, "unk_token_id", None)
    if len(ids) != 1:
        raise WorkbenchError(
            f"{path} {where}: {key} answer {text!r} is {len(ids)} tokens",
            "answers must be single tokens (try a leading space, e.g. ' Mary')",
        )
    if unk is not None and ids[0] == unk:
        raise WorkbenchError(
            f"{path} {where}: {key} answer {text!r} is the unknown token", "use a known word"
        )
    return ids[0]


def build(codec: TextCodec, params: CustomParams) -> PromptSet | PromptGroups:
    path = _path(params)
    records = []
    for where, row in load_rows(path):
        for key in ("clean", "corrupt"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise WorkbenchError(f"{path} {where}: '{key}' prompt is empty", "fill it in")
        clean, corrupt = codec.encode_prompt(row["clean"]), codec.encode_prompt(row["corrupt"])
        if len(clean) != len(corrupt):
            raise WorkbenchError(
                f"{path} {where}: clean prompt has {len(clean)} tokens, corrupt {len(corrupt)}",
                "make both prompts the same token length",
            )
        if len(clean) > codec.n_ctx:
            raise WorkbenchError(
                f"{path} {where}: prompt has {len(clean)} tokens, the model's context is "
                f"{codec.n_ctx}",
                "shorten the prompt",
            )
        correct = _answer(codec, row["correct"], "correct", where, path)
        incorrect = _answer(codec, row["incorrect"], "incorrect", where, path)
        records.append((where, row, clean, corrupt, correct, incorrect))
    lengths = Counter(len(r[2]) for r in records)
    length = max(lengths, key=lambda n: (lengths[n], -n))
    dropped = [r[0] for r in records if len(r[2]) != length]
    if dropped and params.on_length_mismatch == "error":
        first = next(r for r in records if len(r[2]) != length)
        raise WorkbenchError(
            f"{path} {first[0]}: prompt has {len(first[2])} tokens, most rows have {length} "
            f"(lengths: {dict(sorted(lengths.items()))})",
            "give all rows one token length, or set on_length_mismatch = 'group' or 'drop'",
        )
    if dropped and params.on_length_mismatch == "group":
        meta = {"path": str(path), "n_rows": len(records), "lengths": dict(sorted(lengths.items()))}
        groups = tuple(
            _prompt_set(codec, [r for r in records if len(r[2]) == n], {**meta, "seq_len": n})
            for n in sorted(lengths)
        )
        return PromptGroups("custom", groups, meta)
    kept = [r for r in records if len(r[2]) == length]
    meta = {"path": str(path), "n_rows": len(records), "dropped_rows": dropped}
    return _prompt_set(codec, kept, meta)


def _prompt_set(codec: TextCodec, rows: list[Any], meta: dict[str, Any]) -> PromptSet:
    return make_prompt_set(
        "custom",
        codec,
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
        [r[5] for r in rows],
        [r[1]["clean"] for r in rows],
        [r[1]["corrupt"] for r in rows],
        meta,
    )


def _user_files(params: CustomParams) -> tuple[Path, ...]:
    return (_path(params),)


SPEC = TaskSpec(
    name="custom",
    description="your own clean/corrupt pairs from a .jsonl or .csv file "
    "(clean, corrupt, correct, incorrect)",
    params_cls=CustomParams,
    build=build,
    data_files=(),
    version="2",
    user_files=_user_files,
)


def write_pairs(clean: str, corrupt: str, correct: str, incorrect: str) -> Path:
    """Write typed clean/corrupted prompts (one per line, paired in order) and the two answers
    as a JSONL file of this task's records, named by its content (``sha256[:16].jsonl``) under
    ``$WORKBENCH_HOME/app/prompts``, written atomically; returns its path for ``path=``."""
    import hashlib
    import json

    from workbench.home import workbench_home

    cleans = [c for c in clean.splitlines() if c.strip()]
    corrupts = [c for c in corrupt.splitlines() if c.strip()]
    if not cleans or not corrupts:
        raise WorkbenchError("the clean or corrupted prompt is empty", "type both prompts")
    if len(cleans) != len(corrupts):
        raise WorkbenchError(
            f"{len(cleans)} clean prompt(s) but {len(corrupts)} corrupted",
            "give one corrupted prompt per clean prompt (one per line)",
        )
    if not correct or not incorrect:
        raise WorkbenchError("an answer is empty", "type the correct and the incorrect answer")
    lines = [
        json.dumps({"clean": a, "corrupt": b, "correct": correct, "incorrect": incorrect})
        for a, b in zip(cleans, corrupts, strict=True)
    ]
    text = "\n".join(lines) + "\n"
    folder = workbench_home() / "app" / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path

"""Shared pieces of the task generators: the spec type, data files, prompt-set assembly.

Nothing here imports torch at module level: the CLI imports the task registry (and hashes task
recipes) without loading a model. Tensors are made in :func:`make_prompt_set`, which imports
torch when a task is actually built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.home import data_dir

if TYPE_CHECKING:
    from workbench.models.codec import TextCodec
    from workbench.types import NeedleSet, PromptGroups, PromptSet

WORD_RE = re.compile(r"\w+|[^\w\s]+")
"""The pieces ``tokenizers``' ``Whitespace`` pre-tokenizer splits text into (words, punctuation)."""


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its parameter schema, its generator and the data it reads.

    ``data_files`` are paths relative to :func:`data_dir` (a folder stands for every ``.txt``
    file in it); their bytes enter :func:`workbench.tasks.recipe_hash`, so bump ``version``
    only when the generator's *code* changes its output. ``user_files`` names the files a
    parameter instance points at (a user's JSONL, a haystack folder) for the same hash, and
    ``texts`` lists every string the shipped data can put into a prompt (for
    :func:`workbench.tasks.task_vocabulary`).
    """

    name: str
    description: str
    params_cls: type
    build: Callable[[TextCodec, Any], PromptSet | PromptGroups | NeedleSet]
    data_files: tuple[Path, ...]
    version: str
    user_files: Callable[[Any], tuple[Path, ...]] | None = None
    texts: Callable[[], Iterable[str]] | None = None


def tasks_data(*parts: str) -> Path:
    """A path under ``<data_dir>/tasks``."""
    return data_dir().joinpath("tasks", *parts)


def expand_files(path: Path) -> list[Path]:
    """``path`` itself for a file; the sorted ``.txt`` files for a folder."""
    if path.is_dir():
        return sorted(p for p in path.glob("*.txt") if p.is_file())
    return [path]


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise WorkbenchError(f"data file not found: {path}", "restore it or set WORKBENCH_DATA_DIR")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise WorkbenchError(f"{path}: invalid JSON ({e})", "fix the file") from None


def read_jsonl(path: Path, required: Sequence[str], what: str = "file") -> list[dict[str, Any]]:
    """Records of a JSONL file; a bad line or a missing key names its line number."""
    return [row for _, row in read_jsonl_numbered(path, required, what)]


def read_jsonl_numbered(
    path: Path, required: Sequence[str], what: str = "file"
) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line of a JSONL file."""
    if not path.is_file():
        raise WorkbenchError(f"{what} not found: {path}", "check the path")
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise WorkbenchError(
                f"{path}:{lineno}: invalid JSON ({e.__class__.__name__})",
                "write one JSON object per line",
            ) from None
        if not isinstance(row, dict):
            raise WorkbenchError(
                f"{path}:{lineno}: expected a JSON object", "write one JSON object per line"
            )
        missing = [k for k in required if k not in row]
        if missing:
            raise WorkbenchError(
                f"{path}:{lineno}: missing key(s) {', '.join(missing)}",
                f"every line needs {', '.join(required)}",
            )
        rows.append((lineno, row))
    if not rows:
        raise WorkbenchError(f"{what} is empty: {path}", "add at least one record")
    return rows


def words_of(texts: Iterable[str]) -> set[str]:
    """The pre-tokenizer pieces (words and punctuation runs) of ``texts``."""
    out: set[str] = set()
    for t in texts:
        out.update(WORD_RE.findall(t))
    return out


def check_n_prompts(n: int) -> None:
    if n < 1:
        raise WorkbenchError(f"n_prompts must be >= 1, got {n}", "ask for at least one prompt")


def with_bos(codec: TextCodec, ids: Sequence[int]) -> list[int]:
    """``ids`` with the BOS token in front when ``codec.prepend_bos``."""
    if not codec.prepend_bos:
        return list(ids)
    if codec.bos_token_id is None:
        raise WorkbenchError(
            f"model {codec.model_name!r} has no BOS token", "set prepend_bos = false"
        )
    return [codec.bos_token_id, *ids]


def known_token(codec: TextCodec, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token and not the unknown token, else None."""
    tok = codec.single_token(text)
    unk = getattr(codec.tokenizer, "unk_token_id", None)
    return None if tok is None or (unk is not None and tok == unk) else tok


def single_tokens(codec: TextCodec, words: Iterable[str], space: bool = True) -> dict[str, int]:
    """``word -> id`` for the words that are one known token (with a leading space by default)."""
    out: dict[str, int] = {}
    for w in words:
        tok = known_token(codec, (" " + w) if space else w)
        if tok is not None:
            out[w] = tok
    return out


def first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    """First position where ``a`` and ``b`` differ (``len(a)`` when they are equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i
    return len(a)


def make_prompt_set(
    task: str,
    codec: TextCodec,
    clean: Sequence[Sequence[int]],
    corrupt: Sequence[Sequence[int]],
    correct: Sequence[int],
    incorrect: Sequence[int],
    prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    meta: dict[str, Any],
) -> PromptSet:
    """Check the shapes and answers, then pack the prompts into a :class:`PromptSet`.

    Adds ``first_diff_pos`` (the smallest first position where a clean and its corrupted prompt
    differ: activations before it are identical in both runs) and ``first_diff_pos_per_prompt``.
    """
    import torch

    from workbench.types import PromptSet

    n = len(clean)
    if n == 0:
        raise WorkbenchError(f"task '{task}' produced no prompts", "check its parameters")
    if not (len(corrupt) == len(correct) == len(incorrect) == n):
        raise WorkbenchError(f"task '{task}': clean, corrupt and answers differ in number")
    length = len(clean[0])
    for i, (c, k) in enumerate(zip(clean, corrupt, strict=True)):
        if len(c) != len(k):
            raise WorkbenchError(
                f"task '{task}' prompt {i}: clean has {len(c)} tokens, corrupt {len(k)}",
                "clean and corrupted prompts must have the same token length",
            )
        if len(c) != length:
            raise WorkbenchError(
                f"task '{task}' prompt {i}: {len(c)} tokens, prompt 0 has {length}",
                "all prompts of a set must have the same token length",
            )
    if length > codec.n_ctx:
        raise WorkbenchError(
            f"task '{task}': prompts have {length} tokens, the model's context is {codec.n_ctx}",
            "use shorter prompts",
        )
    vocab = codec.vocab_size
    for i, (a, b) in enumerate(zip(correct, incorrect, strict=True)):
        if not (0 <= a < vocab and 0 <= b < vocab):
            raise WorkbenchError(
                f"task '{task}' prompt {i}: answer id outside the vocabulary (size {vocab})"
            )
    diffs = [first_diff(c, k) for c, k in zip(clean, corrupt, strict=True)]
    full_meta = {"first_diff_pos": min(diffs), "first_diff_pos_per_prompt": diffs, **meta}
    return PromptSet(
        task=task,
        clean=torch.tensor([list(c) for c in clean], dtype=torch.long),
        corrupt=torch.tensor([list(k) for k in corrupt], dtype=torch.long),
        correct=torch.tensor(list(correct), dtype=torch.long),
        incorrect=torch.tensor(list(incorrect), dtype=torch.long),
        prompts=tuple(prompts),
        corrupt_prompts=tuple(corrupt_prompts),
        prepend_bos=codec.prepend_bos,
        meta=full_meta,
    )


def by_length(
    task: str,
    rows_by_len: dict[int, list[dict[str, Any]]],
    counts: dict[str, Any],
    per_prompt: Sequence[str],
    build: Callable[[list[dict[str, Any]], dict[str, Any]], PromptSet],
) -> PromptSet | PromptGroups:
    """Rows of several token lengths as one :class:`PromptSet` (one length) or a
    :class:`PromptGroups` of one set per length, shortest first; ``meta`` = ``counts`` plus the
    ``per_prompt`` lists (each group's own slice in its set, all of them in the groups')."""
    from workbench.types import PromptGroups

    def meta(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {**counts, **{k: [row[k] for row in rows] for k in per_prompt}}

    ordered = [row for n in sorted(rows_by_len) for row in rows_by_len[n]]
    if len(rows_by_len) == 1:
        return build(ordered, meta(ordered))
    groups = tuple(build(g, meta(g)) for _, g in sorted(rows_by_len.items()))
    return PromptGroups(task, groups, meta(ordered))

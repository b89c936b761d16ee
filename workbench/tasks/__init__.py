"""The task registry: prompt sets for patching and attribution, needle sets for retrieval heads.

Each task is a :class:`TaskSpec`: a frozen parameter dataclass (defaults for every field) and a
generator ``build(codec, params)`` that tokenises with the model's :class:`TextCodec`, so the
prompts respect its BOS policy and single-token constraints. Built-in tasks:

- ``ioi``: indirect object identification (Wang et al. 2022), ABC corruption
- ``induction``: repeated random tokens (Olsson et al. 2022)
- ``factual``: subject -> attribute recall, corrupted with another subject
- ``colored_objects``: BIG-bench colored objects (Merullo et al. 2023)
- ``knowledge_conflict``: a counterfactual context before a known fact (memory vs context)
- ``label_choice``: in-context label-choice classification (sentiment, topic, question type)
- ``needle``: needle in a haystack for retrieval heads (Wu et al. 2024), a :class:`NeedleSet`
- ``custom``: the user's own pairs from a JSONL or CSV file
- ``texts``: prose, code and repeated-token samples of T tokens (attention sinks)
- ``repeated``: random tokens repeated R times (RazorAttention's echo and induction probe)

:func:`recipe_hash` identifies a built task without building it (task, version, canonical
parameters and the bytes of every file it reads), so stored results can be found without
loading a model. Importing this package does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import params as P
from workbench.errors import WorkbenchError
from workbench.home import data_dir
from workbench.tasks import (
    colored_objects,
    custom,
    factual,
    induction,
    ioi,
    knowledge_conflict,
    label_choice,
    needle,
    repeated,
    texts,
)
from workbench.tasks._common import TaskSpec, expand_files, words_of
from workbench.types import canonical_json, sha256_hex

if TYPE_CHECKING:
    from workbench.models.codec import TextCodec
    from workbench.types import NeedleSet, PromptGroups, PromptSet

__all__ = [
    "TASKS",
    "TaskSpec",
    "build_task",
    "data_dir",
    "get_task",
    "parse_params",
    "recipe_hash",
    "task_vocabulary",
]

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        ioi.SPEC,
        induction.SPEC,
        factual.SPEC,
        colored_objects.SPEC,
        knowledge_conflict.SPEC,
        label_choice.SPEC,
        needle.SPEC,
        custom.SPEC,
        texts.SPEC,
        repeated.SPEC,
    )
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise WorkbenchError(
            f"unknown task '{name}'", f"known tasks: {', '.join(sorted(TASKS))}"
        ) from None


def parse_params(name: str, params: Any = None) -> Any:
    """The task's parameter instance: defaults filled in, unknown or ill-typed keys rejected.
    An instance already parsed (of the task's parameter class) is returned as it is."""
    cls = get_task(name).params_cls
    if isinstance(params, cls):
        return params
    return P.from_mapping(cls, params, where=f"task '{name}'")


def build_task(
    name: str, codec: TextCodec, params: Mapping[str, Any] | Any = None
) -> PromptSet | PromptGroups | NeedleSet:
    """Build task ``name`` for the model behind ``codec``; ``params`` as a mapping or already
    parsed (:func:`parse_params`).

    ``meta`` of the result gains ``params`` (canonical) and ``recipe_hash``.
    """
    spec = get_task(name)
    parsed = parse_params(name, params)
    result = spec.build(codec, parsed)
    result.meta = {
        **result.meta,
        "params": P.to_dict(parsed),
        "recipe_hash": _hash(spec, parsed),
    }
    return result


def recipe_hash(name: str, params: Mapping[str, Any] | Any = None) -> str:
    """sha256 of everything a task's prompts depend on except the tokenizer.

    Task name, generator version, canonical parameters (defaults filled in) and the bytes of the
    shipped data files and of any user file the parameters name. Reads no model, imports no
    torch. Raises :class:`WorkbenchError` for bad parameters or a missing user file.
    """
    spec = get_task(name)
    return _hash(spec, parse_params(name, params))


def _hash(spec: TaskSpec, parsed: Any) -> str:
    parts: list[str | bytes] = ["workbench.task", spec.name, spec.version]
    parts.append(canonical_json(P.to_dict(parsed)))
    root = data_dir()
    for rel in spec.data_files:
        parts += _file_parts(root / rel, label=rel.as_posix())
    for path in spec.user_files(parsed) if spec.user_files else ():
        parts += _file_parts(path, label="user")
    return sha256_hex(*parts)


def _file_parts(path: Path, label: str) -> list[str | bytes]:
    """Name and bytes of a file, or of every ``.txt`` file of a folder; a marker when absent."""
    if not path.exists():
        return [label, "<missing>"]
    out: list[str | bytes] = [label]
    for f in expand_files(path):
        out += [f.name if path.is_dir() else "", f.read_bytes()]
    return out


def task_vocabulary() -> list[str]:
    """Every word and punctuation piece the built-in tasks' templates and data can produce.

    Split like ``tokenizers``' ``Whitespace`` pre-tokenizer (``\\w+|[^\\w\\s]+``), so a
    word-level test tokenizer over these pieces encodes every built-in task without unknowns.
    """
    texts: list[str] = []
    for spec in TASKS.values():
        if spec.texts is not None:
            texts += spec.texts()
    return sorted(words_of(texts))

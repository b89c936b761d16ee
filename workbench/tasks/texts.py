"""Plain text samples of ``seq_len`` tokens from several domains (attention-sink analyses).

Gu et al. 2024 measure attention sinks on T = 64-token samples of natural text and of random
tokens; Guo et al. 2024 compare heads across input domains (a head can be dormant on one and
active on another). Domains:

- ``prose``: ``data/tasks/texts/prose.txt`` (short English paragraphs written for this project)
- ``code``: ``data/tasks/texts/code.txt`` (small Python / C / JavaScript / SQL snippets, ditto)
- ``haystack``: the needle task's haystack (``data/tasks/haystack/*.txt``, about 11k tokens of
  essays), for long natural-text samples (e.g. MoA's calibration at 512-2048 tokens)
- ``repeated``: a block of ``repeat_block`` distinct random tokens (the induction task's pool)
  repeated until the sample is full
- ``file``: the user's own texts from ``path``: a ``.txt`` file of paragraphs separated by
  blank lines, or a ``.jsonl`` file with one ``{"text": ...}`` object per line (each record
  a paragraph). Giving ``path`` adds this domain when ``domains`` does not list it.

Sample ``i`` of a text domain starts at the ``i``-th paragraph (blank-line separated block) and
runs on through the following ones: the first ``seq_len`` tokens (BOS included when the codec
prepends one). ``meta["domains"]`` names each sample's domain, in order. The prompts carry no
answer: ``corrupt`` equals ``clean`` and both answer ids are the last token (unused).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import (
    TaskSpec,
    check_n_prompts,
    make_prompt_set,
    read_jsonl_numbered,
    tasks_data,
)
from workbench.types import PromptSet

DOMAINS = ("prose", "code", "haystack", "repeated", "file")
DEFAULT_DOMAINS = ("prose", "code", "repeated")
TEXT_FILES = {"prose": "texts/prose.txt", "code": "texts/code.txt"}
USER_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class TextsParams:
    domains: tuple[str, ...] = field(
        default=DEFAULT_DOMAINS,
        metadata={
            "help": "which of prose, code, haystack (long essays), repeated (random tokens), "
            "file (your path)"
        },
    )
    path: str = field(
        default="",
        metadata={
            "help": "your own texts: a .txt of paragraphs (blank-line separated) or a .jsonl "
            "with a 'text' per line; adds the domain 'file'"
        },
    )
    n_per_domain: int = field(default=8, metadata={"help": "samples per domain"})
    seq_len: int = field(default=64, metadata={"help": "tokens per sample T (BOS included)"})
    repeat_block: int = field(
        default=16, metadata={"help": "length of the random block the repeated domain repeats"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random tokens"})

    def validate(self) -> None:
        check_n_prompts(self.n_per_domain)
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad or not self.domains or len(set(self.domains)) != len(self.domains):
            raise WorkbenchError(
                f"texts: domains must be distinct names from {', '.join(DOMAINS)}, "
                f"got {list(self.domains)}",
                'e.g. domains = ["prose", "code", "repeated"]',
            )
        if "file" in self.domains and not self.path:
            raise WorkbenchError(
                "texts: domain 'file' needs path", "set path to a .txt or .jsonl of your texts"
            )
        if self.path and Path(self.path).suffix.lower() not in USER_SUFFIXES:
            raise WorkbenchError(
                f"texts: unknown file type '{Path(self.path).suffix or self.path}'",
                "use a .txt file of paragraphs or a .jsonl file with a 'text' per line",
            )
        if self.seq_len < 2:
            raise WorkbenchError(
                f"texts: seq_len must be >= 2, got {self.seq_len}", "use seq_len = 64"
            )
        if self.repeat_block < 1:
            raise WorkbenchError(
                f"texts: repeat_block must be >= 1, got {self.repeat_block}", "use 16"
            )


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _user_path(params: TextsParams) -> Path:
    path = Path(params.path).expanduser()
    if not path.is_file():
        raise WorkbenchError(f"texts file not found: {path}", "check path")
    return path


def _user_paragraphs(path: Path) -> list[str]:
    if path.suffix.lower() == ".jsonl":
        rows = read_jsonl_numbered(path, ("text",), what="texts file")
        for n, row in rows:
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise WorkbenchError(f"{path}:{n}: 'text' must be a non-empty string", "fix it")
        return [str(row["text"]).strip() for _, row in rows]
    paragraphs = _paragraphs(path.read_text(encoding="utf-8"))
    if not paragraphs:
        raise WorkbenchError(f"texts file is empty: {path}", "add some paragraphs")
    return paragraphs


def _domains(params: TextsParams) -> tuple[str, ...]:
    if params.path and "file" not in params.domains:
        return (*params.domains, "file")
    return params.domains


def _text_samples(codec: TextCodec, domain: str, params: TextsParams, body: int) -> list[list[int]]:
    if domain == "file":
        path = _user_path(params)
        paragraphs = _user_paragraphs(path)
    elif domain == "haystack":
        from workbench.tasks.needle import HAYSTACK_DIR, load_haystack

        path = tasks_data(HAYSTACK_DIR.name)
        paragraphs = _paragraphs(load_haystack(path))
    else:
        path = tasks_data(TEXT_FILES[domain])
        if not path.is_file():
            raise WorkbenchError(
                f"data file not found: {path}", "restore it or set WORKBENCH_DATA_DIR"
            )
        paragraphs = _paragraphs(path.read_text(encoding="utf-8"))
    out: list[list[int]] = []
    for i in range(len(paragraphs)):
        ids = codec.encode("\n\n".join(paragraphs[i:]))
        if len(ids) >= body:
            out.append(ids[:body])
        if len(out) == params.n_per_domain:
            return out
    raise WorkbenchError(
        f"texts: {path.name} gives only {len(out)} samples of {body} text tokens, "
        f"{params.n_per_domain} asked",
        "ask for fewer samples (n_per_domain) or a shorter seq_len",
    )


def _repeated_samples(codec: TextCodec, params: TextsParams, body: int) -> list[list[int]]:
    from workbench.tasks.induction import token_pool

    pool, _ = token_pool(codec)
    if len(pool) < params.repeat_block:
        raise WorkbenchError(
            f"texts: the token pool has {len(pool)} tokens, repeat_block is {params.repeat_block}",
            "use a smaller repeat_block",
        )
    rng = random.Random(params.seed)
    out = []
    for _ in range(params.n_per_domain):
        block = rng.sample(pool, params.repeat_block)
        out.append([block[j % len(block)] for j in range(body)])
    return out


def build(codec: TextCodec, params: TextsParams) -> PromptSet:
    bos = int(codec.prepend_bos)
    if params.seq_len > codec.n_ctx:
        raise WorkbenchError(
            f"texts: seq_len {params.seq_len} is longer than the model's context ({codec.n_ctx})",
            f"use seq_len <= {codec.n_ctx}",
        )
    body = params.seq_len - bos
    if body < 1:
        raise WorkbenchError("texts: seq_len leaves no text after BOS", "use seq_len >= 2")
    clean: list[list[int]] = []
    domains: list[str] = []
    for d in _domains(params):
        samples = (
            _repeated_samples(codec, params, body)
            if d == "repeated"
            else _text_samples(codec, d, params, body)
        )
        prefix = [codec.bos_token_id] if bos and codec.bos_token_id is not None else []
        if bos and not prefix:
            raise WorkbenchError(
                f"model {codec.model_name!r} has no BOS token", "set prepend_bos = false"
            )
        clean += [prefix + s for s in samples]
        domains += [d] * len(samples)
    last = [c[-1] for c in clean]
    texts = [codec.decode(c) for c in clean]
    meta = {"domains": domains, "seq_len": params.seq_len}
    return make_prompt_set("texts", codec, clean, clean, last, last, texts, texts, meta)


def _user_files(params: TextsParams) -> tuple[Path, ...]:
    return (_user_path(params),) if params.path else ()


SPEC = TaskSpec(
    name="texts",
    description="seq_len-token samples of prose, code and repeated random tokens, or of your "
    "own texts (path); attention sinks; no answer",
    params_cls=TextsParams,
    build=build,
    data_files=tuple(Path("tasks") / f for f in TEXT_FILES.values()),
    version="1",
    user_files=_user_files,
)

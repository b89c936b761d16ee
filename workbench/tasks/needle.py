"""Needle in a haystack for retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically
Explains Long-Context Factuality"; after gkamradt's LLMTest_NeedleInAHaystack).

Inputs in the reference format: ``needles.jsonl`` (one object per line with ``needle``,
``question``, ``real_needle``) and a folder of haystack ``.txt`` files (read in name order,
joined, repeated as often as a context length needs). For each needle, context length and depth
the sample is built from separately tokenised pieces, concatenated as ids:

    [BOS] haystack[:k] needle haystack[k:] "\\nBased on the content of the book, Question: ...
    \\nAnswer:"

where the haystack is cut so the whole sequence has exactly ``context_length`` tokens, and the
insertion point ``k`` is the token depth ``depth% * len(haystack)``, moved back to just after
the nearest sentence-ending token at or before it (depth 100 puts the needle at the very end).
Against the reference code: it also moves back to a sentence end, but only to the token ``.``
as its tokenizer encodes it alone, where here any token whose text ends in ``.`` counts (on
byte-level BPE ``".`` or ``.)`` are one token); and its context length counts the haystack
only (it cuts the haystack to ``context_length`` minus a 200-token buffer, then adds the
question and template), where here it is the whole prompt. Every needle of the file is used
unless ``n_needles`` says otherwise; ``depth_percents`` are percentages (fractions such as
``0.5`` are refused). With ``chat_template="auto"`` and a tokenizer that has a chat
template, the user message is the reference's ``"<book>{context}</book>\\nBased on the content
of the book, Question: {question}\\nAnswer:"`` followed by the generation prompt. The needle's
token span is known from the concatenation (never searched for by string), and ``answer`` is
``real_needle`` tokenised as the model would write it: ``" " + real_needle`` after "Answer:",
``real_needle`` after a chat generation prompt.

BOS: with ``prepend_bos`` the sequence starts with BOS (added in front of a chat template that
does not already render it); a chat template that renders its own first special token keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks._common import TaskSpec, expand_files, read_jsonl, tasks_data, with_bos
from workbench.types import NeedleSample, NeedleSet

NEEDLES_FILE = Path("tasks/needles.jsonl")
HAYSTACK_DIR = Path("tasks/haystack")
NEEDLE_KEYS = ("needle", "question", "real_needle")
QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"
SENTINEL = "@@WORKBENCH_CONTEXT@@"
BOOK = ("<book>", "</book>\n")
"""The reference's wrapping of the context inside a chat user message."""


@dataclass(frozen=True)
class NeedleParams:
    context_lengths: tuple[int, ...] = field(
        default=(512,), metadata={"help": "total prompt lengths in tokens (each <= model context)"}
    )
    depth_percents: tuple[float, ...] = field(
        default=(0.0, 25.0, 50.0, 75.0, 100.0),
        metadata={"help": "needle depths in percent of the haystack (0 = start, 100 = end)"},
    )
    needles_path: str | None = field(
        default=None, metadata={"help": "a needles.jsonl (needle, question, real_needle per line)"}
    )
    haystack_dir: str | None = field(
        default=None, metadata={"help": "a folder of .txt files to use as the haystack"}
    )
    n_needles: int = field(
        default=0, metadata={"help": "use the first n needles of the file (0: every needle)"}
    )
    chat_template: Literal["auto", "none"] = field(
        default="auto", metadata={"help": "auto: wrap in the tokenizer's chat template if any"}
    )

    def validate(self) -> None:
        if not self.context_lengths:
            raise WorkbenchError("needle: context_lengths is empty", "give at least one length")
        bad = [c for c in self.context_lengths if c < 1]
        if bad:
            raise WorkbenchError(f"needle: context length {bad[0]} < 1", "use positive lengths")
        if not self.depth_percents:
            raise WorkbenchError("needle: depth_percents is empty", "give at least one depth")
        for d in self.depth_percents:
            if not 0 <= d <= 100:
                raise WorkbenchError(
                    f"needle: depth {d:g} outside [0, 100]", "give depths in percent, 0 to 100"
                )
        if max(self.depth_percents) < 1 and any(d > 0 for d in self.depth_percents):
            pct = [round(100 * d, 6) for d in self.depth_percents]
            raise WorkbenchError(
                f"needle: depth_percents {list(self.depth_percents)} look like fractions; "
                "depths are percentages of the haystack (0 to 100)",
                f"e.g. depth_percents = {pct}",
            )
        if self.n_needles < 0:
            raise WorkbenchError(
                f"n_needles must be >= 0, got {self.n_needles}", "use 0 (every needle) or more"
            )


def _needles_path(params: NeedleParams | None) -> Path:
    if params is not None and params.needles_path:
        return Path(params.needles_path).expanduser()
    return tasks_data(NEEDLES_FILE.name)


def _haystack_dir(params: NeedleParams | None) -> Path:
    if params is not None and params.haystack_dir:
        return Path(params.haystack_dir).expanduser()
    return tasks_data(HAYSTACK_DIR.name)


def load_needles(path: Path) -> list[dict[str, str]]:
    """Needle records of a reference-format ``needles.jsonl``; errors name the line."""
    rows = read_jsonl(path, NEEDLE_KEYS, what="needles file")
    out = []
    for i, row in enumerate(rows, start=1):
        for key in NEEDLE_KEYS:
            if not isinstance(row[key], str) or not row[key].strip():
                raise WorkbenchError(
                    f"{path}: record {i}: '{key}' must be a non-empty string",
                    "fill in needle, question and real_needle",
                )
        out.append({k: str(row[k]).strip() for k in NEEDLE_KEYS})
    return out


def load_haystack(folder: Path) -> str:
    """The haystack text: the folder's ``.txt`` files in name order, joined by blank lines."""
    if not folder.is_dir():
        raise WorkbenchError(f"haystack folder not found: {folder}", "check haystack_dir")
    files = expand_files(folder)
    if not files:
        raise WorkbenchError(f"no .txt files in haystack folder {folder}", "add .txt files")
    text = "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files).strip()
    if not text:
        raise WorkbenchError(f"haystack folder {folder} holds only empty files", "add text")
    return text


def _texts() -> list[str]:
    texts = [load_haystack(_haystack_dir(None)), QUESTION.format(question=""), BOOK[0], BOOK[1]]
    for row in load_needles(_needles_path(None)):
        texts += row.values()
    return texts


def _user_files(params: NeedleParams) -> tuple[Path, ...]:
    files = []
    if params.needles_path:
        files.append(_needles_path(params))
    if params.haystack_dir:
        files.append(_haystack_dir(params))
    return tuple(files)


def _chat_pieces(codec: TextCodec, use_chat: str) -> tuple[list[int], list[int]] | None:
    """Token ids before and after the user message in the chat template, or None."""
    tok = codec.tokenizer
    if use_chat == "none" or not getattr(tok, "chat_template", None):
        return None
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or rendered.count(SENTINEL) != 1:
        raise WorkbenchError(
            "needle: the tokenizer's chat template did not render the user message once",
            "use chat_template = 'none'",
        )
    before, after = rendered.split(SENTINEL)
    return codec.encode(before), codec.encode(after)


def _insertion_point(hay: list[int], depth: float, periods: set[int]) -> int:
    """Token index to insert at: after the last sentence end at or before the depth."""
    if depth >= 100:
        return len(hay)
    point = int(len(hay) * depth / 100)
    while point > 0 and hay[point - 1] not in periods:
        point -= 1
    return point


def build(codec: TextCodec, params: NeedleParams) -> NeedleSet:
    needles_path, hay_dir = _needles_path(params), _haystack_dir(params)
    needles = load_needles(needles_path)
    n_needles = params.n_needles or len(needles)
    if n_needles > len(needles):
        raise WorkbenchError(
            f"needle: n_needles is {params.n_needles} but {needles_path} has {len(needles)}",
            f"use n_needles <= {len(needles)}",
        )
    too_long = [c for c in params.context_lengths if c > codec.n_ctx]
    if too_long:
        raise WorkbenchError(
            f"needle: context length {too_long[0]} exceeds the model's context {codec.n_ctx}",
            f"use context lengths <= {codec.n_ctx}",
        )
    # A leading space, so the haystack reads on after a needle inserted at depth 0 and
    # after itself when it is repeated.
    hay_once = codec.encode(" " + load_haystack(hay_dir))
    if not hay_once:
        raise WorkbenchError(f"haystack in {hay_dir} tokenises to nothing", "add text")
    periods = {t for t in set(hay_once) if codec.decode([t]).strip().endswith(".")}
    chat = _chat_pieces(codec, params.chat_template)
    bos = with_bos(codec, [])  # [BOS] or []
    samples: list[NeedleSample] = []
    for row in needles[:n_needles]:
        needle_ids = codec.encode(" " + row["needle"])
        question = QUESTION.format(question=row["question"])
        if chat is None:
            head = bos
            tail = codec.encode("\n" + question)
            answer = codec.encode(" " + row["real_needle"])
        else:
            head = chat[0] + codec.encode(BOOK[0])
            if head[: len(bos)] != bos:
                head = bos + head
            tail = codec.encode(BOOK[1] + question) + chat[1]
            answer = codec.encode(row["real_needle"])
        fixed = len(head) + len(needle_ids) + len(tail)
        for length in params.context_lengths:
            budget = length - fixed
            if budget < 1:
                raise WorkbenchError(
                    f"needle: context length {length} leaves no room for the haystack "
                    f"(needle, question and template take {fixed} tokens)",
                    f"use context lengths > {fixed}",
                )
            hay = (hay_once * (budget // len(hay_once) + 1))[:budget]
            for depth in params.depth_percents:
                point = _insertion_point(hay, depth, periods)
                ids = head + hay[:point] + needle_ids + hay[point:] + tail
                start = len(head) + point
                span = (start, start + len(needle_ids))
                if not needle_ids or ids[span[0] : span[1]] != needle_ids:
                    raise WorkbenchError(
                        f"needle {row['needle'][:40]!r} not found in the tokenised context",
                        "check the needle text",
                    )
                samples.append(_sample(ids, span, answer, row, depth, length, str(hay_dir)))
    meta: dict[str, Any] = {
        "context_lengths": list(params.context_lengths),
        "depth_percents": list(params.depth_percents),
        "n_needles": n_needles,
        "needles_file": str(needles_path),
        "haystack_dir": str(hay_dir),
        "haystack_tokens": len(hay_once),
        "chat_template": chat is not None,
        "question_template": QUESTION,
    }
    return NeedleSet(
        task="needle", samples=tuple(samples), prepend_bos=codec.prepend_bos, meta=meta
    )


def _sample(
    ids: list[int],
    span: tuple[int, int],
    answer: list[int],
    row: dict[str, str],
    depth: float,
    length: int,
    haystack: str,
) -> NeedleSample:
    import torch

    return NeedleSample(
        context=torch.tensor(ids, dtype=torch.long),
        needle_span=span,
        answer=torch.tensor(answer, dtype=torch.long),
        needle=row["needle"],
        question=row["question"],
        real_needle=row["real_needle"],
        depth_percent=float(depth),
        context_length=length,
        haystack=haystack,
    )


SPEC = TaskSpec(
    name="needle",
    description="needle in a haystack (Wu et al. 2024): a needle sentence inserted at a depth "
    "of a haystack, then a question it answers; swept over context lengths and depths",
    params_cls=NeedleParams,
    build=build,
    data_files=(NEEDLES_FILE, HAYSTACK_DIR),
    version="1",
    user_files=_user_files,
    texts=_texts,
)

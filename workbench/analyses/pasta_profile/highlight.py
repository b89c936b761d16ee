"""The highlighted spans PASTA steers to: the gold span of a prompt, or the model's own pick.

Prompts come in *batches*: equally long prompts of one task in one tensor (what the batched
sweep and decoding need). Per prompt, ``[start, stop)`` token ranges:

- ``gold``: a needle prompt's ``needle_span``; a knowledge-conflict prompt's context, from its
  first token after BOS to ``question_start`` (the task's meta: where the question's own
  tokens begin, so the context sentence or paragraph and the newline before the question;
  where the meta has no ``question_start`` the span ends after the last context answer token).
- ``region``: where a key sentence may be picked from: the context only. Knowledge conflict:
  the gold span. Needle: after the template's head (BOS, chat prefix, ``<book>``) and before
  its tail (``</book>``, the question, the generation prompt), the pieces the needle task
  concatenates (checked against the prompt; the whole prompt after BOS where they do not match).
- ``auto`` (AutoPASTA, simplified): AutoPASTA prompts the model to name the key sentence, then
  steers to it. Here the choice stays inside the model: the region is split into sentences
  (a sentence ends after a token whose text ends in ``.``, ``!`` or ``?`` or holds a newline;
  whitespace-only pieces join the sentence before), and the sentence with the largest
  attention mass from the final query position, averaged over every head of the upper half
  of the layers (``l >= n_layers // 2``) of the unsteered model, is picked; position 0 (the
  attention sink) counts for no sentence. Cost: one forward per prompt.

Agreement of auto with gold, per prompt: ``overlap = |auto & gold| / |auto|``; it agrees when
``overlap >= 0.5``; ``exact`` when the spans are equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from workbench.hooks import hook_name, hooked
from workbench.tasks import needle as needle_task
from workbench.tasks._common import with_bos

if TYPE_CHECKING:
    from workbench.models.codec import TextCodec
    from workbench.models.loading import LoadedModel
    from workbench.types import NeedleSample, PromptSet

Span = tuple[int, int]
ENDS = (".", "!", "?")


@dataclass
class Batch:
    """Equally long prompts of one task: ``tokens [n, T]``, gold spans and pick regions; for
    needles the samples and the answers' first tokens, for conflicts ``o_c`` and ``o_m``."""

    task: str  # "needle" | "conflict"
    tokens: Tensor
    gold: list[Span]
    region: list[Span]
    first: Tensor | None = None  # needle: answer[0] per prompt
    o_c: Tensor | None = None
    o_m: Tensor | None = None
    samples: list[NeedleSample] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    fallbacks: int = 0  # prompts whose gold span or region fell back (module docstring)

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


def _needle_pieces(
    codec: TextCodec, sample: NeedleSample, chat: str
) -> tuple[list[int], list[int]]:
    """The template head and tail the needle task wraps this sample's haystack in."""
    pieces = needle_task._chat_pieces(codec, chat)
    question = needle_task.QUESTION.format(question=sample.question)
    bos = with_bos(codec, [])
    if pieces is None:
        return bos, codec.encode("\n" + question)
    head = pieces[0] + codec.encode(needle_task.BOOK[0])
    if head[: len(bos)] != bos:
        head = bos + head
    return head, codec.encode(needle_task.BOOK[1] + question) + pieces[1]


def needle_batches(codec: TextCodec, samples: Sequence[NeedleSample], chat: str) -> list[Batch]:
    """Needle samples grouped by length, shortest first."""
    by_len: dict[int, list[NeedleSample]] = {}
    for s in samples:
        by_len.setdefault(int(s.context.shape[0]), []).append(s)
    out = []
    for n, group in sorted(by_len.items()):
        regions, fallbacks = [], 0
        for s in group:
            ids = s.context.tolist()
            head, tail = _needle_pieces(codec, s, chat)
            ok = (
                ids[: len(head)] == head
                and ids[n - len(tail) :] == tail
                and len(head) < n - len(tail)
            )
            start = int(codec.prepend_bos)
            regions.append((len(head), n - len(tail)) if ok else (start, n))
            fallbacks += not ok
        out.append(
            Batch(
                "needle",
                torch.stack([s.context for s in group]),
                [(int(s.needle_span[0]), int(s.needle_span[1])) for s in group],
                regions,
                first=torch.stack([s.answer[0] for s in group]),
                samples=group,
                fallbacks=fallbacks,
            )
        )
    return out


def conflict_batch(group: PromptSet) -> Batch:
    """One knowledge-conflict length group (clean = the conflict prompt)."""
    start = int(group.prepend_bos)
    spans, fallbacks = [], 0
    for q, pos in zip(
        group.meta["question_start"], group.meta["context_answer_positions"], strict=True
    ):
        if q is None:
            q, fallbacks = max(pos) + 1, fallbacks + 1
        spans.append((start, int(q)))
    return Batch(
        "conflict",
        group.clean,
        spans,
        list(spans),
        o_c=group.incorrect,
        o_m=group.correct,
        formats=list(group.meta.get("formats", [])),
        fallbacks=fallbacks,
    )


def sentences(codec: TextCodec, ids: Sequence[int], region: Span) -> list[Span]:
    """The region split into sentences (module docstring)."""
    a, b = region
    texts = [codec.decode([int(t)]) for t in ids[a:b]]
    out: list[Span] = []
    start = a
    for i, t in enumerate(texts):
        if t.rstrip(" ").endswith(ENDS) or "\n" in t:
            out.append((start, a + i + 1))
            start = a + i + 1
    if start < b:
        out.append((start, b))
    merged: list[Span] = []
    for s in out:
        blank = not "".join(texts[s[0] - a : s[1] - a]).strip()
        if blank and merged:
            merged[-1] = (merged[-1][0], s[1])
        elif merged and not "".join(texts[merged[-1][0] - a : merged[-1][1] - a]).strip():
            merged[-1] = (merged[-1][0], s[1])  # a blank first piece joins the next
        else:
            merged.append(s)
    return merged


@torch.no_grad()
def final_attention(model: LoadedModel, tokens: Tensor) -> Tensor:
    """``[n, T]``: attention of the final query, mean over the heads of layers
    ``n_layers // 2 ..`` (unsteered)."""
    layers = list(range(model.n_layers // 2, model.n_layers))
    rows: list[Tensor] = []

    def hook(pattern: Tensor, hook: Any) -> None:
        rows.append(pattern[:, :, -1, :].float().mean(1))

    with hooked(model.bridge, [(hook_name("pattern", la), hook) for la in layers]):
        model.bridge(tokens, prepend_bos=False, return_type="logits", logits_to_keep=1)
    return torch.stack(rows).mean(0).cpu()


def auto_spans(model: LoadedModel, batch: Batch) -> list[Span]:
    """Per prompt, the sentence of its region with the most attention mass (module docstring)."""
    att = final_attention(model, batch.tokens.to(model.device))
    att[:, 0] = 0.0
    out = []
    for r in range(batch.n):
        cands = sentences(model.codec, batch.tokens[r].tolist(), batch.region[r])
        cands = cands or [batch.gold[r]]
        mass = [float(att[r, a:b].sum()) for a, b in cands]
        out.append(cands[max(range(len(cands)), key=lambda i: (mass[i], -i))])
    return out


def agreement(auto: Sequence[Span], gold: Sequence[Span]) -> dict[str, float]:
    """Share of prompts where auto agrees with gold, mean overlap, share of exact matches."""
    over = []
    for (a, b), (c, d) in zip(auto, gold, strict=True):
        over.append(max(0, min(b, d) - max(a, c)) / max(1, b - a))
    n = max(1, len(over))
    return {
        "agree": sum(o >= 0.5 for o in over) / n,
        "overlap": sum(over) / n,
        "exact": sum(x == y for x, y in zip(auto, gold, strict=True)) / n,
        "n": len(over),
    }

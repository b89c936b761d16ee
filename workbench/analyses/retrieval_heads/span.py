"""The needle span a retrieval score counts copy hits in (torch-free).

Wu et al.'s code scores hits inside the span of ``real_needle`` (the answer part of the needle,
e.g. "eat a sandwich and sit in Dolores Park on a sunny day"), each hit worth
``1 / len(span)``. Three ways to get that span, chosen by ``RetrievalParams.span``:

- ``"real_needle"`` (default): the tokens of the inserted needle whose characters overlap the
  characters of ``real_needle`` inside the needle text. Character offsets come from decoding
  the needle's own tokens as they stand in the built prompt (token ``i`` covers the characters
  its decoded prefix adds), so the span is exact on any tokenizer, leading spaces included.
  This is the span the authors' code means; it departs from their code only in how it is found.
- ``"paper_search"``: the authors' ``find_needle_idx(real_needle)``: ``real_needle`` tokenised
  alone (no leading space, no special tokens), then the first context window of that many
  tokens whose token *set* overlaps the answer's token set by more than 0.9. On byte-level BPE
  the standalone first word (``"eat"``) differs from the in-context one (``" eat"``) and a
  repeated token shrinks the set, so the search can miss; a miss is the span ``(-1, -1)``,
  which, as in the authors' code, scores every head 0 on that sample.
- ``"needle"``: the whole inserted needle sentence (what this workbench used before).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from workbench.analyses.retrieval_heads import SPANS
from workbench.errors import WorkbenchError

NOT_FOUND = (-1, -1)


def char_ends(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[int]:
    """``ends[i]`` = number of characters of ``decode(ids[: i + 1])``: token ``i`` covers the
    characters ``[ends[i - 1], ends[i])`` of ``decode(ids)``."""
    return [len(decode(list(ids[: i + 1]))) for i in range(len(ids))]


def locate_exact(
    decode: Callable[[list[int]], str], needle_ids: Sequence[int], real_needle: str
) -> tuple[int, int]:
    """Token range ``[a, b)`` of ``needle_ids`` (relative) whose characters overlap
    ``real_needle`` inside ``decode(needle_ids)``; ``NOT_FOUND`` when the text is not there."""
    text = decode(list(needle_ids))
    target = real_needle.strip()
    c0 = text.find(target)
    if c0 < 0 or not target:
        return NOT_FOUND
    c1 = c0 + len(target)
    ends = char_ends(decode, needle_ids)
    starts = [0, *ends[:-1]]
    inside = [i for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if s < c1 and e > c0]
    return (inside[0], inside[-1] + 1) if inside else NOT_FOUND


def paper_search(
    encode: Callable[[str], list[int]], prompt_ids: Sequence[int], real_needle: str
) -> tuple[int, int]:
    """The authors' ``find_needle_idx``: first ``i`` with
    ``|set(prompt[i : i + m]) & set(ans)| / |set(ans)| > 0.9``, ``ans = encode(real_needle)``,
    ``m = len(ans)``; ``NOT_FOUND`` if none."""
    ans = encode(real_needle)
    want = set(ans)
    if not want:
        return NOT_FOUND
    m = len(ans)
    for i in range(len(prompt_ids)):
        if len(set(prompt_ids[i : i + m]) & want) / len(want) > 0.9:
            return i, i + m
    return NOT_FOUND


def scored_span(
    decode: Callable[[list[int]], str],
    encode: Callable[[str], list[int]],
    context: Sequence[int],
    needle_span: tuple[int, int],
    real_needle: str,
    how: str,
) -> tuple[int, int]:
    """The span ``[start, end)`` in ``context`` that hits are counted in (module doc)."""
    start, end = needle_span
    if how == "needle":
        return needle_span
    if how == "paper_search":
        return paper_search(encode, context, real_needle)
    if how != "real_needle":
        raise WorkbenchError(f"unknown span '{how}'", f"use one of {', '.join(SPANS)}")
    a, b = locate_exact(decode, context[start:end], real_needle)
    if (a, b) == NOT_FOUND:
        raise WorkbenchError(
            f"real_needle {real_needle[:40]!r} is not part of its needle's text",
            "make real_needle a substring of needle, or use span = 'needle'",
        )
    return start + a, start + b

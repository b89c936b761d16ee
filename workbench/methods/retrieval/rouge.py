"""ROUGE-1 recall, the needle-retrieval correctness test of Wu et al. 2024 (torch-free).

The reference scores an answer with ``rouge_score``'s ``rouge1`` recall of the answer against
``real_needle``. Here, with the same default tokenisation (lowercase, every run of characters
other than ``a-z0-9`` is a separator, no stemming):

    recall(reference, answer) = sum_w min(count_ref(w), count_answer(w)) / #reference tokens

(0 when the reference has no tokens).
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercased word tokens: maximal runs of ``a-z0-9`` (``rouge_score``'s default)."""
    return _WORD.findall(text.lower())


def rouge1_recall(reference: str, answer: str) -> float:
    """Share of the reference's word tokens found in the answer (multiset overlap, clipped)."""
    ref = Counter(rouge_tokens(reference))
    total = sum(ref.values())
    if total == 0:
        return 0.0
    got = Counter(rouge_tokens(answer))
    return sum(min(n, got[w]) for w, n in ref.items()) / total

"""ROUGE-1 recall, the needle-retrieval correctness test of Wu et al. 2024 (torch-free).

The authors' code scores an answer with the ``rouge-score`` package, exactly as here::

    rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(real_needle, answer)
        ["rouge1"].recall

Its tokenisation: lowercase, every run of characters other than ``a-z0-9`` is a separator,
and words longer than 3 characters are reduced by the Porter stemmer ("sandwiches" and
"sandwich" are one token, "sitting" is "sit"). Then

    recall(reference, answer) = sum_w min(count_ref(w), count_answer(w)) / #reference tokens

(0 when the reference has no tokens). A sample counts when this is > 0.5 (the authors:
``recall * 100 > 50``).
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge_tokens(text: str) -> list[str]:
    """The words ``rouge-score`` compares: lowercased ``a-z0-9`` runs, Porter-stemmed."""
    return list(_scorer()._tokenizer.tokenize(text))


def rouge1_recall(reference: str, answer: str) -> float:
    """Share of the reference's (stemmed) word tokens found in the answer, clipped counts."""
    return float(_scorer().score(reference, answer)["rouge1"].recall)

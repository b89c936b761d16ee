"""Heads by name and by chance: ``L<layer>H<head>`` parsing, every head of a grid, and the
random head sets every "against random heads" control draws (torch-free)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from workbench.errors import WorkbenchError
from workbench.types import Head

__all__ = ["every_head", "parse_heads", "random_head_sets"]


def every_head(n_layers: int, n_heads: int) -> list[Head]:
    """All heads of an ``n_layers x n_heads`` grid in (layer, head) order."""
    return [Head(la, h) for la in range(n_layers) for h in range(n_heads)]


_HEAD = re.compile(r"L(\d+)H(\d+)", re.IGNORECASE)


def parse_heads(heads: str | Iterable[str], where: str = "heads") -> list[Head]:
    """Heads written ``L<layer>H<head>`` (any case), in the order given: one string with the
    heads separated by commas or spaces (``"L3H4, L20H1"``), or a list of such names (spaces
    inside a name are ignored: ``"L3 H4"``). Anything else is a one-line error naming
    ``where``."""
    names = re.split(r"[,\s]+", heads) if isinstance(heads, str) else list(heads)
    out = []
    for name in names:
        text = re.sub(r"\s+", "", str(name))
        if isinstance(heads, str) and not text:
            continue
        m = _HEAD.fullmatch(text)
        if m is None:
            raise WorkbenchError(
                f"{where}: {name!r} is not a head of the form L<layer>H<head>",
                "write heads as L3H4, L20H1",
            )
        out.append(Head(int(m.group(1)), int(m.group(2))))
    return out


def random_head_sets(
    scope: Sequence[Head],
    k: int,
    n: int,
    seed: int | Sequence[int],
    *,
    like: Sequence[Head] | None = None,
) -> list[list[Head]]:
    """``n`` random sets of ``k`` distinct heads of ``scope`` (the controls of a head choice).

    - ``seed`` an int: one generator ``rng = default_rng(seed)`` draws the sets in turn, each
      ``sorted(scope[i] for i in rng.choice(len(scope), k, replace=False))`` (uniform); with
      ``like``, each set has as many heads in each layer as ``like`` has (layer-matched, ``k`` is
      then ``len(like)``): per layer of ``like`` in order of appearance, ``c`` heads drawn the
      same way from the scope's heads of that layer; sorted.
    - ``seed`` a sequence (``n`` is its length): set ``i`` is the first ``k`` heads of
      ``scope`` in the order ``default_rng(seed[i]).permutation(len(scope))``, so for one seed
      the set of ``k`` heads is a prefix of the set of ``k' > k`` (nested across sizes).
    """
    if not isinstance(seed, int):
        return [
            [scope[int(i)] for i in np.random.default_rng(s).permutation(len(scope))[:k]]
            for s in seed
        ]
    rng = np.random.default_rng(seed)
    if like is None:
        return [
            sorted(scope[int(i)] for i in rng.choice(len(scope), size=k, replace=False))
            for _ in range(n)
        ]
    counts: dict[int, int] = {}
    for h in like:
        counts[h.layer] = counts.get(h.layer, 0) + 1
    by_layer = {la: [h for h in scope if h.layer == la] for la in counts}
    out = []
    for _ in range(n):
        picked = [
            by_layer[la][int(i)]
            for la, c in counts.items()
            for i in rng.choice(len(by_layer[la]), size=c, replace=False)
        ]
        out.append(sorted(picked))
    return out

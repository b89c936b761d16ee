"""Head names and random head sets. The one random-head-set helper draws exactly what each
analysis drew before it existed (the four earlier copies are kept here as the reference), so
stored results stay reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.heads import every_head, parse_heads, random_head_sets
from workbench.types import Head

L, H = 6, 9
EVERY = [Head(la, h) for la in range(L) for h in range(H)]


def old_pasta(k, n, seed):  # pasta_profile/compute.py: _random_sets
    rng = np.random.default_rng(seed)
    picks = [sorted(rng.choice(L * H, size=k, replace=False).tolist()) for _ in range(n)]
    return [[Head(i // H, i % H) for i in p] for p in picks]


def old_act(scope, k, n, seed):  # act_search/compute.py: random_sets
    rng = np.random.default_rng(seed)
    return [
        sorted(scope[int(i)] for i in rng.choice(len(scope), size=k, replace=False))
        for _ in range(n)
    ]


def old_intervention(chosen, n, pool, seed):  # intervention_eval/compute.py: random_sets
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if pool == "uniform":
            pick = rng.choice(len(EVERY), size=len(chosen), replace=False)
            out.append(sorted(EVERY[i] for i in pick))
        else:
            counts: dict[int, int] = {}
            for h in chosen:
                counts[h.layer] = counts.get(h.layer, 0) + 1
            s = [Head(la, int(h)) for la, c in counts.items()
                 for h in rng.choice(H, size=c, replace=False)]  # fmt: skip
            out.append(sorted(s))
    return out


def old_causal(k, seeds):  # causal_validation/compute.py: random_sets
    out = []
    for seed in seeds:
        flat = np.random.default_rng(seed).permutation(L * H)[:k]
        out.append([Head(int(i // H), int(i % H)) for i in flat])
    return out


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_uniform_sets_equal_the_earlier_copies(seed, k):
    assert random_head_sets(EVERY, k, 5, seed) == old_pasta(k, 5, seed)
    scope = EVERY[H:]  # a restricted scope (act_search's top layers)
    assert random_head_sets(scope, k, 5, seed) == old_act(scope, k, 5, seed)
    chosen = EVERY[:k]
    assert random_head_sets(EVERY, k, 5, seed) == old_intervention(chosen, 5, "uniform", seed)


@pytest.mark.parametrize("seed", [0, 3])
def test_layer_matched_sets_equal_the_earlier_copy(seed):
    chosen = [Head(4, 1), Head(0, 2), Head(4, 7), Head(2, 0)]  # layers out of order
    got = random_head_sets(EVERY, len(chosen), 6, seed, like=chosen)
    assert got == old_intervention(chosen, 6, "layer_matched", seed)
    assert all(sorted(h.layer for h in s) == [0, 2, 4, 4] for s in got)


def test_nested_sets_equal_the_earlier_copy_and_nest():
    seeds = [0, 1, 2]
    for k in (1, 4, 12):
        assert random_head_sets(EVERY, k, len(seeds), seeds) == old_causal(k, seeds)
    small, big = (random_head_sets(EVERY, k, 3, seeds) for k in (4, 12))
    assert all(b[:4] == s for s, b in zip(small, big, strict=True))


def test_sets_are_distinct_heads_of_the_scope():
    for s in random_head_sets(EVERY[:20], 6, 50, 5):
        assert len(set(s)) == 6 and set(s) <= set(EVERY[:20])


def test_every_head_is_in_layer_head_order():
    assert every_head(2, 3) == [
        Head(0, 0),
        Head(0, 1),
        Head(0, 2),
        Head(1, 0),
        Head(1, 1),
        Head(1, 2),
    ]
    assert every_head(L, H) == EVERY


def test_parse_heads_from_a_string_or_a_list_in_order():
    assert parse_heads("L3H4, l20h1  L3H4") == [Head(3, 4), Head(20, 1), Head(3, 4)]
    assert parse_heads(["L3 H4", "l0h2"]) == [Head(3, 4), Head(0, 2)]
    assert parse_heads("") == [] and parse_heads([]) == []


@pytest.mark.parametrize("bad", ["L3", "H4", "L3H", "3H4", "L3H4x", "L-1H2"])
def test_parse_heads_refuses_anything_else_in_one_line(bad):
    with pytest.raises(
        WorkbenchError, match=r"pasta_profile: .* not a head of the form L<layer>H<head>"
    ):
        parse_heads([bad], "pasta_profile")
    with pytest.raises(WorkbenchError, match="L<layer>H<head>"):
        parse_heads(f"L0H0, {bad}")

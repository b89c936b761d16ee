"""Overlap statistics against hand-computed cases and the random baseline."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from workbench.circuits.overlap import overlap, overlap_matrix
from workbench.errors import WorkbenchError
from workbench.stats import hypergeom_sf
from workbench.types import Circuit, Derivation, Head


def _circuit(heads, model="m", grid=(2, 5)):
    return Circuit.of(model, [Head(*h) for h in heads], Derivation("manual"), grid)


def test_hypergeometric_by_hand_and_by_enumeration():
    # N = 10, |A| = 3, |B| = 4, observed 2: P(X=2) = C(3,2) C(7,2) / C(10,4) = 63/210,
    # P(X=3) = C(3,3) C(7,1) / 210 = 7/210, so p = 70/210 = 1/3.
    assert hypergeom_sf(2, 10, 3, 4) == pytest.approx(1 / 3, abs=1e-15)
    a = {0, 1, 2}
    subsets = list(itertools.combinations(range(10), 4))
    assert len(subsets) == 210
    for obs in range(5):
        enum = sum(len(a & set(s)) >= obs for s in subsets) / len(subsets)
        assert hypergeom_sf(obs, 10, 3, 4) == pytest.approx(enum, abs=1e-12)
    assert hypergeom_sf(0, 10, 3, 4) == 1.0


def test_overlap_statistics_by_hand():
    a = _circuit([(0, 0), (0, 1), (1, 2)])
    b = _circuit([(0, 1), (1, 2), (1, 3), (1, 4)])
    sa = np.arange(10.0)
    sb = np.arange(10.0) ** 3  # same ranks
    r = overlap(a, b, scores_a=sa, scores_b=sb, n_permutations=20000, seed=1)
    assert (r.size_a, r.size_b, r.intersection, r.n_total_heads) == (3, 4, 2, 10)
    assert r.share_a == pytest.approx(2 / 3) and r.share_b == pytest.approx(2 / 4)
    assert r.jaccard == pytest.approx(2 / 5) and r.overlap_coefficient == pytest.approx(2 / 3)
    assert r.expected_intersection == pytest.approx(1.2)
    assert r.spearman == pytest.approx(1.0) and r.spearman_n == 10
    assert r.p_hypergeometric == pytest.approx(1 / 3)
    assert abs(r.p_permutation - 1 / 3) < 0.015  # 3.6 standard errors at 20000 draws
    assert r.shared == (Head(0, 1), Head(1, 2))
    rev = overlap(a, b, scores_a=sa, scores_b=-sa, n_permutations=0)
    assert rev.spearman == pytest.approx(-1.0) and math.isnan(rev.p_permutation)
    nan_scores = sa.copy()
    nan_scores[:3] = np.nan  # not scored: left out of the rank correlation
    assert overlap(a, b, scores_a=nan_scores, scores_b=sb, n_permutations=0).spearman_n == 7
    t = r.table
    assert len(t) == 1 and t.loc[0, "shared"] == "L0H1, L1H2"
    fig = r.figure()
    assert list(fig.data[0].y) == [1, 2, 2, 1.2]


def test_permutation_p_matches_exact_on_a_larger_case():
    rng = np.random.default_rng(3)
    heads = [Head(la, h) for la in range(4) for h in range(5)]
    idx = rng.permutation(20)
    a = _circuit([(heads[i].layer, heads[i].head) for i in idx[:5]], grid=(4, 5))
    b_idx = list(idx[2:8])  # shares 3 heads with a
    b = _circuit([(heads[i].layer, heads[i].head) for i in b_idx], grid=(4, 5))
    r = overlap(a, b, n_permutations=20000, seed=0)
    assert r.intersection == 3
    exact = sum(math.comb(5, x) * math.comb(15, 6 - x) for x in range(3, 6)) / math.comb(20, 6)
    assert r.p_hypergeometric == pytest.approx(exact, rel=1e-12)
    assert abs(r.p_permutation - exact) < 0.01


def test_random_circuits_give_spread_p_values():
    """Under the null, p-values of random pairs follow the exact (discrete) null distribution:
    a Kolmogorov-Smirnov distance over 200 pairs, and neither all tiny nor all 1."""
    n_total, size = 270, 54
    rng = np.random.default_rng(7)
    grid = (30, 9)
    ps = []
    for _ in range(200):
        ia = rng.choice(n_total, size, replace=False)
        ib = rng.choice(n_total, size, replace=False)
        a = _circuit([(i // 9, i % 9) for i in ia], grid=grid)
        b = _circuit([(i // 9, i % 9) for i in ib], grid=grid)
        ps.append(overlap(a, b, n_permutations=0).p_hypergeometric)
    ps_arr = np.array(ps)
    # the exact null CDF of the p-value: P(p <= t) = sum of P(X = x) over x with sf(x) <= t
    pmf = {
        x: math.comb(size, x) * math.comb(n_total - size, size - x) / math.comb(n_total, size)
        for x in range(size + 1)
    }
    sf = {x: hypergeom_sf(x, n_total, size, size) for x in pmf}
    grid_t = np.unique(ps_arr)
    emp = np.array([(ps_arr <= t).mean() for t in grid_t])
    true = np.array([sum(p for x, p in pmf.items() if sf[x] <= t + 1e-12) for t in grid_t])
    assert np.max(np.abs(emp - true)) < 0.115  # KS critical value at 1% for n = 200
    assert len(grid_t) >= 8
    assert 0.01 < (ps_arr < 0.1).mean() < 0.2
    assert (ps_arr > 0.5).mean() > 0.3 and (ps_arr == 1).mean() < 0.2


def test_bad_input_is_one_line_error():
    a = _circuit([(0, 0)])
    with pytest.raises(WorkbenchError, match="different models"):
        overlap(a, _circuit([(0, 0)], model="other"))
    cross = overlap(a, _circuit([(0, 0)], model="other"), allow_cross_model=True, n_permutations=0)
    assert cross.intersection == 1
    with pytest.raises(WorkbenchError, match="different head grids"):
        overlap(a, _circuit([(0, 0)], model="other", grid=(3, 5)), allow_cross_model=True)
    with pytest.raises(WorkbenchError, match="empty"):
        overlap(a, _circuit([]))
    with pytest.raises(WorkbenchError, match="more than the model's 3"):
        overlap({Head(0, 0)}, {Head(0, 1), Head(0, 2), Head(0, 3), Head(0, 4)}, n_total_heads=3)
    with pytest.raises(WorkbenchError, match="n_total_heads"):
        overlap({Head(0, 0)}, {Head(0, 1)})
    for err in (WorkbenchError("x", "y"),):
        assert "\n" not in str(err)


def test_overlap_matrix():
    cs = {
        "a": _circuit([(0, 0), (0, 1)]),
        "b": _circuit([(0, 1), (0, 2), (0, 3), (0, 4)]),
        "c": _circuit([(1, 0)]),
    }
    m = overlap_matrix(cs, n_permutations=100)
    assert len(m.table) == 3
    share = m.matrix("share_a")
    assert share.loc["a", "b"] == pytest.approx(1 / 2)  # half of a lies in b
    assert share.loc["b", "a"] == pytest.approx(1 / 4)  # a quarter of b lies in a
    assert m.matrix("jaccard").loc["a", "c"] == 0.0
    assert m.figure("jaccard").data[0].z.shape == (3, 3)


SPEC = """
title = "t"
[defaults]
models = ["tiny-llama"]
[[analysis]]
name = "direct_logit_attribution"
tasks = [{ name = "ioi", n_prompts = 2 }]
[[analysis]]
name = "head_detectors"
tasks = [{ name = "induction", seq_len = 8, n_prompts = 2 }]
[overlap]
rule = "top_k"
k = 3
absolute = true
n_permutations = 500
circuits = { ioi = "direct_logit_attribution@ioi", ind = "head_detectors.induction@induction" }
"""


def test_overlap_command_and_circuit_command(tmp_path, monkeypatch, capsys):
    from workbench.circuits import load_circuit
    from workbench.cli import main
    from workbench.store import ResultStore

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    assert main(["overlap", str(spec), "--no-progress", "--html", str(tmp_path / "o.html")]) == 0
    out = capsys.readouterr().out
    assert "ioi [3 heads" in out and "ind [3 heads" in out and "p_hypergeometric" in out
    stored_as = [
        line.split("stored as ")[1].split("]")[0]
        for line in out.splitlines()
        if "stored as" in line
    ]
    assert len(stored_as) == 2
    c = load_circuit(ResultStore(), stored_as[0])
    assert len(c.heads) == 3 and c.derivation.rule == "top_k" and c.model == "tiny-llama"
    assert (tmp_path / "o.html").stat().st_size > 1000
    src = c.derivation.source_run
    assert main(["circuit", src, "--rule", "top_k", "--k", "2", "--absolute", "--save"]) == 0
    assert "stored as run" in capsys.readouterr().out
    assert main(["circuit", src, "--k", "9"]) == 2
    assert "k = 9 is larger than the number of heads scored (8)" in capsys.readouterr().err
    spec.write_text(SPEC.replace('ind = "head_detectors', 'ind = "nope'))
    assert main(["overlap", str(spec), "--no-progress"]) == 2
    assert "matches 0 parts" in capsys.readouterr().err

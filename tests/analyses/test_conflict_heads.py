"""conflict_heads (PH3 + JUICE's sign consistency): the scores are what they claim against
plain forwards, roles follow the consistency rule, the pruning plan's k and percentile follow
their formulas, and bad input is refused with nothing stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.forward.interventions import ablate_heads
from workbench.metrics import logit_diff
from workbench.runner import run_analysis
from workbench.stats import random_rank
from workbench.tasks import build_task
from workbench.types import Head, PromptGroups

PARAMS = {"require_known": False, "n_random": 4, "k_grid": [1, 2, 3]}


@pytest.fixture(scope="module")
def result(load, tmp_path_factory):
    from workbench.store import ResultStore

    model = load("tiny-llama")
    store = ResultStore(tmp_path_factory.mktemp("store"))
    return model, run_analysis("conflict_heads", model, "knowledge_conflict", params=PARAMS,
                               store=store)  # fmt: skip


def _select_prompts(model):
    built = build_task("knowledge_conflict", model.codec, {})
    groups = built.groups if isinstance(built, PromptGroups) else (built,)
    return [g for g in groups if "select" in g.meta["record_splits"]]


def test_scores_match_plain_forwards(load):
    """ablation = LD - LD(zeroed) and path = LD - LD(direct path from the agreeing context) per
    prompt, against ablate_heads forwards and the two-pass path patching; DLA heads + the rest
    sum to LD (checked by DLA's own tests), so only its shape and sign convention here."""
    from workbench.analyses.conflict_heads import ConflictHeadsParams
    from workbench.analyses.conflict_heads.compute import _scores
    from workbench.analyses.path_patching.compute import path_patch_sender, run_caches

    model = load("tiny-llama")
    ps = _select_prompts(model)[0]
    out = _scores(model, ps, ConflictHeadsParams())
    c, w = ps.correct, ps.incorrect
    with torch.no_grad():
        ld0 = logit_diff(model.bridge(ps.clean, prepend_bos=False)[:, -1], c, w)
    (source, _), (base, _) = run_caches(model, ps.corrupt), run_caches(model, ps.clean)
    for head in (Head(0, 1), Head(1, 3)):
        with torch.no_grad(), ablate_heads(model, [head]):
            ld = logit_diff(model.bridge(ps.clean, prepend_bos=False)[:, -1], c, w)
        got = torch.as_tensor(out["ablation"][:, head.layer, head.head], dtype=torch.float32)
        torch.testing.assert_close(got, ld0 - ld, atol=1e-4, rtol=1e-4)
        patched = path_patch_sender(model, ps.clean, head, [], source, base)
        want = ld0 - logit_diff(patched, c, w)
        got = torch.as_tensor(out["path"][:, head.layer, head.head], dtype=torch.float32)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert out["dla"].shape == (ps.n, model.n_layers, model.n_heads)


def test_roles_follow_sign_consistency(result):
    _, r = result
    by = r.tables["by_format"]
    heads = r.tables["heads"]
    piv = by.pivot_table(index=["layer", "head"], columns="format", values="path")
    consistent = (np.sign(piv["sentence"]) == np.sign(piv["paragraph"])) & (piv["sentence"] != 0)
    scores = heads.pivot_table(index=["layer", "head"], columns="metric", values="value")
    assert ((scores["memory_score"] > 0) <= consistent).all()
    assert ((scores["context_score"] > 0) <= consistent).all()
    assert ((scores["mixed_score"] > 0) <= ~consistent).all()
    assert r.info["n_consistent"] == int(consistent.sum())


def test_pruning_k_and_percentile_follow_their_formulas(result):
    _, r = result
    grid, test, summary = (r.tables[k] for k in ("pruning_k", "pruning_test", "summary"))
    for _, row in summary.iterrows():
        if row["k"] == 0:
            continue
        g = grid[grid["favour"] == row["favour"]]
        col = f"{row['favour']}_rate"
        best = g[col].max()
        assert row["k"] == g[g[col] == best]["k"].min()  # the smallest k with the best rate
        t = test[test["favour"] == row["favour"]]
        plan = float(t[t["set"] == "plan"][col].iloc[0])
        rand = t[t["set"].str.startswith("random_")][col].to_numpy()
        assert len(rand) == PARAMS["n_random"]
        pct, p = random_rank(plan, rand)
        assert row["percentile"] == pytest.approx(pct) and row["p_value"] == pytest.approx(p)
        assert len(row["heads"].split(", ")) == row["k"]


def test_bad_input_is_refused_and_nothing_stored(load, store):
    model = load("tiny-llama")
    for bad, match in (({"k_grid": [0, 2]}, "k_grid"), ({"n_random": 0}, "n_random")):
        with pytest.raises(WorkbenchError, match=match):
            run_analysis("conflict_heads", model, "knowledge_conflict",
                         params={**PARAMS, **bad}, store=store)  # fmt: skip
    with pytest.raises(WorkbenchError, match="questions"):
        run_analysis("conflict_heads", model, "ioi", params=PARAMS, store=store)
    with pytest.raises(WorkbenchError, match="both splits"):  # a tiny model knows no facts
        run_analysis("conflict_heads", model, "knowledge_conflict", store=store)
    assert len(store.list_runs()) == 0

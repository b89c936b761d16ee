"""Prompts of different token lengths run grouped by length into one result (custom pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.stats import pooled

ROWS = [
    ("When Mary and John went to the store , John gave a drink to",
     "When Mary and John went to the store , Alice gave a drink to", " Mary", " John"),
    ("When Anna and Paul went to the park , Paul gave a ring to",
     "When Anna and Paul went to the park , Sarah gave a ring to", " Anna", " Paul"),
    ("When Mary and John went to the store , John gave to",
     "When Mary and John went to the store , Alice gave to", " Mary", " John"),
    ("When Anna and Paul went to the park , Paul gave to",
     "When Anna and Paul went to the park , Sarah gave to", " Anna", " Paul"),
    ("Then Anna and Paul went to the park , Sarah gave to",
     "Then Anna and Paul went to the park , Alice gave to", " Anna", " Paul"),
]  # fmt: skip


def _file(path, rows):
    keys = ("clean", "corrupt", "correct", "incorrect")
    path.write_text("".join(json.dumps(dict(zip(keys, r, strict=True))) + "\n" for r in rows))
    return str(path)


def test_pooled_equals_the_statistics_over_all_samples():
    from workbench.stats import mean_stderr

    rng = np.random.default_rng(0)
    groups = [rng.normal(i, 1 + i, size=(n, 3, 2)) for i, n in enumerate((1, 4, 7))]
    stats = [mean_stderr(g) for g in groups]
    mean, se = pooled([m for m, _ in stats], [s for _, s in stats], [len(g) for g in groups])
    want_mean, want_se = mean_stderr(np.concatenate(groups))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(se, want_se, rtol=1e-12)


@pytest.mark.parametrize(
    ("analysis", "params"),
    [("activation_patching", {"component": "z"}), ("direct_logit_attribution", {})],
)
def test_custom_pairs_of_two_lengths_are_one_result(load, store, tmp_path, analysis, params):
    from workbench.runner import run_analysis

    model = load("tiny-llama")
    mixed = run_analysis(
        analysis, model, "custom", params=params,
        task_params={"path": _file(tmp_path / "mixed.jsonl", ROWS)}, store=store,
    )  # fmt: skip
    parts = [
        run_analysis(
            analysis,
            model,
            "custom",
            params=params,
            task_params={"path": _file(tmp_path / f"{i}.jsonl", rows)},
            store=store,
        )
        for i, rows in enumerate((ROWS[:2], ROWS[2:]))
    ]
    groups = mixed.manifest["extra"]["groups"]
    assert [(g["seq_len"], g["n_prompts"]) for g in groups] == [(12, 3), (14, 2)]
    assert mixed.manifest["extra"]["n_prompts"] == 5
    for metric in set(mixed.heads["metric"]):
        m = mixed.matrix(metric)
        a, b = parts[1].matrix(metric), parts[0].matrix(metric)  # 3 short rows, 2 long rows
        np.testing.assert_allclose(m, (3 * a + 2 * b) / 5, atol=1e-6)
        assert set(mixed.heads.loc[mixed.heads["metric"] == metric, "n"]) == {5}
    first_table = next(iter(t for t in mixed.tables if t != "heads"), None)
    if first_table is not None:
        assert set(mixed.tables[first_table]["seq_len"]) == {12, 14}

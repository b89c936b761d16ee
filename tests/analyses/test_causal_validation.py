"""Causal validation of a stored per-head score: top-k vs random k-head ablation, on the toy
induction model (prompt task: logit difference; synthetic needle copy task: recall)."""

from __future__ import annotations

import pytest
import torch

from workbench.analyses.causal_validation import ValidationParams, source_scores
from workbench.analyses.causal_validation.compute import causal_validation, validation_figure
from workbench.errors import WorkbenchError
from workbench.heads import random_head_sets
from workbench.runner import run_analysis
from workbench.types import Head, NeedleSample, NeedleSet

TASK = {"seq_len": 8, "n_prompts": 16, "seed": 3}


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh default store: causal validation reads ``$WORKBENCH_HOME/store``."""
    from workbench.store import ResultStore

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    return ResultStore()


@pytest.fixture()
def detectors_run(toy, home):
    return run_analysis("head_detectors", toy, "induction", task_params=TASK, store=home)


def _source(params: ValidationParams):
    from workbench.store import ResultStore

    return source_scores(params.source_run, params.source_metric, ResultStore())


def copy_needles(model, n: int = 4) -> NeedleSet:
    """``[bos] needle filler needle[0]`` -> answer ``needle[1:]`` (distinct toy symbols)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        perm = (torch.randperm(20, generator=gen) + 4).tolist()
        needle, filler = perm[:6], perm[6:]
        ids = [0, *filler[: 2 * i], *needle, *filler[2 * i : 10], needle[0]]
        span = (1 + 2 * i, 7 + 2 * i)
        text = model.codec.decode(needle[1:])
        needle_text = model.codec.decode(needle)
        out.append(NeedleSample(torch.tensor(ids), span, torch.tensor(needle[1:]),
                                needle_text, "", text, 20.0 * i, len(ids)))  # fmt: skip
    return NeedleSet("copy", tuple(out))


def random_sets(n_layers, n_heads, k, seeds):
    every = [Head(la, h) for la in range(n_layers) for h in range(n_heads)]
    return random_head_sets(every, k, len(seeds), seeds)


def test_random_sets_are_seeded_nested_and_distinct():
    a = random_sets(30, 9, 8, [0, 1])
    assert a == random_sets(30, 9, 8, [0, 1])
    assert a[0] != a[1] and all(len(set(s)) == 8 for s in a)
    assert random_sets(30, 9, 4, [0])[0] == a[0][:4]
    assert all(isinstance(h, Head) and 0 <= h.layer < 30 and 0 <= h.head < 9 for h in a[0])


def test_prompt_task_top_head_ablation_beats_random(toy, home, detectors_run):
    r = run_analysis(
        "causal_validation", toy, "induction", task_params=TASK, store=home,
        params={"source_run": detectors_run.run_id[:10], "source_metric": "induction",
                "ks": [1, 2], "n_random": 2},
    )  # fmt: skip
    t = r.tables["validation"]
    assert len(t) == 1 + 2 * (1 + 2)
    assert set(t["metric"]) == {"logit_diff"}
    assert sorted(set(t.loc[t["set"] == "random", "seed"])) == [0, 1]
    top1 = t[(t["k"] == 1) & (t["set"] == "top")].iloc[0]
    assert top1["heads"] == "L1H0"
    base = float(t.loc[t["set"] == "none", "value"].iloc[0])
    rand1 = t[(t["k"] == 1) & (t["set"] == "random")]["value"]
    assert top1["value"] < base - 2 and top1["value"] < rand1.min()
    assert r.manifest["extra"]["source_run"] == detectors_run.run_id
    fig = validation_figure(t)
    assert len(fig.data) == 2 and list(fig.data[0].x) == [1, 2]


def test_needle_recall_drops_when_the_top_head_is_ablated(toy, home, detectors_run):
    params = ValidationParams(source_run=detectors_run.run_id, source_metric="induction",
                              ks=(1,), n_random=2, max_new_tokens=5)  # fmt: skip
    out = causal_validation(toy, copy_needles(toy, n=3), params, source=_source(params))
    t = out.tables["validation"]
    assert set(t["metric"]) == {"needle_recall"}
    base = float(t.loc[t["set"] == "none", "value"].iloc[0])
    top = float(t.loc[t["set"] == "top", "value"].iloc[0])
    rand = t.loc[t["set"] == "random", "value"]
    assert base == 1.0 and top < 0.5 and top < rand.mean()
    summary = out.info["summary"][0]
    assert summary["k"] == 1 and summary["top"] == top


def test_mean_ablation_runs_on_prompts(toy, home, detectors_run):
    params = ValidationParams(source_run=detectors_run.run_id, source_metric="induction",
                              ks=(1,), n_random=1, ablation="mean")  # fmt: skip
    from workbench.tasks import build_task

    out = causal_validation(
        toy, build_task("induction", toy.codec, TASK), params, source=_source(params)
    )
    t = out.tables["validation"]
    assert float(t.loc[t["set"] == "top", "value"].iloc[0]) < float(
        t.loc[t["set"] == "none", "value"].iloc[0]
    )


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"source_run": "ffffffff"}, "no stored run id starts with"),
        ({"source_run": "not-hex"}, "is not a run id"),
        ({"source_run": ""}, "source_run is empty"),
        ({"source_metric": "nope"}, "has no metric 'nope'"),
        ({"ks": [9]}, "larger than the 8 heads"),
        ({"ks": [0]}, "ks must be whole numbers >= 1"),
    ],
)
def test_bad_source_gives_one_line_error_and_stores_nothing(
    toy, home, detectors_run, params, match
):
    before = len(home.list_runs())
    full = {"source_run": detectors_run.run_id, "source_metric": "induction", **params}
    with pytest.raises(WorkbenchError, match=match) as err:
        run_analysis("causal_validation", toy, "induction", task_params=TASK, params=full,
                     store=home)  # fmt: skip
    assert "\n" not in str(err.value)
    assert len(home.list_runs()) == before


def test_source_of_another_model_is_refused(load, toy, home):
    other = run_analysis("head_detectors", load("tiny-llama"), "induction",
                         task_params=TASK, store=home)  # fmt: skip
    before = len(home.list_runs())
    with pytest.raises(WorkbenchError, match="scores model tiny-llama"):
        run_analysis("causal_validation", toy, "induction", task_params=TASK, store=home,
                     params={"source_run": other.run_id, "ks": [1], "n_random": 1})  # fmt: skip
    assert len(home.list_runs()) == before


def test_source_is_read_from_the_store_the_runner_holds(toy, home, tmp_path):
    """The source run lives only in the caller's store, not in the default one: the runner
    reads it there (the registry entry's ``inputs``) and stores the validation there too."""
    from workbench.store import ResultStore

    other = ResultStore(tmp_path / "elsewhere")
    src = run_analysis("head_detectors", toy, "induction", task_params=TASK, store=other)
    assert home.list_runs().empty
    params = {"source_run": src.run_id, "source_metric": "induction", "ks": [1], "n_random": 1}
    out = run_analysis("causal_validation", toy, "induction", task_params=TASK, store=other,
                       params=params)  # fmt: skip
    assert out.manifest["extra"]["source_run"] == src.run_id
    assert home.list_runs().empty and len(other.list_runs()) == 2

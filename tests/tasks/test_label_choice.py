"""The label_choice task: prompts end right before a single-token label, the choices are the
sub-task's label set, splits are disjoint and seeded, demonstrations come from the select split
only, bad parameters are one-line errors."""

from __future__ import annotations

import pytest

from tests.tasks.helpers import codec_of, one_line_error
from workbench.errors import WorkbenchError
from workbench.tasks import build_task, recipe_hash
from workbench.tasks.label_choice import SUBTASKS, load_examples
from workbench.types import PromptGroups


def _rows(built):
    groups = built.groups if isinstance(built, PromptGroups) else (built,)
    for g in groups:
        for i in range(g.n):
            yield g, i


@pytest.mark.parametrize("bos", [False, True])
def test_prompts_choices_and_answers(tok, bos):
    codec = codec_of(tok, bos)
    built = build_task("label_choice", codec, {"split": "all"})
    assert isinstance(built, PromptGroups) and built.n == len(load_examples()) == 88
    assert [g.seq_len for g in built.groups] == sorted(g.seq_len for g in built.groups)
    for g, i in _rows(built):
        sub = g.meta["subtasks"][i]
        labels = SUBTASKS[sub][1]
        ids = [codec.single_token(" " + lab) for lab in labels]
        assert g.meta["choices"][i] == ids
        gold = g.meta["gold_index"][i]
        assert labels[gold] == g.meta["gold_labels"][i]
        assert int(g.correct[i]) == ids[gold]
        assert int(g.incorrect[i]) == ids[(gold + 1) % len(ids)]
        assert g.prompts[i].endswith(SUBTASKS[sub][0].split("{text}")[1])
        assert (g.clean[i] == g.corrupt[i]).all()
        assert tok.unk_token_id not in g.clean[i].tolist()
        assert (int(g.clean[i, 0]) == tok.bos_token_id) is bos
    assert built.meta["n_examples_by_split"] == {"select": 44, "test": 44}


def test_splits_demos_and_determinism(tok):
    codec = codec_of(tok, False)
    sel = build_task("label_choice", codec, {"split": "select"})
    test = build_task("label_choice", codec, {"split": "test"})
    assert sel.meta["params"]["split"] == "select"  # the default
    assert build_task("label_choice", codec).content_hash() == sel.content_hash()
    ids_sel, ids_test = set(sel.meta["record_ids"]), set(test.meta["record_ids"])
    assert not ids_sel & ids_test and len(ids_sel | ids_test) == 88
    for built in (sel, test):
        for rid, demos in zip(built.meta["record_ids"], built.meta["demo_ids"], strict=True):
            assert len(demos) == 2 and rid not in demos and set(demos) <= ids_sel
    # the two demos of a two-label sub-task show both labels
    by_id = {f"line {i + 1}": e for i, e in enumerate(load_examples())}
    for demos, sub in zip(sel.meta["demo_ids"], sel.meta["subtasks"], strict=True):
        if sub == "sentiment":
            assert {by_id[d].label for d in demos} == {"positive", "negative"}
    zero = build_task("label_choice", codec, {"shots": 0, "subtasks": ["topic"]})
    assert set(zero.meta["subtasks"]) == {"topic"} and zero.n == 16
    assert all(p.startswith("Headline:") and p.count("Topic:") == 1 for _, p in
               ((g, g.prompts[i]) for g, i in _rows(zero)))  # fmt: skip
    other = build_task("label_choice", codec, {"seed": 1})
    assert other.content_hash() != sel.content_hash()
    assert recipe_hash("label_choice") != recipe_hash("label_choice", {"seed": 1})


def test_bad_params(tok):
    codec = codec_of(tok, False)
    cases = [({"shots": -1}, "shots"), ({"test_fraction": 1.0}, "test_fraction"),
             ({"subtasks": ["poetry"]}, "sub-tasks"), ({"split": "dev"}, "split")]  # fmt: skip
    for bad, part in cases:
        with pytest.raises(WorkbenchError) as e:
            build_task("label_choice", codec, bad)
        one_line_error(e, part)

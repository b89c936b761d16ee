"""The ``knowledge_conflict`` task: a counterfactual context before a fact the model knows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tasks.helpers import codec_of, one_line_error
from workbench.errors import WorkbenchError
from workbench.tasks import build_task, recipe_hash
from workbench.types import PromptGroups, PromptSet

TASK = "knowledge_conflict"
USER_ROWS = [
    {"relation": "capital", "prompt": "The capital of France is", "answer": " Paris",
     "counterfactual": " Rome"},
    {"relation": "capital", "prompt": "The capital of Italy is", "answer": " Rome",
     "counterfactual": " Berlin"},
    {"relation": "language", "prompt": "The official language of Spain is", "answer": " Spanish",
     "counterfactual": " German"},
    {"relation": "language", "prompt": "The official language of France is", "answer": " French",
     "counterfactual": " Rome Paris"},  # two tokens: skipped
]  # fmt: skip


def _sets(p: PromptSet | PromptGroups) -> tuple[PromptSet, ...]:
    return p.groups if isinstance(p, PromptGroups) else (p,)


def _records(p: PromptSet | PromptGroups, fmt: str = "sentence") -> set[str]:
    return {r for r, f in zip(p.meta["record_ids"], p.meta["formats"], strict=True) if f == fmt}


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("fmt", ["sentence", "paragraph", "both"])
def test_formats_build_with_memory_and_context_answers(tok, fmt, bos):
    codec = codec_of(tok, bos)
    p = build_task(TASK, codec, {"format": fmt})
    meta = p.meta
    formats = ("sentence", "paragraph") if fmt == "both" else (fmt,)
    assert set(meta["formats"]) == set(formats) and len(meta["formats"]) == p.n
    for f in formats:
        assert meta["n_prompts_by_format"][f] == meta["n_kept_records"] >= 30
    assert meta["n_records"] == 40 and meta["n_skipped_records"] == {"no_counterfactual": 1}
    assert meta["recipe_hash"] == recipe_hash(TASK, {"format": fmt})
    i = 0
    for ps in _sets(p):
        assert ps.clean.shape == ps.corrupt.shape and ps.prepend_bos is bos
        assert ps.meta["formats"] == meta["formats"][i : i + ps.n]  # groups' slices, in order
        for k in range(ps.n):
            m, c = meta["memory_answers"][i], meta["context_answers"][i]
            question, form = meta["questions"][i], meta["formats"][i]
            assert m.strip() != c.strip()
            assert (int(ps.correct[k]), int(ps.incorrect[k])) == (tok.convert_tokens_to_ids(
                m.strip()), tok.convert_tokens_to_ids(c.strip()))  # fmt: skip
            context, _, asked = ps.prompts[k].rpartition("\n")
            assert asked == question and context.startswith(question + c + ".")
            assert context.count(c) == (1 if form == "sentence" else 2)
            if form == "paragraph":
                assert context.count(".") == 3 and "reference books" in context
            # corrupted: the same prompt with the memory answer in the context, nothing else
            clean, corrupt = ps.clean[k].tolist(), ps.corrupt[k].tolist()
            diff = [j for j, (a, b) in enumerate(zip(clean, corrupt, strict=True)) if a != b]
            assert diff == meta["context_answer_positions"][i]
            assert len(diff) == context.count(c)
            assert all(clean[j] == ps.incorrect[k] and corrupt[j] == ps.correct[k] for j in diff)
            assert ps.corrupt_prompts[k] == ps.prompts[k].replace(c + ",", m + ",").replace(
                c + ".", m + ".")  # fmt: skip
            start = meta["question_start"][i]
            assert codec.decode(clean[start:]) == codec.decode(codec.encode(question))
            assert max(diff) < start
            i += 1
        assert ps.meta["first_diff_pos"] == min(min(d) for d in ps.meta["context_answer_positions"])
    assert i == p.n


def test_splits_are_disjoint_cover_and_hold_out_relations(tok):
    codec = codec_of(tok, False)
    full = build_task(TASK, codec, {"format": "sentence"})
    select = build_task(TASK, codec, {"format": "sentence", "split": "select"})
    test = build_task(TASK, codec, {"format": "sentence", "split": "test"})
    a, b = _records(select), _records(test)
    assert a and b and not a & b and a | b == _records(full)
    assert set(select.meta["record_splits"]) == {"select"}
    assert set(test.meta["record_splits"]) == {"test"}
    labels = dict(zip(full.meta["record_ids"], full.meta["record_splits"], strict=True))
    assert {r for r, s in labels.items() if s == "test"} == b
    assert full.meta["n_records_by_split"] == {"select": 21, "test": 19}  # half of each relation
    held = {"format": "sentence", "heldout_relations": ["language", "maker"]}
    hs = build_task(TASK, codec, {**held, "split": "select"})
    ht = build_task(TASK, codec, {**held, "split": "test"})
    assert not {"language", "maker"} & set(hs.meta["relations"])
    n_lang = full.meta["relations"].count("language") + full.meta["relations"].count("maker")
    assert n_lang == 10 and ht.meta["relations"].count("language") == 8
    assert not _records(hs) & _records(ht) and _records(hs) | _records(ht) == _records(full)
    with pytest.raises(WorkbenchError) as e:
        build_task(TASK, codec, {"heldout_relations": ["capitals"]})
    one_line_error(e, "unknown held-out relation", "capitals", "capital")
    everything = build_task(TASK, codec, {"format": "sentence", "test_fraction": 1.0})
    assert set(everything.meta["record_splits"]) == {"test"}


def test_deterministic_by_seed(tok):
    codec = codec_of(tok, True)
    a, b = build_task(TASK, codec, {"seed": 3}), build_task(TASK, codec, {"seed": 3})
    assert a.content_hash() == b.content_hash()
    assert a.meta["context_answers"] == b.meta["context_answers"]
    assert a.meta["record_splits"] == b.meta["record_splits"]
    c = build_task(TASK, codec, {"seed": 4})
    assert a.content_hash() != c.content_hash()
    assert a.meta["context_answers"] != c.meta["context_answers"]
    assert a.meta["record_splits"] != c.meta["record_splits"]


def test_user_records_file(tmp_path, tok):
    codec = codec_of(tok, False)
    path = _write(tmp_path / "facts.jsonl", USER_ROWS)
    p = build_task(TASK, codec, {"records_file": path, "format": "sentence"})
    assert isinstance(p, PromptSet | PromptGroups)
    assert p.meta["context_answers"] == [" Rome", " Berlin", " German"]
    assert p.meta["n_skipped_records"] == {"multi_token_counterfactual": 1}
    assert p.meta["skipped_records"] == {"multi_token_counterfactual": ["line 4"]}
    assert p.meta["records_from"] == path
    before = recipe_hash(TASK, {"records_file": path})
    # The same file with one counterfactual equal to its answer (nothing else changed) stops.
    bad = [dict(r) for r in USER_ROWS]
    bad[1]["counterfactual"] = " Rome"
    _write(tmp_path / "facts.jsonl", bad)
    assert recipe_hash(TASK, {"records_file": path}) != before  # the file's bytes are hashed
    with pytest.raises(WorkbenchError) as e:
        build_task(TASK, codec, {"records_file": path})
    one_line_error(e, "line 2", "counterfactual ' Rome' equals the answer", "differs")
    bad[1]["counterfactual"] = "Rome"  # the same token for this tokenizer
    _write(tmp_path / "facts.jsonl", bad)
    with pytest.raises(WorkbenchError) as e:
        build_task(TASK, codec, {"records_file": path})
    one_line_error(e, "line 2", "equals the answer")
    for params, part in (
        ({"records_file": str(tmp_path / "missing.jsonl")}, "not found"),
        ({"records_file": str(tmp_path / "facts.csv")}, ".jsonl"),
    ):
        with pytest.raises(WorkbenchError) as e:
            build_task(TASK, codec, params)
        one_line_error(e, part)
    _write(tmp_path / "facts.jsonl", [{**USER_ROWS[0], "counterfactual": ""}])
    with pytest.raises(WorkbenchError) as e:
        build_task(TASK, codec, {"records_file": path})
    one_line_error(e, "line 1", "counterfactual")


def test_bad_params(tok):
    codec = codec_of(tok, False)
    for params, part in (
        ({"format": "essay"}, "format"),
        ({"split": "train"}, "split"),
        ({"test_fraction": 1.5}, "test_fraction"),
    ):
        with pytest.raises(WorkbenchError) as e:
            build_task(TASK, codec, params)
        one_line_error(e, part)


def test_patching_runs_on_the_groups(load, store):
    from workbench.runner import run_analysis

    model = load("tiny-llama")
    task_params = {"format": "sentence", "heldout_relations": ["capital", "landmark_city"]}
    prompts = build_task(TASK, model.codec, {**task_params, "split": "select"})
    r = run_analysis("direct_logit_attribution", model, TASK,
                     task_params={**task_params, "split": "select"}, store=store)  # fmt: skip
    assert r.manifest["extra"]["n_prompts"] == prompts.n and isinstance(prompts, PromptGroups)
    groups = r.manifest["extra"]["groups"]  # one result merged over the lengths
    assert [g["seq_len"] for g in groups] == [g.seq_len for g in prompts.groups]


@pytest.mark.models
def test_builds_on_smollm2(smollm2):
    p = build_task(TASK, smollm2.codec)
    counts = p.meta["n_prompts_by_format"]
    assert counts["sentence"] > 16 and counts["paragraph"] > 16
    assert not any(p.meta["skipped_prompts"].values())  # SmolLM2 keeps o_c a separate token
    assert None not in p.meta["question_start"]
    for part in ("select", "test"):
        one = build_task(TASK, smollm2.codec, {"split": part})
        assert min(one.meta["n_prompts_by_format"].values()) >= 8

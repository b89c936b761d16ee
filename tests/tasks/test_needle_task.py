"""The needle-in-a-haystack task: span, depths, answers, chat template, files, errors; and the
``texts`` task."""

from __future__ import annotations

import json

import pytest

from tests.tasks.helpers import codec_of, one_line_error
from workbench.errors import WorkbenchError
from workbench.models import tiny
from workbench.tasks import (
    build_task,
    recipe_hash,
    task_vocabulary,
)
from workbench.types import NeedleSet

NEEDLE = {"context_lengths": [96, 160], "depth_percents": [0, 25, 50, 100], "n_needles": 1}
QUESTION = "\nBased on the content of the book, Question: {question}\nAnswer:"


def _needle_parts(codec, row):
    return codec.encode(" " + row["needle"]), codec.encode(
        QUESTION.format(question=row["question"])
    )


@pytest.mark.parametrize("bos", [False, True])
def test_needle_span_depths_and_answer(tok, bos):
    from workbench.tasks.needle import load_needles, tasks_data

    codec = codec_of(tok, bos)
    ns = build_task("needle", codec, NEEDLE)
    assert isinstance(ns, NeedleSet) and ns.n == 2 * 4 and ns.prepend_bos is bos
    row = load_needles(tasks_data("needles.jsonl"))[0]
    needle, tail = _needle_parts(codec, row)
    head = 1 if bos else 0
    for s in ns.samples:
        ids = s.context.tolist()
        assert len(ids) == s.context_length
        assert (ids[0] == tok.bos_token_id) is bos
        start, end = s.needle_span
        assert ids[start:end] == needle
        assert ids[-len(tail) :] == tail
        assert s.answer.tolist() == codec.encode(" " + row["real_needle"])
        if s.depth_percent == 0:
            assert start == head
        elif s.depth_percent == 100:
            assert end == len(ids) - len(tail)
        else:  # at or before the token depth, right after a sentence end (or at the start)
            hay_len = len(ids) - head - len(needle) - len(tail)
            assert start - head <= int(hay_len * s.depth_percent / 100)
            assert start == head or codec.decode([ids[start - 1]]).endswith(".")
    assert any(s.needle_span[0] > head for s in ns.samples if 0 < s.depth_percent < 100)


def test_needle_reference_jsonl_and_custom_haystack(tmp_path, tok):
    needles = [
        {"needle": "Mary hid the key in the red box.", "question": "Where did Mary hide the key?",
         "real_needle": "in the red box"},
        {"question": "What did John bring?", "needle": "John brought a cake to the park.",
         "real_needle": "a cake"},
    ]  # fmt: skip
    path = tmp_path / "needles.jsonl"
    path.write_text("".join(json.dumps(n) + "\n" for n in needles))
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "b.txt").write_text("The garden was green. The bread was warm. The bridge was old.")
    (hay / "notes.md").write_text("ignored")
    codec = codec_of(tok, False)
    params = {**NEEDLE, "needles_path": str(path), "haystack_dir": str(hay), "n_needles": 2}
    ns = build_task("needle", codec, params)
    assert ns.n == 2 * 2 * 4
    assert {s.real_needle for s in ns.samples} == {"in the red box", "a cake"}
    for s in ns.samples:
        assert codec.decode(s.context[s.needle_span[0] : s.needle_span[1]].tolist()).startswith(
            s.needle.split()[0]
        )


def test_needle_chat_template(tok):
    chat_tok = tiny.word_tokenizer([*task_vocabulary(), "user", "assistant"])
    chat_tok.chat_template = (
        "{% for m in messages %}user : {{ m['content'] }} .{% endfor %}"
        "{% if add_generation_prompt %} assistant :{% endif %}"
    )
    codec = codec_of(chat_tok, True)
    ns = build_task("needle", codec, NEEDLE)
    assert ns.meta["chat_template"] is True
    s = ns.samples[0]
    ids = s.context.tolist()
    user = chat_tok.convert_tokens_to_ids("user")
    assert ids[:2] == [chat_tok.bos_token_id, user] and len(ids) == s.context_length
    assert ids[s.needle_span[0] : s.needle_span[1]] == codec.encode(" " + s.needle)
    assert s.answer.tolist() == codec.encode(s.real_needle)
    assert codec.decode(ids[-3:]) == ". assistant :"
    plain = build_task("needle", codec, {**NEEDLE, "chat_template": "none"})
    assert plain.meta["chat_template"] is False


def _needle_error(tok, params, *parts, n_ctx=1024):
    with pytest.raises(WorkbenchError) as e:
        build_task("needle", codec_of(tok, False, n_ctx=n_ctx), {**NEEDLE, **params})
    return one_line_error(e, *parts)


def test_needle_errors(tmp_path, tok):
    good = {"needle": "A b.", "question": "Q?", "real_needle": "b"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"needle": "x", "question": "y"}) + "\n")
    _needle_error(tok, {"needles_path": str(bad)}, "bad.jsonl:2", "real_needle")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n{not json\n")
    _needle_error(tok, {"needles_path": str(broken)}, "broken.jsonl:2", "invalid JSON")
    _needle_error(tok, {"needles_path": str(tmp_path / "none.jsonl")}, "not found")
    _needle_error(tok, {"n_needles": 99}, "n_needles")
    empty = tmp_path / "empty"
    empty.mkdir()
    _needle_error(tok, {"haystack_dir": str(empty)}, "no .txt files")
    (empty / "a.txt").write_text("  \n")
    _needle_error(tok, {"haystack_dir": str(empty)}, "only empty files")
    _needle_error(tok, {"haystack_dir": str(tmp_path / "nowhere")}, "haystack folder not found")
    _needle_error(tok, {"depth_percents": [0, 101]}, "depth 101 outside [0, 100]")
    _needle_error(tok, {"depth_percents": [-5]}, "outside [0, 100]")
    _needle_error(tok, {"depth_percents": [0.1, 0.5, 0.9]}, "look like fractions", "percentages")
    _needle_error(tok, {"n_needles": -1}, "n_needles must be >= 0")
    _needle_error(tok, {"context_lengths": [4096]}, "exceeds the model's context 1024")
    _needle_error(tok, {"context_lengths": [20]}, "no room for the haystack")


def test_needle_uses_every_needle_by_default_and_depths_in_percent(tok):
    from workbench.tasks.needle import load_needles, tasks_data

    codec = codec_of(tok, False)
    n_file = len(load_needles(tasks_data("needles.jsonl")))
    assert n_file > 1
    ns = build_task("needle", codec, {"context_lengths": [160], "depth_percents": [0, 50]})
    assert ns.n == n_file * 2 and ns.meta["n_needles"] == n_file
    assert len({s.needle for s in ns.samples}) == n_file
    two = build_task(
        "needle", codec, {"context_lengths": [160], "depth_percents": [50], "n_needles": 2}
    )
    assert two.n == 2
    # a lone 0 and depths such as 0.5 among larger ones are percentages, not fractions
    assert build_task("needle", codec, {**NEEDLE, "depth_percents": [0]}).n == 2
    assert build_task("needle", codec, {**NEEDLE, "depth_percents": [0.5, 50]}).n == 4


def test_texts_reads_the_users_own_paragraphs_or_jsonl(tmp_path, tok):
    codec = codec_of(tok, False)
    words = " ".join(["the garden was green and the bread was warm"] * 3)
    txt = tmp_path / "mine.txt"
    txt.write_text(f"{words}\n\n{words} again\n\n\n{words} once more\n")
    ns = build_task("texts", codec, {"path": str(txt), "domains": ["file"], "n_per_domain": 3,
                                     "seq_len": 12})  # fmt: skip
    assert ns.meta["domains"] == ["file"] * 3 and ns.clean.shape == (3, 12)
    assert ns.clean[0].tolist() == codec.encode(words)[:12]
    jl = tmp_path / "mine.jsonl"
    jl.write_text("".join(json.dumps({"text": f"{words} {i}"}) + "\n" for i in range(2)))
    both = build_task("texts", codec, {"path": str(jl), "domains": ["repeated"],
                                       "n_per_domain": 2, "seq_len": 12})  # fmt: skip
    assert both.meta["domains"] == ["repeated", "repeated", "file", "file"]  # path adds 'file'
    assert recipe_hash("texts", {"path": str(jl)}) != recipe_hash("texts", {"path": str(txt)})
    before = recipe_hash("texts", {"path": str(jl)})
    jl.write_text(json.dumps({"text": words}) + "\n")
    assert recipe_hash("texts", {"path": str(jl)}) != before  # the file's bytes are hashed
    for params, part in [
        ({"domains": ["file"]}, "needs path"),
        ({"path": str(tmp_path / "x.pdf")}, "unknown file type"),
        ({"path": str(tmp_path / "none.txt")}, "not found"),
    ]:
        with pytest.raises(WorkbenchError) as e:
            build_task("texts", codec, params)
        one_line_error(e, part)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(WorkbenchError) as e:
        build_task("texts", codec, {"path": str(bad)})
    one_line_error(e, "bad.jsonl:1", "text")


def test_needle_not_found_is_reported(tok, monkeypatch):
    from workbench.tasks import needle as needle_mod

    def shifted(hay, depth, periods):  # a wrong insertion point leaves the needle unfound
        return -1

    monkeypatch.setattr(needle_mod, "_insertion_point", shifted)
    _needle_error(tok, {}, "not found in the tokenised context")


# ---------------------------------------------------------------------------- custom

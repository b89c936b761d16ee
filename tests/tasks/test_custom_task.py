"""The ``custom`` task: a user's own clean/corrupted pairs from JSONL or CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tasks.helpers import codec_of, one_line_error
from workbench.errors import WorkbenchError
from workbench.tasks import (
    build_task,
)


def _rows():
    return [
        {"clean": "When Mary and John went to the store , John gave a drink to",
         "corrupt": "When Mary and John went to the store , Alice gave a drink to",
         "correct": " Mary", "incorrect": " John"},
        {"clean": "When Anna and Paul went to the park , Paul gave a ring to",
         "corrupt": "When Anna and Paul went to the park , Sarah gave a ring to",
         "correct": " Anna", "incorrect": " Paul"},
    ]  # fmt: skip


def _write(path: Path, rows, fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_custom_file_accepted(tmp_path, tok, fmt):
    path = _write(tmp_path / f"pairs.{fmt}", _rows(), fmt)
    codec = codec_of(tok, True)
    ps = build_task("custom", codec, {"path": str(path)})
    assert ps.n == 2 and ps.clean.shape == ps.corrupt.shape and ps.clean[0, 0] == tok.bos_token_id
    assert codec.decode([int(ps.correct[0])]) == "Mary" and ps.meta["first_diff_pos"] == 10


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_custom_file_errors(tmp_path, tok, fmt):
    codec = codec_of(tok, False)

    def err(rows, *parts, n_ctx=1024, **params):
        path = _write(tmp_path / f"x.{fmt}", rows, fmt)
        with pytest.raises(WorkbenchError) as e:
            build_task("custom", codec_of(tok, False, n_ctx), {"path": str(path), **params})
        return one_line_error(e, *parts)

    good = _rows()
    line = 3 if fmt == "csv" else 2  # the second record
    err([good[0], {**good[1], "clean": "  "}], f"line {line}", "'clean' prompt is empty")
    err([good[0], {**good[1], "corrupt": "Anna and Paul"}], f"line {line}", "14 tokens, corrupt 3")
    err([good[0], {**good[1], "correct": " Anna Paul"}], f"line {line}", "is 2 tokens")
    err(good, "context is 8", n_ctx=8)
    short = {"clean": "Mary went", "corrupt": "John went", "correct": " to", "incorrect": " a"}
    err([*good, short], "2 tokens, most rows have 14", on_length_mismatch="error")
    groups = build_task(
        "custom", codec, {"path": str(_write(tmp_path / f"g.{fmt}", [*good, short], fmt))}
    )
    assert [(g.seq_len, g.n) for g in groups.groups] == [(2, 1), (14, 2)]  # default: grouped
    path = _write(tmp_path / f"ok.{fmt}", [*good, short], fmt)
    ps = build_task("custom", codec, {"path": str(path), "on_length_mismatch": "drop"})
    assert ps.n == 2 and ps.meta["dropped_rows"] == [f"line {line + 1}"]
    missing = [{k: v for k, v in r.items() if k != "incorrect"} for r in good]
    err(missing, "incorrect")


def test_custom_file_type_and_existence(tmp_path, tok):
    codec = codec_of(tok, False)
    for params, part in [
        ({"path": str(tmp_path / "none.jsonl")}, "not found"),
        ({"path": str(tmp_path / "pairs.txt")}, "unknown file type '.txt'"),
        ({}, "no file given"),
    ]:
        with pytest.raises(WorkbenchError) as e:
            build_task("custom", codec, params)
        one_line_error(e, part)


# ---------------------------------------------------------------------------- real tokenizer

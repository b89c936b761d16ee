"""The CLI end to end on tiny models: specs, the store, resumption, exports and errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from workbench.cli import main

SPEC = """
title = "t"
[defaults]
models = ["tiny-llama"]
[[analysis]]
name = "head_detectors"
tasks = [{ name = "induction", seq_len = 8, n_prompts = 4 }]
"""


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return tmp_path


def _spec(tmp_path: Path, text: str = SPEC, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _run_ids(capsys) -> list[str]:
    out = capsys.readouterr().out
    return [
        line.split()[1]
        for line in out.splitlines()
        if line.strip().startswith(("computed", "stored"))
    ]


def test_run_twice_second_from_store(home, capsys):
    spec = _spec(home)
    assert main(["run", str(spec), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "1 computed, 0 from the store" in first
    assert main(["run", str(spec), "--no-progress", "--print"]) == 0
    second = capsys.readouterr().out
    assert "0 computed, 1 from the store" in second
    assert "top 10 heads by induction" in second


def test_stored_spec_runs_without_torch(home):
    spec = _spec(home)
    assert main(["run", str(spec), "--no-progress"]) == 0
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from workbench.cli import main\n"
        f"sys.exit(main(['run', {str(spec)!r}, '--no-progress']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert proc.returncode == 0, proc.stderr
    assert "0 computed, 1 from the store" in proc.stdout


def test_export_formats_have_the_schema(home, capsys):
    spec = _spec(
        home,
        SPEC + '\n[[analysis]]\nname = "head_detectors"\nmodels = ["tiny-gpt2"]\n'
        'tasks = [{ name = "induction", seq_len = 8, n_prompts = 2 }]\n',
    )
    assert main(["run", str(spec), "--no-progress"]) == 0
    ids = _run_ids(capsys)
    assert len(ids) == 2
    for fmt, reader in [("csv", pd.read_csv), ("parquet", pd.read_parquet), ("json", pd.read_json)]:
        out = home / f"heads.{fmt}"
        assert main(["export", *ids, "--format", fmt, "-o", str(out)]) == 0
        df = reader(out)
        assert list(df.columns[:7]) == [
            "model",
            "run_id",
            "analysis",
            "metric",
            "layer",
            "head",
            "value",
        ]
        assert set(df["run_id"]) == set(ids)
        assert len(df) == 2 * 3 * 2 * 4  # runs x detectors x layers x heads
        assert df.groupby("run_id")["model"].first().to_dict() == {
            ids[0]: "tiny-llama",
            ids[1]: "tiny-gpt2",
        }


def test_runs_and_show(home, capsys):
    spec = _spec(home)
    main(["run", str(spec), "--no-progress"])
    rid = _run_ids(capsys)[0]
    assert main(["runs", "--model", "tiny-llama"]) == 0
    assert rid in capsys.readouterr().out
    html = home / "fig.html"
    assert main(["show", rid[:6], "--html", str(html)]) == 0
    assert "induction" in capsys.readouterr().out
    assert html.stat().st_size > 1000


def test_show_info_and_export_info_table(home, capsys):
    import json

    spec = _spec(home)
    main(["run", str(spec), "--no-progress"])
    rid = _run_ids(capsys)[0]
    assert main(["show", rid, "--info"]) == 0
    out = capsys.readouterr().out
    facts = json.loads(out.split("info: ", 1)[1].split("\n}", 1)[0] + "\n}")
    assert facts["n_prompts"] == 4 and "prompt_hash" in facts
    csv = home / "info.csv"
    assert main(["export", rid, "--table", "info", "-o", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df.columns) == ["run_id", "key", "value"] and (df["run_id"] == rid).all()
    assert df.set_index("key").loc["n_prompts", "value"] == "4"
    assert main(["export", rid, "--table", "nope", "-o", str(csv)]) == 2
    assert "info" in capsys.readouterr().err


def _bad(**over: str) -> str:
    fields = {
        "name": '"head_detectors"',
        "models": '["tiny-llama"]',
        "tasks": '[{ name = "induction", seq_len = 8, n_prompts = 2 }]',
        **over,
    }
    return "[[analysis]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items())


BAD_SPECS = {
    "unknown model": (_bad(models='["nope"]'), "unknown model 'nope'"),
    "unknown analysis": (_bad(name='"nope"'), "unknown analysis 'nope'"),
    "unknown task": (_bad(tasks='["nope"]'), "unknown task 'nope'"),
    "unknown param": (_bad(params="{ bogus = 1 }"), "unknown parameter(s) bogus"),
    "ill-typed param": (_bad(params='{ batch_size = "eight" }'), "'batch_size' must be int"),
    "bad task param": (
        _bad(tasks='[{ name = "induction", seq_len = "x" }]'),
        "'seq_len' must be int",
    ),
    "unknown spec key": (_bad(colour='"red"'), "unknown key(s) colour"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_specs_fail_with_one_line_exit_2(home, capsys, case):
    text, message = BAD_SPECS[case]
    assert main(["run", str(_spec(home, text)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    from workbench.store import ResultStore

    assert len(ResultStore().list_runs()) == 0


def test_malformed_toml_names_the_line(home, capsys):
    spec = _spec(home, '[[analysis]]\nname = "head_detectors"\nmodels = [tiny\n')
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "malformed TOML" in err and "line 3" in err


def test_missing_file_and_unwritable_output(home, capsys):
    assert main(["run", str(home / "missing.toml")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    spec = _spec(home)
    main(["run", str(spec), "--no-progress"])
    rid = _run_ids(capsys)[0]
    assert main(["export", rid, "-o", str(home / "no" / "such" / "dir.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", rid, "--format", "xlsx", "-o", str(home / "x.xlsx")]) == 2
    assert main(["show", "ffffffffffff"]) == 2


def test_kill_9_mid_spec_then_resume_has_no_duplicates(home):
    parts = "\n".join(
        f'[[analysis]]\nname = "head_detectors"\nmodels = ["tiny-{m}"]\n'
        f'tasks = [{{ name = "induction", seq_len = 48, n_prompts = {n} }}]\n'
        for m in ("llama", "gpt2", "gemma3")
        for n in (96, 97, 98)
    )
    spec = _spec(home, parts)
    cmd = [sys.executable, "-m", "workbench.cli", "run", str(spec), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from workbench.store import ResultStore

    store = ResultStore()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (home / "home" / "store" / "catalog.duckdb").exists() and len(store.list_runs()) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(store.list_runs())
    assert 1 <= done_before < 9, "the kill should land mid-spec"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"{9 - done_before} computed, {done_before} from the store" in out
    runs = store.list_runs()
    assert len(runs) == 9 and runs["run_id"].is_unique


def test_compare_two_runs(home, capsys):
    spec = _spec(
        home,
        SPEC + '\n[[analysis]]\nname = "head_detectors"\nmodels = ["tiny-llama"]\n'
        "params = { exclude_bos = true }\n"
        'tasks = [{ name = "induction", seq_len = 8, n_prompts = 4 }]\n',
    )
    assert main(["run", str(spec), "--no-progress"]) == 0
    a, b = _run_ids(capsys)
    assert main(["compare", a, a, "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "spearman: 1.0000" in out and "top_k_overlap: 1.0000" in out
    assert main(["compare", a, b, "--metric-a", "induction", "--metric-b", "induction"]) == 0
    assert main(["compare", a, b, "--metric-a", "nope"]) == 2
    assert "has no metric 'nope'" in capsys.readouterr().err

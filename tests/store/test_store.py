"""The results store: round trips, caching, validation, corruption, listing, prefixes, deletion
and catalog rebuilds (crashes and concurrency: ``test_store_processes.py``)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.store.helpers import catalog_ids, make_key, make_tables
from workbench.errors import WorkbenchError
from workbench.result import Result
from workbench.store import ResultStore
from workbench.types import HEAD_TABLE_COLUMNS, RunKey

REPO = Path(__file__).resolve().parents[2]


def test_put_get_round_trip_preserves_dtypes(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    tables = make_tables(key)
    tables["labels"] = pd.DataFrame(
        {"name": pd.Categorical(["a", "b"]), "count": pd.array([1, None], dtype="Int64")}
    )
    put = store.put(key, tables, {"n_prompts": np.int64(8), "note": "x"})
    assert put.from_store is False
    assert put.run_id == key.run_id

    got = store.get(key.run_id)
    assert isinstance(got, Result)
    assert got.from_store is True
    assert got.key == key.as_dict()
    heads = got.tables["heads"]
    assert list(heads.columns[: len(HEAD_TABLE_COLUMNS)]) == list(HEAD_TABLE_COLUMNS)
    assert heads["layer"].dtype == "int64" and heads["head"].dtype == "int64"
    assert heads["value"].dtype == "float64"
    for name in tables:
        pd.testing.assert_frame_equal(got.tables[name], put.tables[name])
    pd.testing.assert_frame_equal(got.tables["grid"], tables["grid"])  # float32, int columns
    pd.testing.assert_frame_equal(got.tables["labels"], tables["labels"])

    m = got.manifest
    assert m == put.manifest
    assert m["run_id"] == key.run_id and m["key"] == key.as_dict()
    assert m["rows"] == {"heads": 6, "grid": 2, "labels": 2}
    assert set(m["files"]["heads"]) == {"sha256", "bytes", "rows"}
    assert m["extra"] == {"n_prompts": 8, "note": "x"}
    assert m["created_at"].endswith("+00:00") and m["workbench_version"]
    assert sorted(os.listdir(tmp_path / "results" / key.run_id)) == [
        "grid.parquet",
        "heads.parquet",
        "labels.parquet",
        "manifest.json",
    ]
    assert store.get(make_key("absent").run_id) is None
    assert store.has(key.run_id) and not store.has(make_key("absent").run_id)


def test_second_put_of_same_key_returns_the_stored_result(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    first = store.put(key, make_tables(key))
    second = store.put(key, make_tables(key, n_layers=5))
    assert second.from_store is True
    assert second.manifest["created_at"] == first.manifest["created_at"]
    assert len(second.tables["heads"]) == 6
    assert catalog_ids(tmp_path) == [key.run_id]
    assert [p.name for p in (tmp_path / "results").iterdir()] == [key.run_id]


def test_get_or_compute_computes_once(tmp_path: Path) -> None:
    key = make_key()
    calls = []

    def compute():
        calls.append(1)
        return make_tables(key), {"n_prompts": 8}

    first = ResultStore(tmp_path).get_or_compute(key, compute)
    assert first.from_store is False and first.manifest["seconds"] >= 0
    again = ResultStore(tmp_path).get_or_compute(key, compute)
    assert again.from_store is True
    assert ResultStore(tmp_path).get_or_compute(key, compute).from_store is True
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first.tables["heads"], again.tables["heads"])
    assert again.manifest["extra"] == {"n_prompts": 8}


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda h: h.drop(columns=["layer", "value"]), "lacks columns layer, value"),
        (lambda h: h.assign(run_id="0123456789abcdef"), "run_id"),
        (lambda h: h.assign(layer=0.5), "non-integer"),
        (lambda h: h.assign(value="high"), "not numeric"),
    ],
)
def test_invalid_head_table_is_rejected_and_nothing_written(tmp_path, damage, match) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    tables = make_tables(key)
    tables["heads"] = damage(tables["heads"])
    with pytest.raises(WorkbenchError, match=match):
        store.put(key, tables)
    assert list((tmp_path / "results").iterdir()) == []
    assert store.get(key.run_id) is None
    assert store.list_runs().empty


def test_unstorable_tables_are_rejected(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    with pytest.raises(WorkbenchError, match="table name"):
        store.put(key, {"../evil": pd.DataFrame({"a": [1]})})
    with pytest.raises(WorkbenchError, match="cannot be stored as Parquet"):
        store.put(key, {"mixed": pd.DataFrame({"a": [1, "x", 2.5]})})
    assert list((tmp_path / "results").iterdir()) == []


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: _flip_bytes(d / "heads.parquet"),
        lambda d: (d / "grid.parquet").unlink(),
        lambda d: (d / "manifest.json").write_text("{not json"),
        lambda d: (d / "manifest.json").unlink(),
    ],
    ids=["flipped-bytes", "deleted-table", "garbled-manifest", "deleted-manifest"],
)
def test_damaged_result_is_detected_and_recomputed(tmp_path, caplog, damage) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    calls = []

    def compute():
        calls.append(1)
        return make_tables(key), {}

    store.get_or_compute(key, compute)
    damage(tmp_path / "results" / key.run_id)

    with caplog.at_level(logging.WARNING, logger="workbench.store"):
        assert store.get(key.run_id) is None
    assert key.run_id in caplog.text and "damaged" in caplog.text
    assert catalog_ids(tmp_path) == []
    assert not (tmp_path / "results" / key.run_id).exists()

    again = store.get_or_compute(key, compute)
    assert len(calls) == 2 and again.from_store is False
    assert store.get(key.run_id) is not None and store.has(key.run_id)


def test_has_detects_damage(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    store.put(key, make_tables(key))
    _flip_bytes(tmp_path / "results" / key.run_id / "grid.parquet")
    assert store.has(key.run_id) is False
    assert store.list_runs().empty


def test_list_runs_filters(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    assert list(store.list_runs().columns) == [
        "run_id",
        "model",
        "analysis",
        "task",
        "params",
        "created_at",
        "rows",
        "seconds",
    ]
    keys = [
        make_key(1, model="tiny", analysis="patch", task="ioi"),
        make_key(2, model="tiny", analysis="attribution", task="ioi"),
        make_key(3, model="gemma", analysis="patch", task="induction"),
    ]
    for key in keys:

        def compute(key: RunKey = key) -> tuple[dict[str, pd.DataFrame], dict[str, object]]:
            return make_tables(key), {}

        store.get_or_compute(key, compute)
    runs = store.list_runs()
    assert len(runs) == 3 and runs["rows"].tolist() == [8, 8, 8]
    assert runs["created_at"].is_monotonic_decreasing
    assert runs["created_at"].dt.tz is not None
    assert (runs["seconds"] >= 0).all()
    assert json.loads(runs["params"].iloc[0]) == {"positions": [1, 2], "tag": "3"}
    assert set(store.list_runs(model="tiny")["run_id"]) == {keys[0].run_id, keys[1].run_id}
    assert store.list_runs(analysis="patch", task="induction")["run_id"].tolist() == [
        keys[2].run_id
    ]
    assert store.list_runs(model="nobody").empty
    assert len(store.list_runs(limit=2)) == 2


def test_resolve_prefix(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    with pytest.raises(WorkbenchError, match="no stored run"):
        store.resolve("abc")  # no catalog yet
    keys = [make_key(i) for i in range(40)]
    for key in keys:
        store.put(key, make_tables(key))
    ids = [k.run_id for k in keys]
    target = ids[0]
    unique = next(
        target[:n] for n in range(1, 17) if sum(i.startswith(target[:n]) for i in ids) == 1
    )
    assert store.resolve(unique) == target
    assert store.resolve(target.upper()) == target
    first_chars = [i[0] for i in ids]
    shared = next(c for c in first_chars if first_chars.count(c) > 1)  # 40 ids, 16 hex digits
    with pytest.raises(WorkbenchError, match="ambiguous"):
        store.resolve(shared)
    missing = next(c for c in "0123456789abcdef" * 4 if not any(i.startswith(c) for i in ids))
    with pytest.raises(WorkbenchError, match="no stored run"):
        store.resolve(missing)
    with pytest.raises(WorkbenchError, match="not a run id"):
        store.resolve("xyz")


def test_delete(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key, other = make_key(1), make_key(2)
    store.put(key, make_tables(key))
    store.put(other, make_tables(other))
    store.delete(key.run_id)
    assert store.get(key.run_id) is None
    assert not (tmp_path / "results" / key.run_id).exists()
    assert catalog_ids(tmp_path) == [other.run_id]
    with pytest.raises(WorkbenchError, match="no stored run"):
        store.delete(key.run_id)
    with pytest.raises(WorkbenchError, match="not a run id"):
        store.delete("../etc")


def test_leftovers_are_replaced_and_old_temp_dirs_cleaned(tmp_path: Path) -> None:
    key = make_key()
    final = tmp_path / "results" / key.run_id
    final.mkdir(parents=True)
    (final / "heads.parquet").write_bytes(b"half a file")  # a killed run's renamed dir, no row
    old_tmp = tmp_path / "results" / ".tmp-old"
    new_tmp = tmp_path / "results" / ".tmp-new"
    for d in (old_tmp, new_tmp):
        d.mkdir()
        (d / "x.parquet").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old_tmp, (two_hours_ago, two_hours_ago))

    store = ResultStore(tmp_path)
    assert not old_tmp.exists() and new_tmp.exists()
    assert store.get(key.run_id) is None
    store.put(key, make_tables(key))
    assert store.has(key.run_id)
    assert sorted(os.listdir(final)) == ["grid.parquet", "heads.parquet", "manifest.json"]


def test_corrupt_catalog_names_the_fix_and_rebuilds(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    keys = [make_key(i) for i in range(3)]
    for key in keys:
        store.put(key, make_tables(key))
    catalog = tmp_path / "catalog.duckdb"
    catalog.write_bytes(os.urandom(4096))
    with pytest.raises(WorkbenchError, match=f"delete {catalog}") as info:
        store.get(keys[0].run_id)
    assert "results files" in str(info.value) or "result files" in str(info.value)

    assert store.rebuild_catalog() == 3
    assert sorted(store.list_runs()["run_id"]) == sorted(k.run_id for k in keys)
    assert store.get(keys[1].run_id) is not None

    catalog.unlink()  # the advertised fix: a new store rebuilds from the manifests on disk
    reopened = ResultStore(tmp_path)
    assert sorted(reopened.list_runs()["run_id"]) == sorted(k.run_id for k in keys)

    catalog.unlink()  # an already-open store rebuilds too, on its next write
    extra = make_key("late")
    store.put(extra, make_tables(extra))
    assert sorted(store.list_runs()["run_id"]) == sorted(k.run_id for k in [*keys, extra])


def test_get_is_fast(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    store.put(key, make_tables(key, n_layers=12, n_heads=12))
    store.get(key.run_id)  # warm imports
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        assert store.get(key.run_id) is not None
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[2] < 0.1, timings


def test_default_root_is_under_workbench_home(tmp_path, monkeypatch) -> None:
    from workbench.home import workbench_home

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    assert workbench_home() == tmp_path / "home" and (tmp_path / "home").is_dir()
    assert ResultStore().root == tmp_path / "home" / "store"


def test_load_by_id_or_prefix(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = make_key()
    store.put(key, make_tables(key))
    assert store.load(key.run_id[:6]).run_id == key.run_id
    assert store.load(key.run_id).tables["heads"].shape[0] == 6
    with pytest.raises(WorkbenchError, match="no stored run id starts with"):
        store.load("ffffffff")
    _flip_bytes(tmp_path / "results" / key.run_id / "heads.parquet")
    with pytest.raises(WorkbenchError, match="damaged or gone") as err:
        store.load(key.run_id[:6])
    assert "\n" not in str(err.value)
    assert catalog_ids(tmp_path) == []  # the damaged run was removed

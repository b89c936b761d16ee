"""The results store under real child processes: a put killed at each stage leaves nothing
visible; concurrent writers both succeed; reading the store never imports torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.store.helpers import catalog_ids, make_key, make_tables
from workbench.errors import WorkbenchError
from workbench.store import ResultStore

REPO = Path(__file__).resolve().parents[2]


def _child(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_KILL_CHILD = """
    import os, sys, time
    from pathlib import Path
    from tests.store.helpers import catalog_ids, make_key, make_tables
    from workbench.store import ResultStore
    from workbench.store import catalog

    root, stage, marker = sys.argv[1:4]

    def pause():
        Path(marker).write_text("paused")
        time.sleep(120)

    if stage == "files-written":  # tables + manifest in the temp dir, lock not yet taken
        original_writing = catalog.Catalog.writing
        def writing(self):
            pause()
            return original_writing(self)
        catalog.Catalog.writing = writing
    elif stage == "renamed":  # final dir in place, catalog row not inserted
        def insert(self, row):
            pause()
        catalog.CatalogSession.insert = insert
    elif stage == "before-commit":  # row inserted inside the open transaction
        original_execute = catalog.CatalogSession.execute
        def execute(self, sql, params=()):
            if sql == "COMMIT":
                pause()
            return original_execute(self, sql, params)
        catalog.CatalogSession.execute = execute

    key = make_key()
    ResultStore(Path(root)).put(key, make_tables(key))
    print("finished")
"""


@pytest.mark.parametrize("stage", ["files-written", "renamed", "before-commit"])
def test_put_killed_midway_leaves_nothing_visible(tmp_path: Path, stage: str) -> None:
    root = tmp_path / "store"
    marker = tmp_path / "marker"
    ResultStore(root)
    child = _child(_KILL_CHILD, str(root), stage, str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "child never reached the pause"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    key = make_key()
    temp_dirs = [p for p in (root / "results").iterdir() if p.name.startswith(".tmp-")]
    if stage == "files-written":  # the complete temp dir is there, not yet renamed
        assert [sorted(os.listdir(d)) for d in temp_dirs] == [
            ["grid.parquet", "heads.parquet", "manifest.json"]
        ]
    else:  # renamed into place, but without its catalog row
        assert temp_dirs == [] and (root / "results" / key.run_id / "manifest.json").exists()

    store = ResultStore(root)
    assert store.get(key.run_id) is None
    assert not store.has(key.run_id)
    assert store.list_runs().empty
    with pytest.raises(WorkbenchError):
        store.resolve(key.run_id[:4])

    done = store.put(key, make_tables(key))
    assert done.from_store is False
    assert catalog_ids(root) == [key.run_id]
    assert len(store.list_runs()) == 1
    got = ResultStore(root).get(key.run_id)
    assert got is not None
    pd.testing.assert_frame_equal(got.tables["heads"], done.tables["heads"])
    visible = [p.name for p in (root / "results").iterdir() if not p.name.startswith(".")]
    assert visible == [key.run_id]


_WRITER_CHILD = """
    import json, sys, time
    from pathlib import Path
    from tests.store.helpers import catalog_ids, make_key, make_tables
    from workbench.store import ResultStore

    root, start, name, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    store = ResultStore(Path(root))
    import duckdb, pyarrow.parquet  # warm the lazy imports so both start together
    while not start.exists():
        time.sleep(0.005)
    report = []
    for i in range(n):
        for key in (make_key(f"shared-{i}"), make_key(f"{name}-{i}")):
            result = store.put(key, make_tables(key))
            assert store.get(key.run_id) is not None
            report.append([key.run_id, result.from_store])
    print(json.dumps(report))
"""


def test_concurrent_processes_both_succeed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    start = tmp_path / "go"
    n = 10
    children = [_child(_WRITER_CHILD, str(root), str(start), name, str(n)) for name in "ab"]
    time.sleep(0.5)
    start.touch()
    reports = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        reports.append(json.loads(out))

    shared = {make_key(f"shared-{i}").run_id for i in range(n)}
    own = {make_key(f"{name}-{i}").run_id for name in "ab" for i in range(n)}
    ids = catalog_ids(root)
    assert len(ids) == len(set(ids)) == 3 * n
    assert set(ids) == shared | own
    for run_id in shared:  # exactly one process wrote it; the other got the stored copy
        fresh = [not from_store for r in reports for rid, from_store in r if rid == run_id]
        assert sum(fresh) == 1
    store = ResultStore(root)
    assert all(store.has(run_id) for run_id in ids)
    assert sorted(p.name for p in (root / "results").iterdir()) == sorted(ids)


def test_store_does_not_import_torch(tmp_path: Path) -> None:
    child = _child(
        """
        import sys
        from pathlib import Path
        import workbench.store
        from tests.store.helpers import catalog_ids, make_key, make_tables
        store = workbench.store.ResultStore(Path(sys.argv[1]))
        key = make_key()
        store.get_or_compute(key, lambda: (make_tables(key), {}))
        store.get(key.run_id)
        store.list_runs()
        heavy = sorted(m for m in ("torch", "transformers", "transformer_lens") if m in sys.modules)
        print(heavy)
        """,
        str(tmp_path),
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == "[]"

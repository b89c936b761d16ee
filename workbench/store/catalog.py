"""The DuckDB catalog of stored runs, and the inter-process lock that guards it.

DuckDB lets one process hold a database file for writing (or several for reading), so every
access is short: take ``fcntl.flock`` on ``<root>/.lock`` (shared to read, exclusive to write),
open a connection, do one thing, close. The ``runs`` table has one row per run; its ``manifest``
column holds the exact text of the run's ``manifest.json``, so the catalog can always be rebuilt
from the result directories (:meth:`Catalog.rebuild`).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.store.files import TMP_PREFIX, fsync_dir
from workbench.types import canonical_json

SCHEMA_VERSION = "1"
CATALOG_FILE = "catalog.duckdb"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 120.0
_BUSY_TIMEOUT_S = 10.0

_DDL = """
CREATE TABLE catalog_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    model VARCHAR NOT NULL,
    model_fingerprint VARCHAR NOT NULL,
    analysis VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    params VARCHAR NOT NULL,
    data_hash VARCHAR NOT NULL,
    code_version VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL,
    rows BIGINT NOT NULL,
    seconds DOUBLE,
    files VARCHAR NOT NULL,
    manifest VARCHAR NOT NULL
);
"""
# params: canonical JSON; created_at: UTC; rows: summed over tables;
# files: JSON {table: {sha256, bytes, rows}}; manifest: the text of manifest.json.


@dataclass(frozen=True)
class RunRow:
    """One row of the ``runs`` table."""

    run_id: str
    model: str
    model_fingerprint: str
    analysis: str
    task: str
    params: str
    data_hash: str
    code_version: str
    created_at: datetime
    rows: int
    seconds: float | None
    files: str
    manifest: str

    @classmethod
    def from_manifest(cls, manifest_text: str) -> RunRow:
        """The catalog row a manifest describes (raises KeyError/ValueError if malformed)."""
        m = json.loads(manifest_text)
        key = m["key"]
        created = datetime.fromisoformat(m["created_at"]).astimezone(UTC).replace(tzinfo=None)
        seconds = m.get("seconds")
        return cls(
            run_id=str(m["run_id"]),
            model=str(key["model"]),
            model_fingerprint=str(key["model_fingerprint"]),
            analysis=str(key["analysis"]),
            task=str(key["task"]),
            params=canonical_json(key["params"]),
            data_hash=str(key["data_hash"]),
            code_version=str(key["code_version"]),
            created_at=created,
            rows=int(sum(int(f["rows"]) for f in m["files"].values())),
            seconds=None if seconds is None else float(seconds),
            files=canonical_json(m["files"]),
            manifest=manifest_text,
        )

    def file_info(self) -> dict[str, dict[str, Any]]:
        info: dict[str, dict[str, Any]] = json.loads(self.files)
        return info


_COLUMNS = ", ".join(f.name for f in fields(RunRow))
_PLACEHOLDERS = ", ".join("?" for _ in fields(RunRow))
LIST_COLUMNS = ("run_id", "model", "analysis", "task", "params", "created_at", "rows", "seconds")


@contextmanager
def file_lock(path: Path, *, exclusive: bool, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (created if absent) for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WorkbenchError(
                        f"the results store lock {path} was held for over {timeout_s:.0f} s",
                        "wait for the other workbench process to finish, or stop it",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class CatalogSession:
    """One open connection to the catalog, valid inside :meth:`Catalog.reading`/``writing``."""

    def __init__(self, con: Any, path: Path) -> None:
        self._con = con
        self._path = path

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        import duckdb

        try:
            rows: list[tuple[Any, ...]] = self._con.execute(sql, list(params)).fetchall()
        except _corruption_errors(duckdb) as e:
            raise corrupt_catalog(self._path, e) from None
        return rows

    def fetch(self, run_id: str) -> RunRow | None:
        rows = self.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", [run_id])
        return RunRow(*rows[0]) if rows else None

    def insert(self, row: RunRow) -> None:
        self.execute("BEGIN TRANSACTION")
        self.execute(f"INSERT INTO runs ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", astuple(row))
        self.execute("COMMIT")

    def remove(self, run_id: str) -> None:
        self.execute("DELETE FROM runs WHERE run_id = ?", [run_id])

    def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        rows = self.execute(
            "SELECT run_id FROM runs WHERE starts_with(run_id, ?) ORDER BY run_id LIMIT ?",
            [prefix, limit],
        )
        return [r[0] for r in rows]

    def list_runs(self, filters: dict[str, str | None], limit: int | None) -> list[tuple[Any, ...]]:
        where = [(col, val) for col, val in filters.items() if val is not None]
        sql = f"SELECT {', '.join(LIST_COLUMNS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(f"{col} = ?" for col, _ in where)
        sql += " ORDER BY created_at DESC, run_id"
        params: list[Any] = [val for _, val in where]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self.execute(sql, params)


def _corruption_errors(duckdb: Any) -> tuple[type[BaseException], ...]:
    return (
        duckdb.IOException,
        duckdb.SerializationException,
        duckdb.InternalException,
        duckdb.FatalException,
        duckdb.CatalogException,
    )


def corrupt_catalog(path: Path, err: BaseException) -> WorkbenchError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return WorkbenchError(
        f"the results catalog {path} is unreadable ({detail})",
        f"delete {path} to rebuild it from the result files (they are kept), "
        "or call ResultStore.rebuild_catalog()",
    )


class Catalog:
    """The catalog file ``<root>/catalog.duckdb`` and its lock ``<root>/.lock``.

    ``rows_on_disk`` lists the rows the result directories describe; a missing catalog is
    (re)created from it, so deleting the catalog file loses nothing.
    """

    def __init__(self, root: Path, rows_on_disk: Callable[[], Iterable[RunRow]]) -> None:
        self.root = root
        self.path = root / CATALOG_FILE
        self.lock_path = root / LOCK_FILE
        self._rows_on_disk = rows_on_disk

    def exists(self) -> bool:
        return self.path.exists()

    @contextmanager
    def reading(self) -> Iterator[CatalogSession | None]:
        """A read-only session under the shared lock; ``None`` when no catalog exists yet."""
        with file_lock(self.lock_path, exclusive=False):
            if not self.path.exists():
                yield None
                return
            with self._session(read_only=True) as session:
                yield session

    @contextmanager
    def writing(self) -> Iterator[CatalogSession]:
        """A read-write session under the exclusive lock; creates the catalog if absent."""
        with file_lock(self.lock_path, exclusive=True):
            if not self.path.exists():
                self._replace_with(self._rows_on_disk())
            with self._session(read_only=False) as session:
                yield session

    def rebuild(self, *, only_if_missing: bool = False) -> int:
        """Replace the catalog by one built from the result directories; return its row count.

        With ``only_if_missing``, do nothing (return 0) when the catalog file exists.
        """
        with file_lock(self.lock_path, exclusive=True):
            if only_if_missing and self.path.exists():
                return 0
            return self._replace_with(self._rows_on_disk())

    def _replace_with(self, rows: Iterable[RunRow]) -> int:
        """Build a catalog in a temp file and rename it over the real one (lock held)."""
        import duckdb

        tmp = self.root / f"{TMP_PREFIX}catalog-{uuid.uuid4().hex}.duckdb"
        n = 0
        con = duckdb.connect(str(tmp))
        try:
            con.execute(_DDL)
            con.execute("INSERT INTO catalog_meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
            for row in rows:
                con.execute(f"INSERT INTO runs ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", astuple(row))
                n += 1
            con.execute("CHECKPOINT")
        finally:
            con.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # A write-ahead log left by the old file must not be replayed onto the new one.
        for stale in (Path(f"{self.path}.wal"), Path(f"{tmp}.wal")):
            stale.unlink(missing_ok=True)
        os.replace(tmp, self.path)
        fsync_dir(self.root)
        return n

    @contextmanager
    def _session(self, *, read_only: bool) -> Iterator[CatalogSession]:
        con = self._connect(read_only=read_only)
        try:
            session = CatalogSession(con, self.path)
            version = session.execute("SELECT value FROM catalog_meta WHERE key = 'schema_version'")
            if not version or version[0][0] != SCHEMA_VERSION:
                found = version[0][0] if version else "none"
                raise WorkbenchError(
                    f"the results catalog {self.path} has schema version {found}; "
                    f"this workbench reads version {SCHEMA_VERSION}",
                    f"delete {self.path} to rebuild it from the result files (they are kept)",
                )
            yield session
        finally:
            con.close()

    def _connect(self, *, read_only: bool) -> Any:
        import duckdb

        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as e:
                # Our own processes are serialised by the flock; a conflict here is some other
                # program (a duckdb shell, say) holding the file.
                held = "lock" in str(e).lower() and "conflicting" in str(e).lower()
                if not held:
                    raise corrupt_catalog(self.path, e) from None
                if time.monotonic() > deadline:
                    raise WorkbenchError(
                        f"the results catalog {self.path} is held open by another program",
                        "close that program (e.g. a duckdb shell on the catalog) and retry",
                    ) from None
                time.sleep(0.05)

"""The results store: every analysis run, keyed by its :class:`~workbench.types.RunKey`.

Layout under ``root`` (default ``workbench_home() / "store"``)::

    catalog.duckdb                 one row per run (see workbench.store.catalog)
    .lock                          flock guarding the catalog
    results/<run_id>/<table>.parquet
    results/<run_id>/manifest.json

Writing is atomic: the tables and manifest go to ``results/.tmp-<uuid>/`` (each file fsynced),
then, under the exclusive lock, the directory is renamed to ``results/<run_id>`` and the catalog
row is inserted last, in a transaction. A result is visible only through its catalog row, so a
process killed at any point leaves either a complete result or none. Reading checks every file
against the sha256 in the catalog; a damaged result is removed (with a warning) and reads as
absent, so :meth:`ResultStore.get_or_compute` recomputes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.home import workbench_home
from workbench.provenance import library_versions
from workbench.result import Result
from workbench.store.catalog import LIST_COLUMNS, Catalog, RunRow
from workbench.store.files import (
    MANIFEST,
    TMP_PREFIX,
    clean_orphans,
    discard_dir,
    fsync_dir,
    manifest_json,
    new_temp_dir,
    normalize_tables,
    read_parquet,
    read_verified,
    write_file,
    write_tables,
)
from workbench.types import RunKey

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
_RUN_ID = re.compile(r"^[0-9a-f]{1,64}$")


class ResultStore:
    """A DuckDB catalog plus Parquet files; safe for several processes at once."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else workbench_home() / "store"
        self.results_dir = self.root / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._catalog = Catalog(self.root, self._rows_on_disk)
        clean_orphans(self.results_dir)
        clean_orphans(self.root)
        if not self._catalog.exists() and any(self._result_dirs()):
            n = self._catalog.rebuild(only_if_missing=True)
            log.info("rebuilt the results catalog %s from %d result(s)", self.catalog_path, n)

    @property
    def catalog_path(self) -> Path:
        return self._catalog.path

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r})"

    # ---- reading -----------------------------------------------------------------------------

    def get(self, run_id: str) -> Result | None:
        """The stored result of ``run_id``, or None if absent or damaged (then it is removed)."""
        _check_run_id(run_id)
        with self._catalog.reading() as cat:
            row = cat.fetch(run_id) if cat is not None else None
            if row is None:
                return None
            result, problem = self._load(row)
        if result is None:
            self._evict(row, problem)
        return result

    def load(self, id_or_prefix: str) -> Result:
        """The intact stored run whose id is or starts with ``id_or_prefix``; a one-line
        WorkbenchError when none, several, or a damaged one (which is then removed) match."""
        run_id = self.resolve(id_or_prefix)
        stored = self.get(run_id)
        if stored is None:
            raise WorkbenchError(
                f"run {run_id} is damaged or gone", "run its spec again to recompute it"
            )
        return stored

    def has(self, run_id: str) -> bool:
        """True when ``run_id`` has a catalog row and all its files are intact."""
        _check_run_id(run_id)
        with self._catalog.reading() as cat:
            row = cat.fetch(run_id) if cat is not None else None
            if row is None:
                return False
            _, problem = read_verified(self.results_dir / run_id, row.file_info(), row.manifest)
        if problem is not None:
            self._evict(row, problem)
        return problem is None

    def list_runs(
        self,
        model: str | None = None,
        analysis: str | None = None,
        task: str | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """One row per stored run, newest first.

        Columns: ``run_id, model, analysis, task, params`` (canonical JSON text),
        ``created_at`` (UTC), ``rows`` (summed over the run's tables), ``seconds`` (compute
        time, NaN when unknown). Files are not verified here; :meth:`get` does that.
        """
        import pandas as pd

        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise WorkbenchError(f"limit must be a whole number >= 0, not {limit!r}")
        filters = {"model": model, "analysis": analysis, "task": task}
        with self._catalog.reading() as cat:
            rows = cat.list_runs(filters, limit) if cat is not None else []
        df = pd.DataFrame(rows, columns=list(LIST_COLUMNS))
        df["created_at"] = pd.to_datetime(df["created_at"]).dt.tz_localize("UTC")
        return df.astype({"rows": "int64", "seconds": "float64"})

    def resolve(self, prefix: str) -> str:
        """The one stored run id starting with ``prefix``; WorkbenchError if none or several."""
        p = prefix.strip().lower()
        if not _RUN_ID.match(p):
            raise WorkbenchError(
                f"{prefix!r} is not a run id", "run ids are hexadecimal, like 3f2a9c0d11b4e7a2"
            )
        with self._catalog.reading() as cat:
            ids = cat.ids_with_prefix(p, limit=6) if cat is not None else []
        if not ids:
            raise WorkbenchError(
                f"no stored run id starts with {p!r}", "list the stored runs to see their ids"
            )
        if len(ids) > 1:
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise WorkbenchError(
                f"run id prefix {p!r} is ambiguous: it matches {shown}",
                "give more characters of the id",
            )
        return ids[0]

    # ---- writing -----------------------------------------------------------------------------

    def put(
        self,
        key: RunKey,
        tables: Mapping[str, pd.DataFrame],
        manifest_extra: Mapping[str, Any] | None = None,
        *,
        seconds: float | None = None,
    ) -> Result:
        """Store ``tables`` under ``key.run_id`` atomically and return the stored result.

        ``manifest_extra`` lands under ``manifest["extra"]``; ``seconds`` is the compute time.
        If another process stored the same run first, its intact result is returned instead
        (with ``from_store=True``) and ours is discarded.
        """
        run_id = key.run_id
        clean = normalize_tables(tables, run_id)
        tmp: Path | None = new_temp_dir(self.results_dir)
        try:
            assert tmp is not None
            files = write_tables(tmp, clean)
            manifest_text = manifest_json(
                {
                    "format": MANIFEST_FORMAT,
                    "run_id": run_id,
                    "key": key.as_dict(),
                    "created_at": datetime.now(UTC).isoformat(),
                    "seconds": seconds,
                    "rows": {name: len(df) for name, df in clean.items()},
                    "files": files,
                    "workbench_version": _workbench_version(),
                    "versions": library_versions(),
                    "extra": dict(manifest_extra or {}),
                }
            )
            write_file(tmp / MANIFEST, manifest_text.encode("utf-8"))
            fsync_dir(tmp)
            row = RunRow.from_manifest(manifest_text)
            final = self.results_dir / run_id
            with self._catalog.writing() as cat:
                existing = cat.fetch(run_id)
                if existing is not None:
                    stored, problem = self._load(existing)
                    if stored is not None:
                        return stored  # another process won the race; ours is dropped
                    log.warning("replacing damaged stored run %s (%s)", run_id, problem)
                    cat.remove(run_id)
                if final.exists():  # left by a process killed before its row was inserted
                    discard_dir(final)
                os.rename(tmp, final)
                tmp = None
                fsync_dir(self.results_dir)
                cat.insert(row)
        finally:
            if tmp is not None:
                discard_dir(tmp)
        manifest = json.loads(manifest_text)
        return Result(run_id, manifest["key"], manifest, clean, from_store=False)

    def get_or_compute(
        self,
        key: RunKey,
        compute: Callable[[], tuple[Mapping[str, pd.DataFrame], Mapping[str, Any]]],
        *,
        serve: bool = True,
    ) -> Result:
        """The stored result for ``key`` if intact, else ``compute()`` stored and returned.

        ``compute`` returns ``(tables, manifest_extra)``; it is not called when an intact
        result is stored, unless ``serve`` is False (the caller does not trust the stored
        result; an identical stored one is kept). Its wall time is recorded as
        ``manifest["seconds"]``.
        """
        found = self.get(key.run_id) if serve else None
        if found is not None:
            return found
        start = time.perf_counter()
        tables, extra = compute()
        seconds = time.perf_counter() - start
        return self.put(key, tables, extra, seconds=seconds)

    def delete(self, run_id: str) -> None:
        """Remove a stored run (catalog row first, then its files)."""
        _check_run_id(run_id)
        directory = self.results_dir / run_id
        with self._catalog.writing() as cat:
            row = cat.fetch(run_id)
            if row is None and not directory.exists():
                raise WorkbenchError(
                    f"no stored run {run_id}", "list the stored runs to see their ids"
                )
            if row is not None:
                cat.remove(run_id)
            discard_dir(directory)

    def rebuild_catalog(self) -> int:
        """Recreate the catalog from the manifests on disk; return the number of runs found.

        Directories whose files do not match their manifest are skipped (and left alone).
        """
        n = self._catalog.rebuild()
        log.info("rebuilt the results catalog %s from %d result(s)", self.catalog_path, n)
        return n

    # ---- internals ---------------------------------------------------------------------------

    def _load(self, row: RunRow) -> tuple[Result, None] | tuple[None, str]:
        """Read and verify a run's files (call with the catalog lock held)."""
        blobs, problem = read_verified(self.results_dir / row.run_id, row.file_info(), row.manifest)
        if blobs is None:
            return None, problem or "unreadable"
        try:
            manifest = json.loads(row.manifest)
            tables = {name: read_parquet(data) for name, data in blobs.items()}
        except (ValueError, OSError, KeyError, TypeError) as e:
            return None, f"unreadable ({e})"
        return Result(row.run_id, manifest["key"], manifest, tables, from_store=True), None

    def _evict(self, seen: RunRow, problem: str | None) -> None:
        log.warning(
            "stored run %s is damaged (%s); removed, it will be recomputed", seen.run_id, problem
        )
        with self._catalog.writing() as cat:
            current = cat.fetch(seen.run_id)
            if current is not None and current.manifest != seen.manifest:
                return  # replaced by a fresh result since we looked
            if current is not None:
                cat.remove(seen.run_id)
            discard_dir(self.results_dir / seen.run_id)

    def _result_dirs(self) -> Iterator[Path]:
        for entry in os.scandir(self.results_dir):
            if not entry.name.startswith(TMP_PREFIX) and entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)

    def _rows_on_disk(self) -> Iterator[RunRow]:
        for directory in self._result_dirs():
            try:
                text = (directory / MANIFEST).read_text(encoding="utf-8")
                row = RunRow.from_manifest(text)
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                log.warning("skipping %s: unreadable %s (%s)", directory, MANIFEST, e)
                continue
            if row.run_id != directory.name:
                log.warning("skipping %s: its manifest names run %s", directory, row.run_id)
                continue
            _, problem = read_verified(directory, row.file_info(), text)
            if problem is not None:
                log.warning("skipping %s: %s", directory, problem)
                continue
            yield row


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise WorkbenchError(
            f"{run_id!r} is not a run id", "run ids are hexadecimal, like 3f2a9c0d11b4e7a2"
        )


def _workbench_version() -> str:
    from workbench import __version__

    return str(__version__)

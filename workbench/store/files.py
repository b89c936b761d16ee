"""The files of one stored result: Parquet tables plus ``manifest.json``, checksummed.

A result directory holds ``<table>.parquet`` for every table and ``manifest.json``. Each file is
serialised in memory, hashed (sha256 of its bytes), written and fsynced; reading back hashes the
bytes again and parses the very bytes that were checked, so a damaged file is never half-read.
Only JSON and Parquet are written, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.types import HEAD_TABLE_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

HEADS = "heads"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
ORPHAN_AGE_S = 3600.0
_TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def table_file(name: str) -> str:
    return f"{name}.parquet"


def normalize_tables(tables: Mapping[str, pd.DataFrame], run_id: str) -> dict[str, pd.DataFrame]:
    """Check table names and the head-table schema; return copies with canonical dtypes.

    A ``heads`` table must carry :data:`HEAD_TABLE_COLUMNS` with ``run_id`` equal to the run's
    id; ``layer``/``head`` become int64, ``value`` (and ``stderr`` if present) float64.
    """
    import pandas as pd

    out: dict[str, pd.DataFrame] = {}
    for name, df in tables.items():
        if not isinstance(name, str) or not _TABLE_NAME.match(name):
            raise WorkbenchError(
                f"table name {name!r} cannot be stored",
                "use letters, digits, '_', '.' or '-' (at most 100 characters)",
            )
        if not isinstance(df, pd.DataFrame):
            raise WorkbenchError(
                f"table {name!r} is a {type(df).__name__}, not a pandas DataFrame",
                "convert it with pandas.DataFrame(...) before storing",
            )
        out[name] = _normalize_heads(df, run_id) if name == HEADS else df.copy()
    return out


def _normalize_heads(df: pd.DataFrame, run_id: str) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    missing = [c for c in HEAD_TABLE_COLUMNS if c not in df.columns]
    if missing:
        raise WorkbenchError(
            f"head table of run {run_id} lacks columns {', '.join(missing)}",
            f"a head table needs the columns {', '.join(HEAD_TABLE_COLUMNS)}",
        )
    bad_ids = sorted({str(v) for v in df["run_id"].unique() if str(v) != run_id})
    if bad_ids:
        raise WorkbenchError(
            f"head table rows carry run_id {', '.join(bad_ids[:3])} but the run id is {run_id}",
            "fill the run_id column with key.run_id",
        )
    df = df.copy()
    for col in ("layer", "head"):
        if pd.api.types.is_integer_dtype(df[col]) and not df[col].hasnans:
            df[col] = df[col].astype("int64")
            continue
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        if np.isnan(values).any() or (values != np.round(values)).any():
            raise WorkbenchError(
                f"head table column {col!r} of run {run_id} holds non-integer values",
                "give every row an integer layer and head",
            )
        df[col] = values.astype("int64")
    for col in ("value", "stderr"):
        if col in df.columns:
            try:
                df[col] = df[col].astype("float64")
            except (TypeError, ValueError) as e:
                raise WorkbenchError(
                    f"head table column {col!r} of run {run_id} is not numeric ({e})",
                    f"store numbers in {col!r}",
                ) from None
    return df


def parquet_bytes(name: str, df: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pandas(df)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise WorkbenchError(
            f"table {name!r} cannot be stored as Parquet ({e})",
            "give each column a single type (numbers, strings, booleans or timestamps)",
        ) from None
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def read_parquet(data: bytes) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data)).to_pandas()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tables(directory: Path, tables: Mapping[str, pd.DataFrame]) -> dict[str, dict[str, Any]]:
    """Write every table as Parquet into ``directory``; return ``{name: {sha256, bytes, rows}}``."""
    files: dict[str, dict[str, Any]] = {}
    for name, df in tables.items():
        data = parquet_bytes(name, df)
        write_file(directory / table_file(name), data)
        files[name] = {"sha256": sha256_bytes(data), "bytes": len(data), "rows": len(df)}
    return files


def read_verified(
    directory: Path, files: Mapping[str, Mapping[str, Any]], manifest_text: str
) -> tuple[dict[str, bytes], None] | tuple[None, str]:
    """Read every file of a result and check it against its recorded checksum.

    Returns ``(bytes by table, None)`` when all is intact, else ``(None, what is wrong)``.
    """
    blobs: dict[str, bytes] = {}
    for name, info in files.items():
        path = directory / table_file(name)
        try:
            data = path.read_bytes()
        except OSError as e:
            return None, f"{path.name} is unreadable ({e.strerror or e})"
        if len(data) != info.get("bytes") or sha256_bytes(data) != info.get("sha256"):
            return None, f"{path.name} does not match its checksum"
        blobs[name] = data
    try:
        on_disk = (directory / MANIFEST).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{MANIFEST} is unreadable ({e})"
    if on_disk != manifest_text:
        return None, f"{MANIFEST} differs from the catalog"
    return blobs, None


def new_temp_dir(parent: Path) -> Path:
    path = parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    path.mkdir()
    return path


def discard_dir(path: Path) -> None:
    """Remove a directory: first renamed to a temp name (atomic), then deleted."""
    trash = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_orphans(parent: Path, max_age_s: float = ORPHAN_AGE_S) -> int:
    """Delete temp entries (``.tmp-*``) under ``parent`` older than ``max_age_s``; return count."""
    now = time.time()
    removed = 0
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < max_age_s:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    return str(obj)


def manifest_json(manifest: Mapping[str, Any]) -> str:
    """The manifest as stored: indented, sorted JSON (numpy values become plain numbers)."""
    return json.dumps(manifest, sort_keys=True, indent=1, default=_json_default) + "\n"

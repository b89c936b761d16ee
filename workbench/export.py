"""Exporting stored results as one tidy table (CSV, Parquet or JSON), for the CLI and the app.

Torch-free: reads the store only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import pandas as pd

    from workbench.store import ResultStore

FORMATS = ("csv", "parquet", "json")
MIME = {"csv": "text/csv", "parquet": "application/octet-stream", "json": "application/json"}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise WorkbenchError(f"unknown format '{fmt}'", "use --format csv, parquet or json")
    return fmt


INFO = "info"
"""The pseudo-table of a run's facts (``manifest["extra"]``): one row per fact."""


def info_table(run_id: str, facts: Mapping[str, Any]) -> pd.DataFrame:
    """``run_id, key, value`` per fact, sorted by key; each value as text (JSON unless a string)."""
    import json

    import pandas as pd

    def text(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)

    keys = sorted(facts)
    return pd.DataFrame(
        {"run_id": [run_id] * len(keys), "key": keys, "value": [text(facts[k]) for k in keys]}
    )


def gather(store: ResultStore, run_ids: Sequence[str], table: str = "heads") -> pd.DataFrame:
    """Table ``table`` of every run (ids or unique prefixes), concatenated; ``info`` is the
    runs' facts (:func:`info_table`) unless a run stores a table of that name."""
    import pandas as pd

    frames = []
    for rid in run_ids:
        stored = store.load(rid)
        if table == INFO and INFO not in stored.tables:
            frames.append(info_table(stored.run_id, stored.manifest.get("extra") or {}))
            continue
        if table not in stored.tables:
            raise WorkbenchError(
                f"run {rid} has no table '{table}'",
                f"tables: {', '.join([*stored.tables, INFO])}",
            )
        frames.append(stored.tables[table])
    if not frames:
        raise WorkbenchError("no runs to export", "give at least one run id")
    return pd.concat(frames, ignore_index=True)


def to_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """``df`` serialised as ``fmt`` (JSON: a list of records)."""
    check_format(fmt)
    if fmt == "csv":
        return df.to_csv(index=False).encode("utf-8")
    if fmt == "parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()
    return df.to_json(orient="records", indent=1).encode("utf-8")


def write(df: pd.DataFrame, output: Path, fmt: str) -> None:
    """Write ``df`` to ``output`` atomically (temporary file, then rename)."""
    data = to_bytes(df, fmt)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(output)

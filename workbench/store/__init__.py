"""The results store: a DuckDB catalog plus Parquet files, keyed by run id.

Imports only the standard library here; duckdb, pyarrow and pandas load on first use, and torch
never does, so the CLI can answer from the store quickly. It returns
:class:`~workbench.result.Result` objects.
"""

from workbench.store.store import ResultStore

__all__ = ["ResultStore"]

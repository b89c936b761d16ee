"""The results store: a DuckDB catalog plus Parquet files, keyed by run id.

Imports only the standard library here; duckdb, pyarrow and pandas load on first use, and torch
never does, so the CLI can answer from the store quickly.
"""

from workbench.store.results import ResultStore, StoredResult

__all__ = ["ResultStore", "StoredResult"]

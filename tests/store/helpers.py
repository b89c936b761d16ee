"""Key and table builders and a catalog reader shared by the store tests and the child processes
they start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from workbench.types import RunKey


def make_key(tag: object = 0, model: str = "tiny", analysis: str = "patch", task: str = "ioi"):
    return RunKey(
        model=model,
        model_fingerprint=f"fp-{model}",
        analysis=analysis,
        params={"tag": str(tag), "positions": [1, 2]},
        task=task,
        data_hash="data-1",
        code_version="0.1.0",
    )


def make_tables(key: RunKey, n_layers: int = 2, n_heads: int = 3) -> dict[str, pd.DataFrame]:
    layer, head = np.divmod(np.arange(n_layers * n_heads), n_heads)
    heads = pd.DataFrame(
        {
            "model": key.model,
            "run_id": key.run_id,
            "analysis": key.analysis,
            "metric": "logit_diff",
            "layer": layer.astype("int32"),
            "head": head.astype("int32"),
            "value": np.linspace(-1, 1, len(layer)),
            "stderr": np.full(len(layer), 0.1),
            "n": 8,
        }
    )
    grid = pd.DataFrame(np.arange(n_layers * n_heads, dtype="float32").reshape(n_layers, n_heads))
    grid.index.name = "layer"
    return {"heads": heads, "grid": grid}


def catalog_ids(root: Path) -> list[str]:
    """The run ids in the catalog under ``root``, read directly (not through the store)."""
    import duckdb

    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
    finally:
        con.close()

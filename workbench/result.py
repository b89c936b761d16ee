"""The one result type: what the store returns, the runner and the API hand back, the app shows.

A :class:`Result` is a run's tidy tables plus the manifest describing them, as a notebook object
(a tidy head table, a layer x head matrix, a plotly figure, a readable repr). Torch-free: a
stored result is shown without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.figures import head_heatmap
from workbench.types import HEAD_AXES, HEAD_TABLE_COLUMNS, AnalysisOutput

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go


def head_table(output: AnalysisOutput, *, model: str, run_id: str, analysis: str) -> pd.DataFrame:
    """Tidy rows ``model, run_id, analysis, metric, layer, head, value, stderr, n``."""
    import numpy as np
    import pandas as pd

    frames = []
    for metric, m in output.head_metrics.items():
        mean = np.asarray(m.mean, dtype=np.float64)
        n_layers, n_heads = mean.shape
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        stderr = (
            np.asarray(m.stderr, dtype=np.float64).ravel()
            if m.stderr is not None
            else np.full(mean.size, np.nan)
        )
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "run_id": run_id,
                    "analysis": analysis,
                    "metric": metric,
                    "layer": layer.ravel().astype("int64"),
                    "head": head.ravel().astype("int64"),
                    "value": mean.ravel(),
                    "stderr": stderr,
                    "n": np.full(mean.size, m.n, dtype="int64"),
                }
            )
        )
    if not frames:
        return pd.DataFrame(columns=[*HEAD_TABLE_COLUMNS, "stderr", "n"])
    return pd.concat(frames, ignore_index=True)


@dataclass(eq=False)
class Result:
    """One run: its tidy ``tables`` (``tables["heads"]``, when present, is the head table of
    ``HEAD_TABLE_COLUMNS``; other names hold other arrays, e.g. ``"grid"``), the ``manifest``
    that describes them (``key``: the run key as a dict), and whether it was read back from the
    store (``from_store``) or just computed and stored."""

    run_id: str
    key: dict[str, Any]
    manifest: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    from_store: bool

    @property
    def info(self) -> dict[str, Any]:
        """The run's facts (counts, baselines, backend, self-checks, ...)."""
        return dict(self.manifest.get("extra") or {})

    @property
    def head_axis(self) -> str:
        """What the ``head`` column indexes (``types.HEAD_AXES``), as the analysis's registry
        entry declared it for the run's parameters when it was computed (the runner records it
        in the run's info); query heads for derived runs. A run stored before the runner
        recorded it has it in its info only if its axis could be other than query heads
        (activation patching, the one analysis whose axis depends on its parameters, has always
        recorded it itself), so query heads otherwise."""
        axis = self.info.get("head_axis")
        return str(axis) if axis in HEAD_AXES else "head"

    @property
    def heads(self) -> pd.DataFrame:
        import pandas as pd

        return self.tables.get("heads", pd.DataFrame(columns=list(HEAD_TABLE_COLUMNS)))

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.heads["metric"]))

    def matrix(self, metric: str | None = None) -> pd.DataFrame:
        """``layer x head`` matrix of one metric (the first one by default)."""
        metric = metric or self.metrics[0]
        rows = self.heads[self.heads["metric"] == metric]
        if rows.empty:
            raise KeyError(f"no metric {metric!r}; have {self.metrics}")
        return rows.pivot(index="layer", columns="head", values="value")

    def top(self, metric: str | None = None, k: int = 10) -> pd.DataFrame:
        metric = metric or self.metrics[0]
        rows = self.heads[self.heads["metric"] == metric]
        cols = [c for c in ("layer", "head", "value", "stderr") if c in rows]
        return rows.nlargest(k, "value")[cols].reset_index(drop=True)

    def figure(self, metric: str | None = None) -> go.Figure:
        """Layer x head heatmap of one metric, hover giving layer, head and value."""
        metric = metric or self.metrics[0]
        return head_heatmap(
            self.matrix(metric),
            title=f"{self.key.get('analysis')} / {metric} — {self.key.get('model')} "
            f"({self.key.get('task')}) run {self.run_id}",
            colorbar=metric,
        )

    def summary(self, k: int = 5) -> str:
        lines = [
            f"{self.key.get('analysis')} on {self.key.get('model')} / {self.key.get('task')} "
            f"— run {self.run_id} ({'from store' if self.from_store else 'computed'}, "
            f"{self.manifest.get('seconds', 0):.2f}s compute)"
        ]
        for metric in self.metrics:
            top = self.top(metric, k)
            heads = ", ".join(
                f"L{int(r.layer)}H{int(r.head)}={r.value:.3f}" for r in top.itertuples()
            )
            lines.append(f"  {metric}: {heads}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Result\n{self.summary()}\n>"

    def _repr_html_(self) -> str:
        return f"<pre>{self.summary()}</pre>" + self.heads.head(20).to_html()

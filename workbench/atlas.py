"""The head atlas: every head's latest score from every stored analysis, in one wide table.

For one model, :func:`build_atlas` reads the results store (torch-free) and builds
``Atlas.table``: one row per head (``layer, head, head_label = "L{l}H{h}"``), one *score column*
per ``(analysis, variant, metric, task)``, named ``analysis[variant].metric@task``
(``docs/circuits.md`` shows real ones; no variant: ``analysis.metric@task``). Each column holds
the value of the **latest** stored run for that key (by the catalog's ``created_at``);
runs that differ only in parameters not named in the column (a task's ``seq_len``, ``n_prompts``,
BOS policy) replace each other, the newest wins, and ``<column>__run`` gives the run id of every
value. ``Atlas.provenance`` has one row per column (run, created time, parameters).

Variants: the parameters that change what a column *means* are part of its name, as each
analysis declares on its registry entry (``variant_params``; e.g. the patched component of
activation patching; the direction when it is not the default).

KV-head metrics (activation patching of ``k`` / ``v`` under grouped-query attention, stored with
the KV-head index in ``head``) are **broadcast to the query heads that share the KV head**: query
head ``h`` gets the value of KV head ``h // (n_heads / n_kv_heads)``; their columns carry the
variant ``kv`` (``analysis[k,kv].metric@task``), and no role rule reads them.

Head grid: ``n_layers x n_heads`` is derived from the stored head tables (largest layer and
query-head index + 1, over runs whose head axis is the query head), so no model is loaded.

Roles: each analysis's registry entry declares its ``(role, metric, op, threshold)`` rules
(``roles``; :func:`role_rules` collects them); a rule applies to every score column whose
metric matches (and whose analysis matches where the rule names one), only where such a column
exists. A head's ``roles`` cell lists
``"<role>: <column> > <threshold>"`` labels, ``; ``-joined.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.figures import head_heatmap
from workbench.hooks import kv_group
from workbench.types import RoleRule

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from workbench.store import ResultStore

__all__ = ["ROLE_RULES", "Atlas", "RoleRule", "build_atlas", "role_rules", "variant_params"]


def role_rules() -> tuple[RoleRule, ...]:
    """Every registered analysis's role rules (declared on its registry entry), in registry
    order. Thresholds are this project's choices (Wu et al. 2024 use 0.1 for retrieval heads);
    a rule only applies where a column of its analysis and metric exists."""
    from workbench.registry import REGISTRY

    return tuple(rule for entry in REGISTRY.values() for rule in entry.roles)


def variant_params() -> dict[str, tuple[str, ...]]:
    """Per analysis, the parameters that enter its atlas column name (declared on its registry
    entry; the first always, the others only when they differ from the schema default)."""
    from workbench.registry import REGISTRY

    return {name: entry.variant_params for name, entry in REGISTRY.items() if entry.variant_params}


ROLE_RULES: tuple[RoleRule, ...] = role_rules()
"""The rules of the analyses registered when this module was imported (see :func:`role_rules`)."""

_OPS: dict[str, Callable[[Any, Any], Any]] = {">": operator.gt, "<": operator.lt}


def _variant(analysis: str, params: dict[str, Any], kv: bool) -> str:
    from workbench.registry import REGISTRY

    entry = REGISTRY.get(analysis)
    names = entry.variant_params if entry is not None else ()
    defaults = {f.name: f.default for f in fields(entry.params_cls)} if entry is not None else {}
    parts = []
    for i, name in enumerate(names):
        if name not in params:
            continue
        value = params[name]
        if i == 0 or value != defaults.get(name):
            parts.append(
                value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            )
    if kv:
        parts.append("kv")
    return ",".join(str(p) for p in parts)


def column_name(analysis: str, variant: str, metric: str, task: str) -> str:
    """``analysis[variant].metric@task`` (no brackets when there is no variant)."""
    return f"{analysis}{f'[{variant}]' if variant else ''}.{metric}@{task}"


@dataclass(eq=False)
class Atlas:
    """Per-head scores of one model (module docstring). ``table`` is the wide table,
    ``columns`` the score columns, ``provenance`` one row per column, ``role_table`` one row
    per (head, role)."""

    model: str
    n_layers: int
    n_heads: int
    table: pd.DataFrame
    columns: list[str]
    provenance: pd.DataFrame
    role_table: pd.DataFrame
    rules: tuple[RoleRule, ...] = field(default_factory=role_rules)

    def matrix(self, column: str) -> pd.DataFrame:
        """``layer x head`` matrix of one score column."""
        self._check(column)
        return self.table.pivot(index="layer", columns="head", values=column)

    def top(self, column: str, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the largest values of ``column`` (NaN last)."""
        self._check(column)
        cols = ["head_label", column, f"{column}__run", "roles"]
        return self.table.nlargest(k, column)[cols].reset_index(drop=True)

    def roles_of(self, layer: int, head: int) -> list[str]:
        rows = self.role_table[
            (self.role_table["layer"] == layer) & (self.role_table["head"] == head)
        ]
        return [str(x) for x in rows["label"]]

    def figure(self, column: str | None = None) -> go.Figure:
        """Layer x head heatmap of ``column``; hover: head, value, run id and roles."""
        import numpy as np
        import pandas as pd

        if not self.columns:
            raise WorkbenchError(f"the atlas of {self.model} has no score columns", "run a spec")
        column = column or self.columns[0]
        mat = self.matrix(column)
        cells = pd.MultiIndex.from_product([mat.index, mat.columns])
        rows = self.table.set_index(["layer", "head"]).reindex(cells)
        pairs = zip(rows[f"{column}__run"], rows["roles"], strict=True)
        custom = np.array(
            [[run or "-", roles or "-"] for run, roles in pairs], dtype=object
        ).reshape(*mat.shape, 2)
        return head_heatmap(
            mat,
            title=f"atlas {self.model}: {column}",
            colorbar=column.split("@")[0].split(".")[-1],
            hovertemplate="%{y}%{x}: %{z:.4f}<br>run %{customdata[0]}"
            "<br>roles: %{customdata[1]}<extra></extra>",
            layout={"height": min(900, 200 + 18 * self.n_layers)},
            customdata=custom,
        )

    def summary(self, k: int = 5) -> str:
        lines = [
            f"atlas of {self.model}: {self.n_layers} layers x {self.n_heads} heads = "
            f"{len(self.table)} heads, {len(self.columns)} score column(s), "
            f"{len(self.role_table)} role label(s)"
        ]
        for col in self.columns:
            top = self.table.nlargest(k, col)
            heads = ", ".join(
                f"{label}={value:.3f}"
                for label, value in zip(top["head_label"], top[col], strict=True)
            )
            lines.append(f"  {col}: {heads}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Atlas\n{self.summary()}\n>"

    def _repr_html_(self) -> str:
        return f"<pre>{self.summary()}</pre>" + self.table.head(20).to_html()

    def _check(self, column: str) -> None:
        if column not in self.columns:
            raise WorkbenchError(
                f"the atlas of {self.model} has no column '{column}'",
                f"columns: {', '.join(self.columns) or '(none: run a spec first)'}",
            )


@dataclass
class _Column:
    name: str
    analysis: str
    metric: str
    task: str
    variant: str
    run_id: str
    created_at: Any
    params: str
    kv: bool
    values: pd.DataFrame  # layer, head, value


def _collect(store: ResultStore, model: str) -> list[_Column]:
    """The latest run's per-head values for every column key (newest first from the catalog)."""
    runs = store.list_runs(model=model)
    runs = runs.sort_values(["created_at", "run_id"], ascending=[False, True])
    out: dict[str, _Column] = {}
    for row in runs.itertuples():
        stored = store.get(str(row.run_id))
        if stored is None or "heads" not in stored.tables or stored.tables["heads"].empty:
            continue
        heads = stored.tables["heads"]
        params = json.loads(str(row.params))
        kv = stored.head_axis == "kv_head"
        variant = _variant(str(row.analysis), params, kv)
        for metric, rows in heads.groupby("metric", sort=False):
            name = column_name(str(row.analysis), variant, str(metric), str(row.task))
            if name in out:
                continue  # a newer run already gave this column
            out[name] = _Column(
                name,
                str(row.analysis),
                str(metric),
                str(row.task),
                variant,
                str(row.run_id),
                row.created_at,
                str(row.params),
                kv,
                rows[["layer", "head", "value"]].reset_index(drop=True),
            )
    return sorted(out.values(), key=lambda c: c.name)


def build_atlas(
    model: str, store: ResultStore | None = None, rules: tuple[RoleRule, ...] | None = None
) -> Atlas:
    """The atlas of ``model`` from ``store`` (default: the workbench store); module docstring.
    ``rules``: the role rules (default: every registered analysis's, :func:`role_rules`)."""
    rules = role_rules() if rules is None else rules
    import numpy as np
    import pandas as pd

    from workbench.store import ResultStore

    store = store or ResultStore()
    cols = _collect(store, model)
    query_cols = [c for c in cols if not c.kv]
    if not query_cols:
        raise WorkbenchError(
            f"no per-head results of model '{model}' in the store {store.root}",
            f"run a spec on {model} first (e.g. workbench run analyses/demo.toml)",
        )
    n_layers = 1 + max(int(c.values["layer"].max()) for c in cols)
    n_heads = 1 + max(int(c.values["head"].max()) for c in query_cols)
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    data: dict[str, Any] = {
        "model": model,
        "layer": layer.ravel().astype("int64"),
        "head": head.ravel().astype("int64"),
        "head_label": [f"L{la}H{h}" for la, h in zip(layer.ravel(), head.ravel(), strict=True)],
    }
    prov = []
    for c in cols:
        grid = np.full((n_layers, n_heads), np.nan)
        v = c.values
        if c.kv:
            n_kv = 1 + int(v["head"].max())
            if n_heads % n_kv:
                continue  # not a grouping of the query heads we know: leave it out
            kv_grid = np.full((n_layers, n_kv), np.nan)
            kv_grid[v["layer"].to_numpy(), v["head"].to_numpy()] = v["value"].to_numpy()
            grid = np.repeat(kv_grid, kv_group(n_heads, n_kv), axis=1)
        else:
            grid[v["layer"].to_numpy(), v["head"].to_numpy()] = v["value"].to_numpy()
        data[c.name] = grid.ravel()
        data[f"{c.name}__run"] = np.where(np.isnan(grid.ravel()), "", c.run_id)
        prov.append(
            {
                "column": c.name,
                "analysis": c.analysis,
                "variant": c.variant,
                "metric": c.metric,
                "task": c.task,
                "run_id": c.run_id,
                "created_at": c.created_at,
                "params": c.params,
                "kv_broadcast": c.kv,
                "n_values": int(np.isfinite(grid).sum()),
            }
        )
    table = pd.DataFrame(data)
    columns = [p["column"] for p in prov]
    role_rows = []
    for rule in rules:
        for p in prov:
            if p["kv_broadcast"] or not rule.matches(p["analysis"], p["metric"]):
                continue
            values = table[p["column"]]
            hit = _OPS[rule.op](values, rule.threshold) & values.notna()
            for idx in np.flatnonzero(hit.to_numpy()):
                role_rows.append(
                    {
                        "layer": int(table.at[idx, "layer"]),
                        "head": int(table.at[idx, "head"]),
                        "role": rule.role,
                        "label": rule.label(p["column"]),
                        "column": p["column"],
                        "value": float(values.iat[idx]),
                        "run_id": p["run_id"],
                    }
                )
    role_table = pd.DataFrame(
        role_rows, columns=["layer", "head", "role", "label", "column", "value", "run_id"]
    )
    labels: dict[tuple[int, int], list[str]] = {}
    for r in role_rows:
        labels.setdefault((r["layer"], r["head"]), []).append(r["label"])
    table["roles"] = [
        "; ".join(labels.get((int(la), int(h)), []))
        for la, h in zip(table["layer"], table["head"], strict=True)
    ]
    return Atlas(
        model=model,
        n_layers=n_layers,
        n_heads=n_heads,
        table=table,
        columns=columns,
        provenance=pd.DataFrame(prov),
        role_table=role_table,
        rules=rules,
    )

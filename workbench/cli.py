"""The ``workbench`` command line: a thin layer over the Python API.

Every user error is one line on stderr naming the problem and the fix, exit code 2. Commands
that only read the store (and ``run`` when every part is stored) never import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from workbench.errors import WorkbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Which attention heads do what: run analyses, browse and export results.",
    pretty_exceptions_enable=False,
)


def _echo_table(df: object) -> None:
    import pandas as pd

    assert isinstance(df, pd.DataFrame)
    with pd.option_context(
        "display.max_rows", 200, "display.max_columns", 20, "display.width", 160
    ):
        typer.echo(df.to_string(index=False) if len(df) else "(none)")


@app.command()
def models() -> None:
    """List the named models (offline GGUF models, test models)."""
    import pandas as pd

    from workbench.models.registry import DEFAULT_MODEL, MODELS

    rows = [
        {
            "name": e.name + (" (default)" if e.name == DEFAULT_MODEL else ""),
            "layers": e.n_layers,
            "heads": e.n_heads,
            "source": e.source,
            "description": e.description,
        }
        for e in MODELS.values()
    ]
    _echo_table(pd.DataFrame(rows))
    typer.echo("Any other name (org/model) is loaded from the hub when one is reachable.")


@app.command()
def analyses() -> None:
    """List the registered analyses with their parameters and defaults."""
    from workbench.registry import REGISTRY

    for a in REGISTRY.values():
        typer.echo(f"{a.name}  (default task: {a.default_task})\n  {a.description}")
        if a.reference:
            typer.echo(f"  reference: {a.reference}")
        for p in a.describe_params():
            typer.echo(f"    {p['name']}: {p['type']} = {p['default']!r}  {p['help']}")
        typer.echo("")


@app.command()
def tasks() -> None:
    """List the prompt-set tasks and their parameters."""
    from workbench import params as P
    from workbench.tasks import TASKS

    for t in TASKS.values():
        typer.echo(f"{t.name}: {t.description}")
        for p in P.describe(t.params_cls):
            typer.echo(f"    {p['name']}: {p['type']} = {p['default']!r}  {p['help']}")


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="analysis spec (TOML)")],
    print_tables: Annotated[
        bool, typer.Option("--print", help="print each part's top heads per metric")
    ] = False,
    top: Annotated[int, typer.Option(help="heads per metric with --print")] = 10,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run a spec; parts already in the store are read back, not recomputed."""
    from workbench.registry import get_analysis
    from workbench.results import AnalysisResult
    from workbench.spec import PartOutcome, load_spec, run_spec
    from workbench.store import ResultStore

    loaded = load_spec(spec)

    store = ResultStore()

    def report(outcome: PartOutcome) -> None:
        r = outcome.request
        typer.echo(
            f"{outcome.status:>8}  {outcome.run_id}  {r.analysis} / {r.model} / "
            f"{r.task or get_analysis(r.analysis).default_task}  ({outcome.seconds:.2f}s)"
        )
        stored = store.get(outcome.run_id) if print_tables else None
        if stored is not None:
            result = AnalysisResult.from_stored(stored)
            for metric in result.metrics:
                typer.echo(f"  top {top} heads by {metric}:")
                t = result.top(metric, top)
                t.insert(
                    0, "head_id", [f"L{a}H{b}" for a, b in zip(t["layer"], t["head"], strict=True)]
                )
                typer.echo("    " + t.to_string(index=False).replace("\n", "\n    "))

    outcomes = run_spec(loaded, store=store, progress=progress, on_result=report)
    n_stored = sum(o.status == "stored" for o in outcomes)
    typer.echo(
        f"{len(outcomes)} part(s): {len(outcomes) - n_stored} computed, {n_stored} from the store"
    )


@app.command()
def runs(
    model: Annotated[str | None, typer.Option(help="filter by model")] = None,
    analysis: Annotated[str | None, typer.Option(help="filter by analysis")] = None,
    task: Annotated[str | None, typer.Option(help="filter by task")] = None,
    limit: Annotated[int | None, typer.Option(help="newest N")] = None,
) -> None:
    """List stored runs."""
    from workbench.store import ResultStore

    _echo_table(ResultStore().list_runs(model=model, analysis=analysis, task=task, limit=limit))


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
    metric: Annotated[str | None, typer.Option(help="metric to show")] = None,
    top: Annotated[int, typer.Option(help="heads per metric")] = 10,
    html: Annotated[Path | None, typer.Option(help="write the layer x head figure as HTML")] = None,
) -> None:
    """Show one stored run: its key, manifest and top heads."""
    import json

    from workbench.results import AnalysisResult
    from workbench.store import ResultStore

    store = ResultStore()
    stored = store.get(store.resolve(run_id))
    if stored is None:
        raise WorkbenchError(f"run {run_id} is damaged or gone", "run its spec again")
    result = AnalysisResult.from_stored(stored)
    typer.echo(json.dumps(result.key, indent=2, default=str))
    typer.echo(result.summary(k=top) if metric is None else result.top(metric, top).to_string())
    if html is not None:
        _writable(html)
        result.figure(metric).write_html(str(html), include_plotlyjs="cdn")
        typer.echo(f"wrote {html}")


def _writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise WorkbenchError(
            f"cannot write {path}: folder {parent} does not exist", "create it first"
        )
    import os

    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise WorkbenchError(f"cannot write {path}: permission denied", "choose a writable path")


@app.command()
def export(
    run_ids: Annotated[list[str], typer.Argument(help="one or more run ids (prefixes)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output file")],
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet or json")] = "csv",
    table: Annotated[
        str, typer.Option(help="which table (heads, or another stored table)")
    ] = "heads",
) -> None:
    """Export runs' tables as one tidy CSV / Parquet / JSON file."""
    import pandas as pd

    from workbench.store import ResultStore

    if fmt not in ("csv", "parquet", "json"):
        raise WorkbenchError(f"unknown format '{fmt}'", "use --format csv, parquet or json")
    _writable(output)
    store = ResultStore()
    frames = []
    for rid in run_ids:
        stored = store.get(store.resolve(rid))
        if stored is None:
            raise WorkbenchError(f"run {rid} is damaged or gone", "run its spec again")
        if table not in stored.tables:
            raise WorkbenchError(
                f"run {rid} has no table '{table}'", f"tables: {', '.join(stored.tables)}"
            )
        frames.append(stored.tables[table])
    df = pd.concat(frames, ignore_index=True)
    tmp = output.with_name(f".{output.name}.tmp")
    if fmt == "csv":
        df.to_csv(tmp, index=False)
    elif fmt == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_json(tmp, orient="records", indent=1)
    tmp.replace(output)
    typer.echo(f"wrote {len(df)} rows from {len(frames)} run(s) to {output}")


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="the estimate (e.g. an attribution run)")],
    run_b: Annotated[str, typer.Argument(help="the reference (e.g. an exact patching run)")],
    metric_a: Annotated[str | None, typer.Option(help="metric of run A")] = None,
    metric_b: Annotated[str | None, typer.Option(help="metric of run B")] = None,
    k: Annotated[int, typer.Option(help="top-k for the overlap")] = 10,
) -> None:
    """Agreement of two per-head runs: Spearman, Pearson and top-k overlap."""
    from workbench.compare import compare_runs
    from workbench.store import ResultStore

    out = compare_runs(ResultStore(), run_a, run_b, metric_a=metric_a, metric_b=metric_b, k=k)
    for key, value in out.items():
        typer.echo(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors). Tests call ``main([...])``."""
    try:
        app(args=argv, standalone_mode=False)
    except WorkbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

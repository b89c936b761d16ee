"""The ``workbench`` command line: a thin layer over the Python API.

Every user error is one line on stderr naming the problem and the fix, exit code 2. Commands
that only read the store (and ``run`` when every part is stored) never import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

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

    from workbench.models.known import DEFAULT_MODEL, MODELS

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
    workers: Annotated[
        int, typer.Option(help="run the parts on N local worker processes (0: in this process)")
    ] = 0,
    threads: Annotated[int, typer.Option(help="torch threads per worker with --workers")] = 1,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N or mps for every part (default: spec's)")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 for every part")
    ] = None,
    ray: Annotated[
        str | None, typer.Option(help="run the parts on a Ray cluster: auto or HOST:PORT")
    ] = None,
) -> None:
    """Run a spec; parts already in the store are read back, not recomputed."""
    from workbench.runner import PartOutcome
    from workbench.spec import load_spec, run_spec
    from workbench.store import ResultStore

    loaded = load_spec(spec, device_override=device, dtype_override=dtype)
    store = ResultStore()

    def report(outcome: PartOutcome) -> None:
        typer.echo(
            f"{outcome.status:>8}  {outcome.run_id}  {outcome.part.describe()}  "
            f"({outcome.seconds:.2f}s)"
        )
        result = outcome.result
        if result is not None:
            for metric in result.metrics:
                typer.echo(f"  top {top} heads by {metric}:")
                t = result.top(metric, top)
                t.insert(
                    0, "head_id", [f"L{a}H{b}" for a, b in zip(t["layer"], t["head"], strict=True)]
                )
                typer.echo("    " + t.to_string(index=False).replace("\n", "\n    "))

    if workers < 0 or threads < 1:
        raise WorkbenchError("--workers must be >= 0 and --threads >= 1", "e.g. --workers 2")
    if workers and ray is not None:
        raise WorkbenchError("--workers and --ray exclude each other", "choose one")
    outcomes = run_spec(
        loaded, store=store, progress=progress, read=print_tables, workers=workers,
        threads=threads, ray=ray, on_result=report,
    )  # fmt: skip
    n_stored = sum(o.status == "stored" for o in outcomes)
    typer.echo(
        f"{len(outcomes)} part(s): {len(outcomes) - n_stored} computed, {n_stored} from the store"
    )


@app.command()
def worker(
    exit_when_idle: Annotated[
        bool, typer.Option("--exit-when-idle", help="stop when nothing is queued")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads in this worker")] = None,
    lapse: Annotated[
        float, typer.Option(help="seconds without a heartbeat before a running job is re-queued")
    ] = 30.0,
    store: Annotated[
        Path | None, typer.Option(help="results store root (default: the home's)")
    ] = None,
    parent: Annotated[int | None, typer.Option(help="stop once this process is gone")] = None,
) -> None:
    """Run queued jobs one at a time on models this process keeps loaded."""
    from workbench.jobs.worker import work

    n = work(
        store, exit_when_idle=exit_when_idle, threads=threads, lapse_s=lapse, parent=parent,
        log=typer.echo,
    )  # fmt: skip
    typer.echo(f"worker stopped after {n} job(s)")


@app.command()
def jobs(
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
) -> None:
    """List the jobs of the store: state, progress, worker, heartbeat, error."""
    from workbench.jobs.queue import STATES, JobQueue
    from workbench.store import ResultStore

    if state is not None and state not in STATES:
        raise WorkbenchError(f"unknown job state '{state}'", f"choose from {', '.join(STATES)}")
    df = JobQueue(ResultStore().root).table()
    if state is not None:
        df = df[df["state"] == state]
    cols = ["job_id", "state", "step", "total", "text", "title", "worker", "attempts", "error"]
    _echo_table(df[cols])


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="job id (the run id; a prefix is enough)")],
) -> None:
    """Cancel a queued or running job (a running one stops at its next progress step)."""
    from workbench.jobs.queue import JobQueue
    from workbench.store import ResultStore

    queue = JobQueue(ResultStore().root)
    ids = [j.job_id for j in queue.jobs() if j.job_id.startswith(job_id.strip().lower())]
    if len(ids) != 1:
        raise WorkbenchError(
            f"job id {job_id!r} matches {len(ids)} jobs", "give a unique prefix (`workbench jobs`)"
        )
    job = queue.cancel(ids[0])
    typer.echo(f"job {job.job_id}: {job.state}")


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
    info: Annotated[
        bool, typer.Option("--info", help="also print the run's facts (counts, backend, ...)")
    ] = False,
) -> None:
    """Show one stored run: its key, manifest and top heads."""
    import json

    from workbench.store import ResultStore

    result = ResultStore().load(run_id)
    if info:
        typer.echo("info: " + json.dumps(result.info, indent=2, default=str, sort_keys=True))
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
    output: Annotated[Path, typer.Option("-o", "--output", help="output file")],
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="one or more run ids (prefixes)")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet or json")] = "csv",
    table: Annotated[
        str,
        typer.Option(help="which table (heads, another stored table, or info: the run's facts)"),
    ] = "heads",
    atlas: Annotated[
        str | None,
        typer.Option(help="export the head atlas of this model (one row per head) instead"),
    ] = None,
) -> None:
    """Export runs' tables as one tidy CSV / Parquet / JSON file, or a model's head atlas."""
    from workbench import export as E
    from workbench.store import ResultStore

    E.check_format(fmt)
    if (atlas is None) == (not run_ids):
        raise WorkbenchError(
            "export needs either run ids or --atlas MODEL (not both)",
            "e.g. workbench export RUN_ID -o heads.csv, or workbench export --atlas MODEL -o a.csv",
        )
    _writable(output)
    if atlas is not None:
        from workbench.atlas import build_atlas

        wide = build_atlas(atlas).table
        E.write(wide, output, fmt)
        typer.echo(f"wrote the atlas of {atlas}: {len(wide)} heads x {wide.shape[1]} columns")
        return
    assert run_ids is not None
    df = E.gather(ResultStore(), run_ids, table)
    E.write(df, output, fmt)
    typer.echo(f"wrote {len(df)} rows from {len(run_ids)} run(s) to {output}")


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="the estimate (e.g. an attribution run)")],
    run_b: Annotated[str, typer.Argument(help="the reference (e.g. an exact patching run)")],
    metric_a: Annotated[str | None, typer.Option(help="metric of run A")] = None,
    metric_b: Annotated[str | None, typer.Option(help="metric of run B")] = None,
    k: Annotated[int, typer.Option(help="top-k for the overlap")] = 10,
) -> None:
    """Agreement of two per-head runs: Spearman, Pearson and top-k overlap."""
    from workbench.circuits.agreement import compare_runs
    from workbench.store import ResultStore

    out = compare_runs(ResultStore(), run_a, run_b, metric_a=metric_a, metric_b=metric_b, k=k)
    for key, value in out.items():
        typer.echo(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")


@app.command("atlas")
def atlas_cmd(
    model: Annotated[str, typer.Argument(help="model name (as stored)")],
    column: Annotated[
        str | None, typer.Option(help="one score column: its top heads (and --html figure)")
    ] = None,
    top: Annotated[int, typer.Option(help="heads per column")] = 5,
    html: Annotated[Path | None, typer.Option(help="write the layer x head figure as HTML")] = None,
) -> None:
    """The head atlas: every head's latest stored score per analysis/metric, with roles."""
    from workbench.atlas import build_atlas

    a = build_atlas(model)
    if column is None:
        typer.echo(a.summary(k=top))
        if len(a.role_table):
            typer.echo("roles (rules declared on the analyses' registry entries):")
            for label, n in a.role_table["label"].value_counts(sort=False).items():
                heads = a.role_table[a.role_table["label"] == label]
                pairs = zip(heads["layer"], heads["head"], strict=True)
                names = ", ".join(f"L{x}H{y}" for x, y in pairs)
                typer.echo(f"  {label}: {n} head(s): {names}")
    else:
        _echo_table(a.top(column, top))
    if html is not None:
        _writable(html)
        a.figure(column).write_html(str(html), include_plotlyjs="cdn")
        typer.echo(f"wrote {html}")


@app.command("circuit")
def circuit_cmd(
    run_id: Annotated[str, typer.Argument(help="a stored per-head run (a unique prefix)")],
    rule: Annotated[str, typer.Option(help="top_k, threshold or top_share")] = "top_k",
    k: Annotated[int | None, typer.Option(help="heads for top_k")] = None,
    share: Annotated[float | None, typer.Option(help="share of heads for top_share")] = None,
    threshold: Annotated[float | None, typer.Option(help="score threshold")] = None,
    metric: Annotated[str | None, typer.Option(help="metric of the run")] = None,
    absolute: Annotated[bool, typer.Option(help="rank heads by |score|")] = False,
    save: Annotated[bool, typer.Option(help="store the circuit (prints its run id)")] = False,
) -> None:
    """Derive a circuit from a stored per-head score by a rule, print it (and store it)."""
    from workbench.circuits import derive_circuit, run_scores, save_circuit
    from workbench.store import ResultStore

    store = ResultStore()
    c = derive_circuit(
        store, run_id, rule, metric=metric, k=k, share=share, threshold=threshold,
        absolute=absolute,
    )  # fmt: skip
    scores, _ = run_scores(store, run_id, metric)
    typer.echo(str(c))
    for h in sorted(c.heads, key=lambda h: -abs(scores[h.layer, h.head])):
        typer.echo(f"  {h}  {scores[h.layer, h.head]: .4f}  {c.role_map.get(h, '')}")
    if save:
        typer.echo(f"stored as run {save_circuit(store, c, scores)}")


@app.command("kvplan")
def kvplan_cmd(
    run_id: Annotated[
        str, typer.Argument(help="a stored run with KV-head scores (kv_head_scores, moa_influence)")
    ],
    rule: Annotated[
        str, typer.Option(help="razor, top_k, threshold, quantile or budget")
    ] = "razor",
    metric: Annotated[str, typer.Option(help="the score the other rules rank by")] = "induction",
    column: Annotated[str, typer.Option(help="max, mean or sum over a KV head's queries")] = "max",
    k: Annotated[int, typer.Option(help="top_k: full KV heads")] = 1,
    threshold: Annotated[float, typer.Option(help="threshold: full above it")] = 0.0,
    quantile: Annotated[float, typer.Option(help="quantile: full above it")] = 0.5,
    budget: Annotated[float, typer.Option(help="budget: kv_fraction at --n-ctx")] = 0.3,
    n_ctx: Annotated[int, typer.Option(help="budget: the context length")] = 2048,
    sink: Annotated[int, typer.Option(help="sink tokens of a streaming head")] = 4,
    window: Annotated[int, typer.Option(help="recent tokens of a streaming head")] = 256,
    compensation: Annotated[bool, typer.Option(help="RazorAttention's mean token")] = True,
    output: Annotated[Path | None, typer.Option("-o", help="write the plan as JSON")] = None,
) -> None:
    """A KV-cache plan from stored KV-head scores: which heads keep the full cache; its budget."""
    from workbench.circuits.kvplans import RULES, build_plan, kv_scores, save_plan
    from workbench.store import ResultStore

    if rule not in RULES:
        raise WorkbenchError(f"unknown KV plan rule '{rule}'", f"choose from {', '.join(RULES)}")
    store = ResultStore()
    scored = store.load(run_id)
    if "kv_heads" not in scored.tables:
        raise WorkbenchError(
            f"run {scored.run_id} has no KV-head scores", "give a kv_head_scores run"
        )
    kv = scored.tables["kv_heads"]
    grid = (int(kv["layer"].max()) + 1, int(kv["kv_head"].max()) + 1)
    names = ("induction", "echo") if rule == "razor" else (metric,)
    scores = {m: kv_scores(kv, m, grid, column) for m in names}
    if rule != "razor":
        scores = {"score": scores[metric]}
    native = {int(a): int(b) for a, b in scored.info.get("native_windows", {}).items()}
    extra: dict[str, Any] = {"k": k, "threshold": threshold, "quantile": quantile, "budget": budget,
             "n_ctx": n_ctx}  # fmt: skip
    plan = build_plan(str(scored.key["model"]), rule, scores, sink=sink, window=window,
                      compensation=compensation, native=native, sources=[scored.run_id],
                      **extra)  # fmt: skip
    typer.echo(str(plan))
    typer.echo("full: " + ", ".join(f"L{a}KV{b}" for a, b in sorted(plan.full) if a not in native))
    for n in (512, 1024, 2048, 8192):
        typer.echo(f"  kv_fraction({n}) = {plan.kv_fraction(n):.3f}")
    typer.echo(f"stored as run {save_plan(store, plan)}")
    if output is not None:
        _writable(output)
        output.write_text(plan.to_json())
        typer.echo(f"wrote {output}")


@app.command("overlap")
def overlap_cmd(
    spec: Annotated[Path, typer.Argument(help="a spec with an [overlap] table")],
    html: Annotated[
        Path | None, typer.Option(help="write the overlap matrix (Jaccard) figure as HTML")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run a spec, derive its circuits by one rule, print their overlap (Merullo et al. 2023)."""
    import pandas as pd

    from workbench.circuits.overlap_step import TABLE_COLUMNS, load_step, run_overlap_step
    from workbench.spec import load_spec, run_spec
    from workbench.store import ResultStore

    loaded = load_spec(spec)
    step = load_step(spec)
    store = ResultStore()
    outcomes = run_spec(loaded, store=store, progress=progress)
    report = run_overlap_step(loaded, step, outcomes, store)
    for model, circuits in report.circuits.items():
        typer.echo(f"{model}: circuits ({step.rule}, absolute={step.absolute})")
        for name, c in circuits.items():
            heads = ", ".join(str(h) for h in sorted(c.heads))
            run = report.circuit_runs[model][name]
            typer.echo(f"  {name} [{len(c.heads)} heads, source run {c.derivation.source_run}, "
                       f"stored as {run}]: {heads}")  # fmt: skip
        table = report.results[model].table[list(TABLE_COLUMNS)].round(4)
        for p in ("p_hypergeometric", "p_permutation"):
            table[p] = [f"{v:.3g}" for v in report.results[model].table[p]]
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            typer.echo(table.to_string(index=False))
    if html is not None:
        _writable(html)
        next(iter(report.results.values())).figure("jaccard").write_html(
            str(html), include_plotlyjs="cdn"
        )
        typer.echo(f"wrote {html}")


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

"""A spec's parts on a Ray cluster (``workbench run SPEC --ray auto|ADDRESS``).

Parts go to Ray actors, one per node and resource shape (``num_cpus``, ``num_gpus`` of the
part, from the spec), each keeping its models loaded between parts (a
:class:`~workbench.runner.ModelPool`). An actor resolves the part's request, checks it has the
driver's run id (same code and library versions), computes it, and sends the tables back as
Arrow tables with the run's facts; the driver alone writes them to its results store, through
:func:`workbench.runner.finish_part` (the store's atomic protocol, then the after-store hook),
as every other path does. Inputs an analysis reads from the store are read by the driver and
sent along. Progress from every actor goes to one progress actor the driver shows. A part that
fails for any reason but a :class:`WorkbenchError` (a bad input, which would fail again) is
retried once on a fresh actor, then reported; the driver raises one WorkbenchError naming the
first failure after every part has ended.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from workbench.errors import WorkbenchError

RETRIES = 1


def connect(address: str) -> Any:
    """``ray.init`` on ``address`` ("auto": the cluster this machine runs or ``RAY_ADDRESS``);
    a one-line error for a missing ray, an unreachable address, or no cluster."""
    host, _, port = address.rpartition(":")
    if address != "auto":
        if not port.isdigit():
            raise WorkbenchError(f"bad Ray address '{address}'", "use auto or HOST:PORT")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as e:
            raise WorkbenchError(
                f"cannot reach the Ray cluster at {address} ({e.strerror or e})",
                "start one (ray start --head) or check the address",
            ) from None
    try:
        import ray
        import ray._private.ray_constants as constants
    except ImportError:
        raise WorkbenchError("ray is not installed", "run make setup (the ray extra)") from None
    if host in ("127.0.0.1", "localhost"):
        # a loopback cluster (jobs.cluster): the driver must not swap 127.0.0.1 for the
        # machine's address either; Ray reads this switch when it resolves addresses
        if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
            raise WorkbenchError(
                f"Ray {ray.__version__} lacks ray_constants.ENABLE_RAY_CLUSTER, which a "
                "loopback cluster relies on",
                "install the locked ray (make setup)",
            )
        constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise WorkbenchError(
            f"cannot connect to the Ray cluster at {address} ({str(e).splitlines()[0]})",
            "start one (ray start --head) or check the address",
        ) from None
    return ray


def _actor_classes(ray: Any) -> tuple[Any, Any]:
    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self) -> None:
            self.state: dict[str, tuple[int, int, str]] = {}

        def report(self, run_id: str, done: int, total: int, desc: str) -> None:
            self.state[run_id] = (done, total, desc)

        def get(self) -> dict[str, tuple[int, int, str]]:
            return dict(self.state)

    @ray.remote
    class PartWorker:
        def __init__(self) -> None:
            from workbench.runner import ModelPool

            self.pool = ModelPool()

        def run(self, request: str, run_id: str, inputs: dict[str, Any], progress: Any) -> Any:
            import pyarrow as pa

            from workbench.jobs.queue import request_from_json
            from workbench.progress import reporting
            from workbench.runner import compute

            part = request_from_json(request).resolve()
            if part.run_id != run_id:
                raise WorkbenchError(
                    f"the part resolves to run {part.run_id} on this node, not {run_id}",
                    "run the cluster with the same workbench and library versions",
                )
            last = [0.0]

            def report(desc: str, done: int, total: int) -> None:
                now = time.monotonic()
                if now - last[0] > 0.5 or done == total:
                    last[0] = now
                    progress.report.remote(run_id, done, total, desc)

            model = self.pool.get(part.model, part.device, part.dtype)
            t0 = time.perf_counter()
            with reporting(report):
                tables, info = compute(part, model, None, inputs)
            info["ray_node"] = ray.get_runtime_context().get_node_id()
            arrow = {name: pa.Table.from_pandas(df) for name, df in tables.items()}
            return arrow, info, time.perf_counter() - t0

    return Progress, PartWorker


def run_on_ray(
    parts: Sequence[Any],
    store: Any,
    address: str,
    *,
    title: str = "run",
    progress: bool = True,
    read: bool = False,
    on_result: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Every part computed on the Ray cluster at ``address`` or served from ``store``
    (module docstring); outcomes in the order of ``parts``."""

    from workbench.runner import PartOutcome, serve_stored

    outcomes: dict[str, PartOutcome] = {}
    todo = serve_stored(parts, store, outcomes, read=read, on_result=on_result)
    if todo:
        ray = connect(address)
        try:
            _run(ray, todo, store, outcomes, title, progress, read, on_result)
        finally:
            ray.shutdown()
    failed = [o for o in outcomes.values() if o.status == "failed"]
    if failed:
        raise WorkbenchError(
            f"{len(failed)} of {len(parts)} part(s) failed on Ray; first: "
            f"{failed[0].part.describe()} ({failed[0].error})",
            "fix the part and run the spec again (stored parts are kept)",
        )
    return [outcomes[p.run_id] for p in parts]


def _run(
    ray: Any,
    todo: list[Any],
    store: Any,
    outcomes: dict[str, Any],
    title: str,
    progress: bool,
    read: bool,
    on_result: Callable[[Any], None] | None,
) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm.auto import tqdm

    from workbench.jobs.queue import request_json
    from workbench.runner import PartOutcome, finish_part, part_inputs

    Progress, PartWorker = _actor_classes(ray)
    tracker = Progress.remote()
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    bar = tqdm(total=len(todo), desc=title, unit="part", disable=not progress)
    shapes: dict[tuple[float, float], list[Any]] = {}
    for part in todo:
        shapes.setdefault((part.request.num_cpus, part.request.num_gpus), []).append(part)
    try:
        for (cpus, gpus), group in shapes.items():  # one resource shape at a time

            def actor(node: str, cpus: float = cpus, gpus: float = gpus) -> Any:
                strategy = NodeAffinitySchedulingStrategy(node, soft=False)
                return PartWorker.options(
                    num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy
                ).remote()

            idle = [(actor(n), n) for n in nodes[: len(group)]]
            queue = [(p, 0) for p in group]
            running: dict[Any, tuple[Any, int, Any, str]] = {}
            while queue or running:
                while queue and idle:
                    part, attempt = queue.pop(0)
                    handle, node = idle.pop(0)
                    inputs = part_inputs(part, store)
                    ref = handle.run.remote(
                        request_json(part.request), part.run_id, inputs, tracker
                    )
                    running[ref] = (part, attempt, handle, node)
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                states = ray.get(tracker.get.remote())
                live = [states[p.run_id] for p, *_ in running.values() if p.run_id in states]
                if live:
                    d, t, desc = live[0]
                    bar.set_postfix_str(f"{len(running)} running; {desc} {d}/{t}")
                for ref in done:
                    part, attempt, handle, node = running.pop(ref)
                    try:
                        arrow, info, seconds = ray.get(ref)
                    except Exception as e:
                        cause = getattr(e, "cause", e)
                        if isinstance(cause, WorkbenchError) or attempt >= RETRIES:
                            error = str(cause).strip().splitlines()
                            outcomes[part.run_id] = PartOutcome(
                                part, "failed", 0.0, None, error[0] if error else type(e).__name__
                            )
                            bar.update(1)
                            if on_result is not None:
                                on_result(outcomes[part.run_id])
                        else:
                            queue.append((part, attempt + 1))
                        ray.kill(handle)  # a fresh actor for what comes next on that node
                        idle.append((actor(node), node))
                        continue
                    idle.append((handle, node))
                    tables = {name: t.to_pandas() for name, t in arrow.items()}
                    # the driver's side of the part: stored and its hook run by the runner's
                    # one finish_part (serve_stored already asked whether it may be served)
                    outcome = finish_part(
                        part, store, _computed(tables, info), read=read, serve=False,
                        seconds=seconds,
                    )  # fmt: skip
                    if not read:  # the tables are not kept unless asked for
                        outcome = replace(outcome, result=None)
                    outcomes[part.run_id] = outcome
                    bar.update(1)
                    if on_result is not None:
                        on_result(outcomes[part.run_id])
            for handle, _ in idle:
                ray.kill(handle)
    finally:
        bar.close()


def _computed(tables: dict[str, Any], info: dict[str, Any]) -> Callable[[], tuple[Any, Any]]:
    """An actor's computed part as the ``compute`` that ``finish_part`` calls."""
    return lambda: (tables, info)

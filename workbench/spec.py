"""Batch specs: a TOML list of analyses x models x tasks, run through the registry and store.

```toml
title = "demo"
[defaults]
models = ["smollm2-135m"]     # used where an [[analysis]] names no models
prepend_bos = "auto"          # "auto" follows the tokenizer; true / false override
device = "cpu"                # cpu, cuda, cuda:N, mps (default cpu)
dtype = "float32"             # float32, bfloat16, float16 (default float32; enters the key)
num_cpus = 1                  # what each part asks of a Ray cluster (--ray); num_gpus = 0

[[analysis]]
name = "head_detectors"
tasks = ["induction", { name = "induction", seq_len = 40 }]   # a name, or a table of task params
params = { batch_size = 8 }
```
Loading a spec resolves every part once (analysis, parameters, task, key) and runs nothing;
:func:`run_spec` hands the parts to the runner. Parts already in the store are not recomputed
(resumable: a killed run picks up where it stopped). Parsing and key derivation need no torch.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.runner import Part, PartOutcome, RunRequest, parse_bos, run_parts

_TOP_KEYS = {"title", "description", "defaults", "analysis", "overlap"}  # overlap: overlap_spec
_RESOURCE_KEYS = {"num_cpus", "num_gpus"}
_DEFAULT_KEYS = {"models", "prepend_bos", "device", "dtype", *_RESOURCE_KEYS}
_ANALYSIS_KEYS = {"name", "models", "tasks", "params", "prepend_bos", "device", "dtype",
                  *_RESOURCE_KEYS}  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """A parsed spec: its parts, each resolved once (validated, keyed) when it is loaded."""

    path: Path
    title: str
    parts: tuple[Part, ...]

    @property
    def requests(self) -> tuple[RunRequest, ...]:
        return tuple(p.request for p in self.parts)


def _unknown(where: str, keys: set[str], allowed: set[str]) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise WorkbenchError(
            f"{where}: unknown key(s) {', '.join(extra)}",
            f"allowed keys: {', '.join(sorted(allowed))}",
        )


def _str_list(where: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WorkbenchError(f"{where} must be a string or a list of strings", "fix the spec")
    return list(value)


def load_spec(
    path: str | Path, *, device_override: str | None = None, dtype_override: str | None = None
) -> Spec:
    """Parse and validate a spec file (every part's parameters checked, nothing loaded)."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"spec file not found: {path}", "check the path")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise WorkbenchError(
            f"malformed TOML in {path}: {exc}", "fix the syntax at that line"
        ) from None
    _unknown(str(path), set(data), _TOP_KEYS)
    defaults = data.get("defaults", {})
    _unknown(f"{path} [defaults]", set(defaults), _DEFAULT_KEYS)
    default_models = _str_list(
        f"{path} [defaults] models", defaults.get("models", ["smollm2-135m"])
    )
    entries = data.get("analysis", [])
    if not isinstance(entries, list) or not entries:
        raise WorkbenchError(
            f"{path}: no [[analysis]] entries", "add at least one [[analysis]] table"
        )
    parts: list[Part] = []
    for i, entry in enumerate(entries, 1):
        where = f"{path} [[analysis]] #{i}"
        _unknown(where, set(entry), _ANALYSIS_KEYS)
        if "name" not in entry:
            raise WorkbenchError(
                f"{where}: missing 'name'", "name the analysis (`workbench analyses` lists them)"
            )
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise WorkbenchError(
                f"{where}: params must be a table", "write params = { key = value }"
            )
        bos = parse_bos(entry.get("prepend_bos", defaults.get("prepend_bos", "auto")))
        device = device_override or entry.get("device", defaults.get("device"))
        dtype = dtype_override or entry.get("dtype", defaults.get("dtype"))
        resources = [
            entry.get(k, defaults.get(k, d)) for k, d in (("num_cpus", 1), ("num_gpus", 0))
        ]
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0
                   for r in resources):  # fmt: skip
            raise WorkbenchError(
                f"{where}: num_cpus and num_gpus must be numbers >= 0", "e.g. num_cpus = 1"
            )
        models = _str_list(f"{where} models", entry.get("models", default_models))
        tasks: list[Any] = entry.get("tasks", [None])
        if not isinstance(tasks, list):
            tasks = [tasks]
        for model in models:
            for task in tasks:
                if isinstance(task, dict):
                    task = dict(task)
                    if "name" not in task:
                        raise WorkbenchError(
                            f"{where}: a task table needs 'name'", 'add name = "..."'
                        )
                    name = task.pop("name")
                elif task is None or isinstance(task, str):
                    name, task = task, {}
                else:
                    raise WorkbenchError(
                        f"{where}: tasks entries must be names or tables", "fix the spec"
                    )
                request = RunRequest(
                    entry["name"], model, name, params, task, bos, device, dtype,
                    float(resources[0]), float(resources[1]),
                )  # fmt: skip
                parts.append(request.resolve())  # validated and keyed here, once
    return Spec(path, str(data.get("title", path.stem)), tuple(parts))


def run_spec(
    spec: Spec,
    *,
    store: Any = None,
    progress: bool = True,
    read: bool = False,
    workers: int = 0,
    threads: int | None = 1,
    ray: str | None = None,
    on_result: Callable[[PartOutcome], None] | None = None,
) -> list[PartOutcome]:
    """Run every part of ``spec``: in this process through :func:`workbench.runner.run_parts`,
    or with ``workers`` > 0 on that many local worker processes (``threads`` torch threads
    each; :func:`workbench.jobs.pool.run_on_workers`). Parts already stored are verified, and
    read only with ``read=True``. ``ray``: a Ray cluster's address (or "auto") to run them on
    instead (:func:`workbench.jobs.ray_pool.run_on_ray`)."""
    if ray is not None:
        from workbench.jobs.ray_pool import run_on_ray
        from workbench.store import ResultStore

        return run_on_ray(
            spec.parts, store or ResultStore(), ray, title=spec.title, progress=progress,
            read=read, on_result=on_result,
        )  # fmt: skip
    if workers:
        from workbench.jobs.pool import run_on_workers
        from workbench.store import ResultStore

        return run_on_workers(
            spec.parts, store or ResultStore(), workers, title=spec.title, progress=progress,
            read=read, threads=threads, on_result=on_result,
        )  # fmt: skip
    return run_parts(
        spec.parts, store, title=spec.title, progress=progress, read=read, on_result=on_result
    )

"""The one orchestrator: every run (CLI, specs, the Python API, the app) goes through here.

A :class:`RunRequest` (plain values) is resolved once into an immutable :class:`Part`: the
registry entry, parsed parameters, task and task parameters, and the run key derived from
contents (model fingerprint, analysis, canonical parameters, prompt-recipe hash, code and
library versions), all *before* loading anything. :func:`run_part` runs a part: an intact
stored result is served without importing torch or touching the model (verified once);
otherwise the prompts are built, the entry's function computes, the store writes atomically,
and the entry's after-store hook gets the result just stored. One :class:`~workbench.result.
Result` comes back. :func:`run_parts` runs several with one progress bar.

Every path ends a part through the same two functions, whoever computes it (this process, a
worker, a Ray actor, the app's page): :func:`stored_outcome` is the one decision whether a
stored result may be served (``Part.servable`` and intact in the store), and
:func:`finish_part` the one place a computed part is stored atomically and given to its
entry's after-store hook.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench import __version__
from workbench import params as P
from workbench.errors import WorkbenchError
from workbench.hooks import model_lock
from workbench.provenance import library_versions
from workbench.registry import REGISTRY, get_analysis
from workbench.result import Result, head_table
from workbench.types import Agreement, Analysis, PromptGroups, RunKey, sha256_hex

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.store import ResultStore


def _bos_key(prepend_bos: bool | None) -> str | bool:
    return "auto" if prepend_bos is None else bool(prepend_bos)


def parse_bos(value: Any) -> bool | None:
    """``"auto"``/None follows the tokenizer; booleans override."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise WorkbenchError(f'prepend_bos must be true, false or "auto", got {value!r}', "fix it")


@dataclass(frozen=True)
class RunRequest:
    """What a caller asks for: an analysis on a model and a task, with parameters (plain
    values, as a spec, the CLI, the API or the app gives them). :meth:`resolve` validates it."""

    analysis: str
    model: str
    task: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    task_params: Mapping[str, Any] = field(default_factory=dict)
    prepend_bos: bool | None = None
    device: str | None = None
    dtype: str | None = None
    num_cpus: float = 1.0  # what a part asks of a Ray cluster (not part of the key)
    num_gpus: float = 0.0

    def resolve(self, model_fingerprint: str | None = None) -> Part:
        """The one resolution of this request (registry entry, parsed parameters, task, device
        and dtype, key), without loading a model. ``model_fingerprint``: a loaded model's
        (default: from the name, ``models.known.fingerprint``, keyed by the dtype)."""
        from workbench.models.known import fingerprint
        from workbench.models.precision import check_device, check_dtype, keyed_fingerprint
        from workbench.tasks import parse_params, recipe_hash

        device = check_device(self.device)
        dtype = check_dtype(self.dtype, device)
        entry = get_analysis(self.analysis)
        parsed = entry.parse_params(dict(self.params))
        task = self.task or entry.default_task
        task_params = parse_params(task, dict(self.task_params))
        libraries = {k: v for k, v in library_versions().items() if k != "workbench"}
        data_hash = recipe_hash(task, task_params)
        if entry.data_tasks is not None:
            extra = [recipe_hash(t, tp) for t, tp in entry.data_tasks(parsed)]
            data_hash = sha256_hex(data_hash, *extra) if extra else data_hash
        key = RunKey(
            model=self.model,
            model_fingerprint=model_fingerprint
            or keyed_fingerprint(fingerprint(self.model), dtype),
            analysis=entry.name,
            params={**P.to_dict(parsed), "prepend_bos": _bos_key(self.prepend_bos)},
            task=task,
            data_hash=data_hash,
            code_version=f"{__version__}+{entry.name}.{entry.version}",
            libraries=libraries,
        )
        return Part(self, entry, parsed, task, task_params, key, device, dtype)


@dataclass(frozen=True)
class Part:
    """A resolved request: immutable, everything a run needs but the model. ``checks``: the
    self-checks a run relies on (the hook layout, and those its entry declares)."""

    request: RunRequest
    entry: Analysis
    params: Any
    task: str
    task_params: Any  # the task's parsed parameter instance
    key: RunKey
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def run_id(self) -> str:
        return self.key.run_id

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def checks(self) -> tuple[str, ...]:
        return ("hooks", *self.entry.checks)

    def servable(self) -> bool:
        """Whether a stored result may be served: not when a self-check this run relies on is
        recorded as failed for the model under its library versions (``forward.selfcheck.trusted``;
        then the run is computed, re-running the check first)."""
        from workbench.forward.selfcheck import trusted

        return trusted(self.key.model_fingerprint, dict(self.key.libraries), self.checks)

    def describe(self) -> str:
        return f"{self.entry.name} / {self.model} / {self.task}"


class ModelPool:
    """Loads each model once per process and (device, dtype); the codec follows each
    request's BOS policy."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str], LoadedModel] = {}

    def get(self, name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
        key = (name, device, dtype)
        if key not in self._models:
            from workbench.models.loading import load_model

            self._models[key] = load_model(name, device=device, dtype=dtype)
        return self._models[key]

    def add(self, model: LoadedModel) -> None:
        self._models[(model.name, model.device, model.dtype)] = model

    def clear(self) -> None:
        self._models.clear()


def _with_bos(model: LoadedModel, prepend_bos: bool | None) -> LoadedModel:
    from dataclasses import replace

    from workbench.models.codec import TextCodec, default_prepend_bos

    bos = default_prepend_bos(model.tokenizer) if prepend_bos is None else prepend_bos
    if bos == model.codec.prepend_bos:
        return model
    codec = TextCodec(model.tokenizer, bos, model.codec.n_ctx, model.name)
    return replace(model, codec=codec)


def compute(
    part: Part,
    model: LoadedModel,
    store: ResultStore | None,
    inputs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict]:
    """Build the prompts, run the analysis function, and return (tables, manifest facts).
    ``store``: where the entry's declared ``inputs`` are read (the store the run goes to), unless
    ``inputs`` (:func:`part_inputs`) come with the call (a remote worker has no store).
    Holds the model's lock throughout (``hooks.model_lock``): its self-checks and the analysis
    put hooks on the model, so threads sharing a model run one part at a time."""
    with model_lock(model.bridge):
        return _compute(part, model, part_inputs(part, store) if inputs is None else inputs)


def part_inputs(part: Part, store: ResultStore | None) -> dict[str, Any]:
    """What the part's analysis reads from the store (its entry's ``inputs``), from ``store``."""
    if part.entry.inputs is None:
        return {}
    if store is None:
        raise WorkbenchError(f"{part.describe()} reads stored inputs but has no store", "pass one")
    return part.entry.inputs(part.params, store)


def _compute(part: Part, model: LoadedModel, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    from workbench.forward.selfcheck import require
    from workbench.tasks import build_task

    analysis, parsed, key = part.entry, part.params, part.key
    model = _with_bos(model, part.request.prepend_bos)
    checks = require(model, *part.checks)  # before anything is computed or stored
    t0 = time.perf_counter()
    prompts = build_task(part.task, model.codec, part.task_params)
    _check_prompts(prompts, model)
    prompts = prompts.to(model.device)
    t1 = time.perf_counter()
    fn = analysis.load()
    if isinstance(prompts, PromptGroups) and analysis.task_kind != "groups":
        # lengths differ: one run per length, one result
        from workbench.groups import merge_outputs

        output = merge_outputs(prompts, [fn(model, g, parsed, **inputs) for g in prompts.groups])
    else:
        output = fn(model, prompts, parsed, **inputs)
    _refuse_nan(output, analysis.name)
    t2 = time.perf_counter()
    tables = dict(output.tables)
    if output.head_metrics:
        tables["heads"] = head_table(
            output, model=model.name, run_id=key.run_id, analysis=analysis.name
        )
    info = {
        **output.info,
        "prompt_hash": prompts.content_hash(),
        "n_prompts": prompts.n,
        "prepend_bos": model.codec.prepend_bos,
        "model_description": model.entry.description,
        "device": model.device,
        "dtype": model.dtype,
        "prompt_seconds": t1 - t0,
        "analysis_seconds": t2 - t1,
        # what the ``head`` column indexes, as the entry declares it (``Result.head_axis``)
        "head_axis": analysis.axis(dict(key.params)),
    }
    if checks:
        info.setdefault("self_checks", checks)
    from workbench.models.compat import active

    info["workarounds"] = active()  # upstream breaks worked around (models.compat)
    return tables, info


def _refuse_nan(output: Any, analysis: str) -> None:
    """A per-head metric that is NaN for every head promises numbers it does not hold: a
    one-line error, so nothing is stored."""
    import numpy as np

    for name, metric in output.head_metrics.items():
        mean = np.asarray(metric.mean, dtype=np.float64)
        if mean.size and np.isnan(mean).all():
            raise WorkbenchError(
                f"{analysis}: metric '{name}' is NaN for every head; nothing was stored",
                "check that the prompts give the analysis something to score",
            )


def _check_prompts(prompts: Any, model: LoadedModel) -> None:
    from workbench.types import PromptSet

    if isinstance(prompts, PromptGroups):
        for group in prompts.groups:
            _check_prompts(group, model)
    elif isinstance(prompts, PromptSet):
        vocab = int(model.cfg.d_vocab)
        for name in ("clean", "corrupt", "correct", "incorrect"):
            t = getattr(prompts, name)
            if t.numel() and (int(t.max()) >= vocab or int(t.min()) < 0):
                raise WorkbenchError(
                    f"task '{prompts.task}': {name} token ids out of the vocabulary (size {vocab})",
                    "build the prompts with this model's tokenizer",
                )
        if prompts.seq_len > model.codec.n_ctx:
            raise WorkbenchError(
                f"prompts are {prompts.seq_len} tokens, longer than the model's context "
                f"({model.codec.n_ctx})",
                "use shorter prompts",
            )


@dataclass(frozen=True)
class PartOutcome:
    """How one part went: ``status`` "stored" (served from the store), "computed", or on a
    pool "failed" / "cancelled" (with ``error``); wall ``seconds``; its ``result``, None for a
    stored part the caller did not ask to read (``read=False``: verified, not read)."""

    part: Part
    status: str
    seconds: float
    result: Result | None
    error: str = ""  # the one-line reason of a failed part

    @property
    def run_id(self) -> str:
        return self.part.run_id

    @property
    def request(self) -> RunRequest:
        return self.part.request


def stored_outcome(part: Part, store: ResultStore, *, read: bool = False) -> PartOutcome | None:
    """The one decision whether ``part`` may be served from ``store``: its stored result is
    intact (verified once; read with ``read``) and :meth:`Part.servable` (no self-check it relies
    on is recorded as failed). Returns its "stored" outcome, or None: compute it."""
    t0 = time.perf_counter()
    if not part.servable():
        return None
    if read:
        found = store.get(part.run_id)  # verified and read at once
        if found is None:
            return None
        return PartOutcome(part, "stored", time.perf_counter() - t0, found)
    if not store.has(part.run_id):
        return None
    return PartOutcome(part, "stored", time.perf_counter() - t0, None)


def _declared(analysis: str) -> Agreement | None:
    """An analysis's :class:`~workbench.types.Agreement` declaration (what after-store hooks
    receive to look up theirs and their partner's), or None."""
    entry = REGISTRY.get(analysis)
    return None if entry is None else entry.agreement


def finish_part(
    part: Part,
    store: ResultStore,
    compute: Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]],
    *,
    read: bool = True,
    serve: bool = True,
    seconds: float | None = None,
) -> PartOutcome:
    """The one way a part ends, wherever it is computed: with ``serve``, the stored result when
    :func:`stored_outcome` serves it; otherwise ``compute()`` (tables, manifest facts), stored
    atomically (``ResultStore.put``), and a fresh result given to the entry's after-store hook
    ``after_store(store, result, declared)``. The computed result is returned as stored, never
    read back; a result another process stored first comes back "stored" (no hook).
    ``serve=False``: the caller's :func:`stored_outcome` already said compute (or the stored
    result is not trusted). ``seconds``: the compute time when it was measured elsewhere (a Ray
    actor), else the wall time of ``compute()``."""
    t0 = time.perf_counter()
    if serve:
        served = stored_outcome(part, store, read=read)
        if served is not None:
            return served
    start = time.perf_counter()
    tables, info = compute()
    took = time.perf_counter() - start if seconds is None else seconds
    result = store.put(part.key, tables, info, seconds=took)
    if not result.from_store and part.entry.after_store is not None:
        part.entry.after_store(store, result, _declared)
    status = "stored" if result.from_store else "computed"
    wall = time.perf_counter() - t0 if seconds is None else seconds
    return PartOutcome(part, status, wall, result)


def run_part(
    part: Part, store: ResultStore, pool: ModelPool, *, read: bool = True, serve: bool = True
) -> PartOutcome:
    """The one way a part is run in a process: :func:`finish_part` with the part computed on
    ``pool``'s model (loaded only if it must compute). ``serve=False``: the caller already
    asked :func:`stored_outcome`."""
    return finish_part(
        part,
        store,
        lambda: compute(part, pool.get(part.model, part.device, part.dtype), store),
        read=read,
        serve=serve,
    )


def serve_stored(
    parts: Sequence[Part],
    store: ResultStore,
    outcomes: dict[str, PartOutcome],
    *,
    read: bool = False,
    on_result: Callable[[PartOutcome], None] | None = None,
) -> list[Part]:
    """Record an outcome for every part :func:`stored_outcome` serves from ``store`` (read with
    ``read``); return the parts left to compute (for the pools)."""
    todo = []
    for part in parts:
        served = stored_outcome(part, store, read=read)
        if served is None:
            todo.append(part)
            continue
        outcomes[part.run_id] = served
        if on_result is not None:
            on_result(served)
    return todo


def run_parts(
    parts: Sequence[Part],
    store: ResultStore | None = None,
    *,
    title: str = "run",
    progress: bool = True,
    read: bool = False,
    pool: ModelPool | None = None,
    on_result: Callable[[PartOutcome], None] | None = None,
) -> list[PartOutcome]:
    """:func:`run_part` for each part in order, with one progress bar; torch is imported only
    if something must be computed. Resumable: a killed run picks up where it stopped."""
    from tqdm.auto import tqdm

    from workbench.store import ResultStore

    store = store or ResultStore()
    pool = pool or ModelPool()
    outcomes: list[PartOutcome] = []
    bar = tqdm(parts, desc=title, unit="part", disable=not progress)
    for part in bar:
        bar.set_postfix_str(part.describe())
        outcome = run_part(part, store, pool, read=read)
        outcomes.append(outcome)
        if on_result is not None:
            on_result(outcome)
    return outcomes


def run_analysis(
    analysis: str,
    model: str | LoadedModel,
    task: str | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    task_params: Mapping[str, Any] | None = None,
    prepend_bos: bool | None = None,
    store: ResultStore | None = None,
    pool: ModelPool | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Result:
    """Run (or fetch from the store) one analysis; ``model`` is a name or a loaded model.
    The Python API's entry point: one :class:`RunRequest`, resolved once, run by
    :func:`run_part`."""
    from workbench.store import ResultStore

    pool = pool or ModelPool()
    name = model if isinstance(model, str) else model.name
    if not isinstance(model, str):
        pool.add(model)
    if not isinstance(model, str):  # a loaded model runs where and as it was loaded
        device, dtype = model.device, model.dtype
    request = RunRequest(
        analysis, name, task, dict(params or {}), dict(task_params or {}), prepend_bos,
        device, dtype,
    )  # fmt: skip
    part = request.resolve(None if isinstance(model, str) else model.fingerprint)
    outcome = run_part(part, store or ResultStore(), pool)
    assert outcome.result is not None
    return outcome.result

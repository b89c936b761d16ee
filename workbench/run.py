"""Running one analysis on one model and task, through the results store.

``run_analysis`` derives the run key from contents (model fingerprint, analysis, canonical
parameters, prompt-recipe hash, code version) *before* loading anything; a stored, intact
result is returned without importing torch or touching the model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench import __version__
from workbench import params as P
from workbench.errors import WorkbenchError
from workbench.provenance import library_versions
from workbench.registry import Analysis, get_analysis
from workbench.results import AnalysisResult, head_table
from workbench.types import PromptGroups, RunKey

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
    """One part of a spec: an analysis on a model and a task, with parameters."""

    analysis: str
    model: str
    task: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    task_params: Mapping[str, Any] = field(default_factory=dict)
    prepend_bos: bool | None = None

    def resolve(self) -> tuple[Analysis, Any, str, dict[str, Any]]:
        """Validate everything that can be checked without a model."""
        from workbench.tasks import get_task

        analysis = get_analysis(self.analysis)
        parsed = analysis.parse_params(dict(self.params))
        task = self.task or analysis.default_task
        spec = get_task(task)
        task_parsed: Any = P.from_mapping(
            spec.params_cls, dict(self.task_params), where=f"task '{task}'"
        )
        return analysis, parsed, task, P.to_dict(task_parsed)

    def key(self, model_fingerprint: str | None = None) -> RunKey:
        from workbench.models.registry import fingerprint
        from workbench.tasks import recipe_hash

        analysis, parsed, task, task_params = self.resolve()
        fp = model_fingerprint or fingerprint(self.model)
        params = {**P.to_dict(parsed), "prepend_bos": _bos_key(self.prepend_bos)}
        libraries = {k: v for k, v in library_versions().items() if k != "workbench"}
        return RunKey(
            model=self.model,
            model_fingerprint=fp,
            analysis=analysis.name,
            params=params,
            task=task,
            data_hash=recipe_hash(task, task_params),
            code_version=f"{__version__}+{analysis.name}.{analysis.version}",
            libraries=libraries,
        )

    def servable(self, key: RunKey) -> bool:
        """Whether a stored result of ``key`` may be served: not when a self-check this run
        relies on is recorded as failed for the model under its library versions
        (``models.selfcheck.trusted``; then the run is computed, re-running the check first)."""
        from workbench.models.selfcheck import trusted

        return trusted(key.model_fingerprint, dict(key.libraries), self.checks())

    def checks(self) -> tuple[str, ...]:
        """The self-checks a run of this request relies on: the hook layout (every analysis)
        and those its registry entry declares."""
        return ("hooks", *get_analysis(self.analysis).checks)


class ModelPool:
    """Loads each model once per process; the codec follows each request's BOS policy."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}

    def get(self, name: str) -> LoadedModel:
        if name not in self._models:
            from workbench.models.loading import load_model

            self._models[name] = load_model(name)
        return self._models[name]

    def add(self, model: LoadedModel) -> None:
        self._models[model.name] = model

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
    request: RunRequest, model: LoadedModel, key: RunKey, store: ResultStore | None = None
) -> tuple[dict[str, Any], dict]:
    """Build the prompts, run the analysis function, and return (tables, manifest facts).
    ``store``: where the analysis's declared ``inputs`` are read (default: the default store)."""
    from workbench.models.selfcheck import require
    from workbench.tasks import build_task

    analysis, parsed, task, task_params = request.resolve()
    model = _with_bos(model, request.prepend_bos)
    checks = require(model, *request.checks())  # before anything is computed or stored
    inputs: dict[str, Any] = {}
    if analysis.inputs is not None:
        from workbench.store import ResultStore

        inputs = analysis.inputs(parsed, store if store is not None else ResultStore())
    t0 = time.perf_counter()
    prompts = build_task(task, model.codec, task_params)
    _check_prompts(prompts, model)
    t1 = time.perf_counter()
    fn = analysis.load()
    if isinstance(prompts, PromptGroups):  # lengths differ: one run per length, one result
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
        "prompt_seconds": t1 - t0,
        "analysis_seconds": t2 - t1,
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
) -> AnalysisResult:
    """Run (or fetch from the store) one analysis. ``model`` is a name or a loaded model."""
    from workbench.store import ResultStore

    store = store or ResultStore()
    pool = pool or ModelPool()
    name = model if isinstance(model, str) else model.name
    if not isinstance(model, str):
        pool.add(model)
    request = RunRequest(
        analysis, name, task, dict(params or {}), dict(task_params or {}), prepend_bos
    )
    fp = None if isinstance(model, str) else model.fingerprint
    key = request.key(fp)
    stored = store.get_or_compute(
        key, lambda: compute(request, pool.get(name), key, store), serve=request.servable(key)
    )
    if not stored.from_store:
        after_store(request.analysis, store, stored)
    return AnalysisResult.from_stored(stored)


def after_store(analysis: str, store: ResultStore, stored: Any) -> None:
    """The analysis's declared after-store hook (its registry entry), on the result just
    stored (passed, not read back)."""
    hook = get_analysis(analysis).after_store
    if hook is not None:
        hook(store, stored)

"""The app's caches: the results store, stored results, the loaded model, attention maps, the atlas.

Keyed on plain strings: the model on its name (one model kept at a time, so switching frees the
previous one), stored results on ``(store root, run id)``. Only engine calls happen here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.home import workbench_home
from workbench.result import Result
from workbench.store import ResultStore

MODEL_ENV = "WORKBENCH_APP_MODEL"


def store_root() -> str:
    return str(workbench_home() / "store")


@st.cache_resource(show_spinner=False)
def _store(root: str) -> ResultStore:
    return ResultStore(Path(root))


def store() -> ResultStore:
    return _store(store_root())


class _Absent(Exception):
    """Raised instead of returning "not stored": Streamlit caches values, not exceptions, so a
    run that is absent now (a job still running) is looked up again next time."""


@st.cache_data(show_spinner=False, max_entries=256)
def _stored(root: str, run_id: str) -> tuple[dict, dict, dict[str, pd.DataFrame]]:
    found = _store(root).get(run_id)
    if found is None:
        raise _Absent(run_id)
    return found.key, found.manifest, found.tables


def result(run_id: str) -> Result | None:
    """A stored run as an engine result (cached on the run id once stored; never loads a
    model); None while it is not in the store."""
    try:
        key, manifest, tables = _stored(store_root(), run_id)
    except _Absent:
        return None
    return Result(run_id, key, manifest, tables, from_store=True)


def runs(model: str | None = None) -> pd.DataFrame:
    return store().list_runs(model=model)


@st.cache_data(show_spinner=False, max_entries=32)
def _head_rows(root: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    frames = []
    for rid in run_ids:
        try:
            key, _, tables = _stored(root, rid)
        except _Absent:
            continue
        if "heads" not in tables:
            continue
        heads = tables["heads"].assign(task=key.get("task", ""))
        frames.append(heads)
    if not frames:
        return pd.DataFrame(
            columns=["model", "run_id", "analysis", "metric", "layer", "head", "value", "task"]
        )
    return pd.concat(frames, ignore_index=True)


def head_rows(model: str) -> pd.DataFrame:
    """Every stored per-head row of ``model`` (all runs), with the run's task."""
    listed = runs(model)
    return _head_rows(store_root(), tuple(listed["run_id"]))


def default_model() -> str:
    from workbench.models.known import DEFAULT_MODEL

    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


@st.cache_resource(max_entries=1, show_spinner=False)
def _model(name: str, device: str = "cpu", dtype: str = "float32") -> Any:
    from workbench.models.loading import load_model

    return load_model(name, device=device, dtype=dtype)


def model(name: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """The loaded model (one kept at a time: loading another frees this one)."""
    with st.spinner(f"Loading {name} ({device}, {dtype})…"):
        return _model(name, device, dtype)


def devices() -> list[str]:
    """The devices this machine has (``cpu`` first)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(n))]


def check_model_name(name: str) -> None:
    """WorkbenchError for an unknown model name (without loading anything)."""
    from workbench.models.known import get_entry

    get_entry(name)


@st.cache_data(show_spinner=False, max_entries=16)
def _attention(model_name: str, text: str, layer: int) -> Any:
    from workbench.attention import attention_map

    return attention_map(_model(model_name), text, layer)


def attention(model_name: str, text: str, layer: int) -> Any:
    """The attention map of every head of ``layer`` on ``text`` (cached on the three)."""
    from workbench.attention import encode

    if not text.strip():
        raise WorkbenchError("the prompt is empty", "type a prompt")
    encode(model(model_name), text)  # bad prompts raise here, before the cache
    with st.spinner("Computing attention…"):
        return _attention(model_name, text, int(layer))


@st.cache_data(show_spinner=False, max_entries=8)
def _atlas(root: str, model_name: str, run_ids: tuple[str, ...]) -> Any:
    from workbench.atlas import build_atlas

    try:
        return build_atlas(model_name, store=_store(root))
    except WorkbenchError:
        return None  # no per-head results of this model


def atlas(model_name: str) -> Any:
    """The engine's atlas of ``model_name`` (None when the store has no per-head result);
    cached on the model's stored run ids, so a new run rebuilds it."""
    listed = runs(model_name)
    return _atlas(store_root(), model_name, tuple(listed["run_id"]))


# ---- jobs ------------------------------------------------------------------------------------

WORKERS_ENV = "WORKBENCH_APP_WORKERS"


def n_workers() -> int:
    """Worker processes the app runs jobs on (``$WORKBENCH_APP_WORKERS``; ``make app`` sets 1;
    0: runs compute inside the page, as a notebook would)."""
    try:
        return max(0, int(os.environ.get(WORKERS_ENV, "0")))
    except ValueError:
        return 0


@st.cache_resource(show_spinner=False)
def _pool(root: str, n: int) -> list[Any]:
    """The app's worker processes (children of the server: they stop when it stops)."""
    from workbench.jobs.pool import start_worker

    return [start_worker(root, threads=1, idle_exit=False) for _ in range(n)]


@st.cache_resource(show_spinner=False)
def _job_queue(root: str) -> Any:
    from workbench.jobs.queue import JobQueue

    return JobQueue(Path(root))  # creates the table once, not on every page refresh


def job_queue() -> Any:
    """The store's job table, with the app's worker pool running on it."""
    if n_workers():
        procs = _pool(store_root(), n_workers())
        for i, p in enumerate(procs):  # a worker that died (killed, crashed) is replaced
            if p.poll() is not None:
                from workbench.jobs.pool import start_worker

                procs[i] = start_worker(store_root(), threads=1, idle_exit=False)
    return _job_queue(store_root())


@st.cache_resource(show_spinner=False)
def _starter_parts(model_name: str) -> list[Any]:
    """The starter spec's parts for ``model_name``, resolved once (hashing task data files)."""
    from workbench.home import specs_dir
    from workbench.runner import RunRequest
    from workbench.spec import load_spec

    spec = load_spec(specs_dir() / "starter.toml")
    return [
        RunRequest(r.analysis, model_name, r.task, r.params, r.task_params, r.prepend_bos).resolve()
        for r in spec.requests
    ]


def starter(model_name: str) -> list[str]:
    """On a store with nothing for ``model_name``, queue the starter spec's parts for it
    (``analyses/starter.toml``) once; returns the run ids of the starter parts."""
    parts = _starter_parts(model_name)
    queue = job_queue()
    if runs(model_name).empty and not any(queue.get(p.run_id) for p in parts):
        for part in parts:
            queue.submit(part)
    return [p.run_id for p in parts]

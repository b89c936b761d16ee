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


@st.cache_data(show_spinner=False, max_entries=256)
def _stored(root: str, run_id: str) -> tuple[dict, dict, dict[str, pd.DataFrame]] | None:
    found = _store(root).get(run_id)
    if found is None:
        return None
    return found.key, found.manifest, found.tables


def result(run_id: str) -> Result | None:
    """A stored run as an engine result (cached on the run id; never loads a model)."""
    got = _stored(store_root(), run_id)
    if got is None:
        return None
    key, manifest, tables = got
    return Result(run_id, key, manifest, tables, from_store=True)


def runs(model: str | None = None) -> pd.DataFrame:
    return store().list_runs(model=model)


@st.cache_data(show_spinner=False, max_entries=32)
def _head_rows(root: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    frames = []
    for rid in run_ids:
        got = _stored(root, rid)
        if got is None or "heads" not in got[2]:
            continue
        key, _, tables = got
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
def _model(name: str) -> Any:
    from workbench.models.loading import load_model

    return load_model(name)


def model(name: str) -> Any:
    """The loaded model (one kept at a time: loading another frees this one)."""
    with st.spinner(f"Loading {name}…"):
        return _model(name)


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

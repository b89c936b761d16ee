"""Shared pieces of the app's pages: the store, the model cache, result caches, widgets.

The app only calls the engine (``workbench``) and draws what it returns. Caches are keyed on
plain strings: the model on its name (one model kept at a time, so switching frees the previous
one), stored results on ``(store root, run id)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.home import workbench_home
from workbench.results import AnalysisResult
from workbench.store import ResultStore

MODEL_ENV = "WORKBENCH_APP_MODEL"
EXAMPLE_PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "A B C D E F A B C D E F",
)


# ---- errors ---------------------------------------------------------------------------------


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Show a :class:`WorkbenchError` as one ``st.error`` line instead of a traceback."""
    try:
        yield
    except WorkbenchError as exc:
        st.error(f"**{exc.problem}**" + (f" — {exc.fix}" if exc.fix else ""))
        st.stop()


# ---- store and results -----------------------------------------------------------------------


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


def result(run_id: str) -> AnalysisResult | None:
    """A stored run as an engine result (cached on the run id; never loads a model)."""
    got = _stored(store_root(), run_id)
    if got is None:
        return None
    key, manifest, tables = got
    return AnalysisResult(run_id, key, manifest, tables, from_store=True)


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


# ---- models ---------------------------------------------------------------------------------


def default_model() -> str:
    from workbench.models.registry import DEFAULT_MODEL

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
    from workbench.models.registry import get_entry

    get_entry(name)


def sidebar_model() -> str:
    """The model picker shared by every page (kept in session state and the URL)."""
    from workbench.models.registry import MODELS

    if "model_name" not in st.session_state:
        st.session_state.model_name = st.query_params.get("model") or default_model()
    names = list(dict.fromkeys([*MODELS, st.session_state.model_name]))
    choice = st.sidebar.selectbox(
        "Model", [*names, "other…"], index=names.index(st.session_state.model_name)
    )
    if choice == "other…":
        typed = st.sidebar.text_input("Model name (org/model)", key="other_model").strip()
        if not typed:
            st.sidebar.info("Type a model name.")
            st.stop()
        choice = typed
    with friendly_errors():
        check_model_name(choice)
    st.session_state.model_name = choice
    st.sidebar.caption(f"Store: `{store_root()}`")
    return choice


def page(title: str) -> str:
    """Page set-up: wide layout, title, the model picker; returns the model name."""
    with contextlib.suppress(st.errors.StreamlitAPIException):
        st.set_page_config(page_title=f"workbench · {title}", layout="wide")
    st.title(title)
    return sidebar_model()


def head_link(layer: int, head: int) -> None:
    """Open the Head page on ``L{layer}H{head}``."""
    st.session_state.head = (int(layer), int(head))
    st.switch_page("pages/2_Head.py", query_params={"layer": str(layer), "head": str(head)})


# ---- parameter widgets -----------------------------------------------------------------------


def _parse_text(text: str, tp: Any) -> Any:
    """A free-text parameter: JSON if it parses, else comma-separated items for tuples."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "tuple" in str(tp) or "," in text:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [int(t) if t.lstrip("-").isdigit() else t for t in items]
    return text


def param_widgets(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """One widget per field of a parameter dataclass, defaults filled in; returns the values
    that differ from the defaults (the engine fills and validates the rest)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        label, help_ = f.name, f.metadata.get("help") or None
        key = f"{prefix}.{f.name}"
        if typing.get_origin(tp) is typing.Literal:
            options = list(typing.get_args(tp))
            value = st.selectbox(label, options, index=options.index(default), key=key, help=help_)
        elif tp is bool:
            value = st.checkbox(label, value=bool(default), key=key, help=help_)
        elif tp is int:
            value = int(st.number_input(label, value=int(default), step=1, key=key, help=help_))
        elif tp is float:
            value = float(st.number_input(label, value=float(default), key=key, help=help_))
        elif tp is str:
            value = st.text_input(label, value=str(default), key=key, help=help_)
        else:
            shown = (
                ""
                if default is None
                else json.dumps(list(default) if isinstance(default, tuple) else default)
            )
            text = st.text_input(label, value=shown, key=key, help=(help_ or "") + " (JSON)")
            value = default if text.strip() == shown else _parse_text(text, tp)
            if text.strip() == "" and default is not None:
                value = None
        if value != default and not (isinstance(default, tuple) and list(default) == value):
            out[f.name] = value
    return out


def custom_prompt_file(clean: str, corrupt: str, correct: str, incorrect: str) -> str:
    """Write the typed clean/corrupt pairs (one per line) to a JSONL file named by its content
    under the workbench home; returns its path for the ``custom`` task."""
    import hashlib

    cleans = [c for c in clean.splitlines() if c.strip()]
    corrupts = [c for c in corrupt.splitlines() if c.strip()]
    if not cleans or not corrupts:
        raise WorkbenchError("the clean or corrupted prompt is empty", "type both prompts")
    if len(cleans) != len(corrupts):
        raise WorkbenchError(
            f"{len(cleans)} clean prompt(s) but {len(corrupts)} corrupted",
            "give one corrupted prompt per clean prompt (one per line)",
        )
    if not correct or not incorrect:
        raise WorkbenchError("an answer is empty", "type the correct and the incorrect answer")
    lines = [
        json.dumps({"clean": a, "corrupt": b, "correct": correct, "incorrect": incorrect})
        for a, b in zip(cleans, corrupts, strict=True)
    ]
    text = "\n".join(lines) + "\n"
    folder = workbench_home() / "app" / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


# ---- showing a result ------------------------------------------------------------------------


def show_result(res: AnalysisResult, key: str = "res") -> None:
    """Per-head heatmaps, layer x position grids and the other tables of one result."""
    from workbench.figures import grid_components, layer_position_figure

    k = res.key
    st.caption(
        f"run `{res.run_id}` · {k.get('analysis')} on {k.get('model')} / {k.get('task')} · "
        "in the store"
        + (f" · {res.manifest.get('seconds') or 0:.2f} s compute" if res.manifest else "")
    )
    metrics = [m for m in res.metrics if res.heads[res.heads["metric"] == m]["value"].notna().any()]
    if metrics:
        metric = st.selectbox("Per-head metric", metrics, key=f"{key}.metric")
        fig = res.figure(metric)
        fig.update_layout(height=min(900, 220 + 18 * int(res.heads["layer"].max() + 1)))
        st.plotly_chart(fig, key=f"{key}.fig")
        st.dataframe(res.top(metric, 10), hide_index=True)
    for name, table in res.tables.items():
        if name == "heads":
            continue
        comps = grid_components(table)
        if comps:
            comp = st.selectbox(f"{name}: component", comps, key=f"{key}.{name}.comp")
            st.plotly_chart(
                layer_position_figure(table, comp, title=str(k.get("analysis"))),
                key=f"{key}.{name}.fig",
            )
        with st.expander(f"table `{name}` ({len(table)} rows)"):
            st.dataframe(table, hide_index=True)


# ---- attention -------------------------------------------------------------------------------


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


def prompt_picker(key: str) -> str:
    """A prompt: one of the examples or typed."""
    example = st.selectbox("Example prompt", ["(type your own)", *EXAMPLE_PROMPTS], key=f"{key}.ex")
    start = EXAMPLE_PROMPTS[0] if example == "(type your own)" else example
    return str(st.text_area("Prompt", value=start, key=f"{key}.text.{example}"))


# ---- atlas -----------------------------------------------------------------------------------


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

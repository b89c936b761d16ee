"""The app's widgets: the page frame and model picker, error lines, parameter forms built on
``workbench.params.describe``, the prompt picker. Only Streamlit and engine descriptions here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import caches
import streamlit as st

from workbench import params as P
from workbench.errors import WorkbenchError

EXAMPLE_PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "A B C D E F A B C D E F",
)


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Show a :class:`WorkbenchError` as one ``st.error`` line instead of a traceback."""
    try:
        yield
    except WorkbenchError as exc:
        st.error(f"**{exc.problem}**" + (f" — {exc.fix}" if exc.fix else ""))
        st.stop()


def sidebar_model() -> str:
    """The model picker shared by every page (kept in session state and the URL)."""
    from workbench.models.known import MODELS

    if "model_name" not in st.session_state:
        st.session_state.model_name = st.query_params.get("model") or caches.default_model()
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
        caches.check_model_name(choice)
    st.session_state.model_name = choice
    st.sidebar.caption(f"Store: `{caches.store_root()}`")
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


def _parse_text(text: str, type_text: str) -> Any:
    """A free-text parameter: JSON if it parses, else comma-separated items for tuples."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "tuple" in type_text or "list" in type_text or "," in text:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [int(t) if t.lstrip("-").isdigit() else t for t in items]
    return text


def param_widgets(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """One widget per parameter of a schema (``params.describe``), defaults filled in; returns
    the values that differ from the defaults (the engine fills and validates the rest)."""
    out: dict[str, Any] = {}
    for row in P.describe(cls):
        name, default, kind = row["name"], row["default"], row["kind"]
        if name in skip:
            continue
        label, help_, key = name, row["help"] or None, f"{prefix}.{name}"
        if kind == "choice":
            options = list(row["choices"])
            value = st.selectbox(label, options, index=options.index(default), key=key, help=help_)
        elif kind == "bool":
            value = st.checkbox(label, value=bool(default), key=key, help=help_)
        elif kind == "int":
            value = int(st.number_input(label, value=int(default), step=1, key=key, help=help_))
        elif kind == "float":
            value = float(st.number_input(label, value=float(default), key=key, help=help_))
        elif kind == "str":
            value = st.text_input(label, value=str(default), key=key, help=help_)
        else:
            shown = (
                ""
                if default is None
                else json.dumps(list(default) if isinstance(default, tuple) else default)
            )
            text = st.text_input(label, value=shown, key=key, help=(help_ or "") + " (JSON)")
            value = default if text.strip() == shown else _parse_text(text, row["type"])
            if text.strip() == "" and default is not None:
                value = None
        if value != default and not (isinstance(default, tuple) and list(default) == value):
            out[name] = value
    return out


def prompt_picker(key: str) -> str:
    """A prompt: one of the examples or typed."""
    example = st.selectbox("Example prompt", ["(type your own)", *EXAMPLE_PROMPTS], key=f"{key}.ex")
    start = EXAMPLE_PROMPTS[0] if example == "(type your own)" else example
    return str(st.text_area("Prompt", value=start, key=f"{key}.text.{example}"))


def stored_run(model_name: str, analysis: str, label: str, key: str, empty: str) -> Any:
    """Pick a stored run of ``analysis`` for the model (newest first as the catalog lists
    them) and return its result; without one, ``st.info(empty)`` and the page stops."""
    listed = caches.runs(model_name)
    runs = listed[listed["analysis"] == analysis] if not listed.empty else listed
    if runs.empty:
        st.info(empty)
        st.stop()
    tasks = dict(zip(runs["run_id"], runs["task"], strict=True))
    run_id = st.selectbox(label, list(tasks), format_func=lambda r: f"{r} · {tasks[r]}", key=key)
    res = caches.result(run_id)
    if res is None:
        st.warning("That run is not in the store any more.")
        st.stop()
    return res

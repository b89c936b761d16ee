"""Parameter schemas: a frozen dataclass per analysis or task, validated from plain dicts.

``from_mapping(Params, {"n_seqs": 8})`` fills defaults, rejects unknown keys and ill-typed
values with a one-line :class:`WorkbenchError`, and ``to_dict`` gives the canonical form that
enters the run key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from workbench.errors import WorkbenchError

P = TypeVar("P")


def _allowed(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out: tuple[Any, ...] = ()
        for a in typing.get_args(tp):
            out += _allowed(a)
        return out
    if origin is typing.Literal:
        return (("literal", typing.get_args(tp)),)
    return (tp,)


def _coerce(name: str, value: Any, tp: Any, where: str) -> Any:
    for allowed in _allowed(tp):
        if isinstance(allowed, tuple) and allowed[0] == "literal":
            if value in allowed[1]:
                return value
            continue
        if allowed is type(None) and value is None:
            return None
        if allowed is bool and isinstance(value, bool):
            return value
        if allowed is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if allowed is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if allowed is str and isinstance(value, str):
            return value
        if typing.get_origin(allowed) in (tuple, list) and isinstance(value, (list, tuple)):
            (inner, *_rest) = typing.get_args(allowed) or (Any,)
            if inner is Any:
                return tuple(value)
            return tuple(_coerce(name, v, inner, where) for v in value)
    expected = " | ".join(_describe(a) for a in _allowed(tp))
    raise WorkbenchError(
        f"{where}: parameter '{name}' must be {expected}, got {value!r}",
        "fix its value",
    )


def _describe(a: Any) -> str:
    if isinstance(a, tuple) and a and a[0] == "literal":
        return "one of " + ", ".join(repr(x) for x in a[1])
    if a is type(None):
        return "none"
    return getattr(a, "__name__", str(a))


def from_mapping(cls: type[P], values: Mapping[str, Any] | None, where: str = "parameters") -> P:
    """Build ``cls`` from ``values``: defaults filled in, unknown keys and bad types rejected."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise WorkbenchError(
            f"{where}: unknown parameter(s) {', '.join(unknown)}",
            f"known parameters are: {', '.join(fields) or '(none)'}",
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(k, v, hints[k], where) for k, v in values.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(params: Any) -> dict[str, Any]:
    """Canonical plain-dict form (tuples become lists so it round-trips through JSON)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _kind(tp: Any) -> tuple[str, tuple[Any, ...]]:
    """How a value of ``tp`` is entered: ``choice`` (with its choices), ``bool``, ``int``,
    ``float``, ``str``, or ``json`` (anything else: tuples, unions)."""
    if typing.get_origin(tp) is typing.Literal:
        return "choice", typing.get_args(tp)
    for simple in (bool, int, float, str):
        if tp is simple:
            return simple.__name__, ()
    return "json", ()


def describe(cls: type) -> list[dict[str, Any]]:
    """One row per parameter: ``name``, ``type`` (as text), ``default``, ``help`` (from field
    metadata), and how a form enters it: ``kind`` and ``choices`` (see :func:`_kind`)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        kind, choices = _kind(hints[f.name])
        rows.append(
            {
                "name": f.name,
                "type": " | ".join(_describe(a) for a in _allowed(hints[f.name])),
                "default": default,
                "help": f.metadata.get("help", ""),
                "kind": kind,
                "choices": choices,
            }
        )
    return rows


def check_batch(name: str, batch_size: int) -> None:
    """Refuse a batch size below 1 (one line naming the analysis)."""
    if batch_size < 1:
        raise WorkbenchError(f"{name}: batch_size must be >= 1", "set batch_size = 8")

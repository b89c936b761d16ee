"""Progress of long analyses, without tying the engine to tqdm or Streamlit.

An analysis wraps its outer loop in :func:`steps`; whoever runs it chooses where progress goes:

- nothing set: a tqdm bar on stderr when stderr is a terminal (silent otherwise);
- inside ``with reporting(callback):`` every step calls ``callback(desc, done, total)``
  (the app draws a Streamlit progress bar from it; tests record the calls).

The callback lives in a context variable, so concurrent runs in one process do not mix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
Callback = Callable[[str, int, int], None]

_callback: ContextVar[Callback | None] = ContextVar("workbench_progress", default=None)


@contextmanager
def reporting(callback: Callback | None) -> Iterator[None]:
    """Send every :func:`steps` update inside the block to ``callback(desc, done, total)``."""
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


def steps(items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """Yield ``items`` unchanged, reporting ``(desc, done, total)`` after each one."""
    seq = list(items) if total is None else items
    n = len(seq) if total is None else total  # type: ignore[arg-type]
    callback = _callback.get()
    if callback is None:
        from tqdm.auto import tqdm

        yield from tqdm(seq, total=n, desc=desc, leave=False, disable=not sys.stderr.isatty())
        return
    callback(desc, 0, n)
    for done, item in enumerate(seq, start=1):
        yield item
        callback(desc, done, n)

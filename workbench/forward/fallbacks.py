"""Slower exact paths taken instead of a fast one, printed once per model and kind.

A fast path that cannot be used on a model (a self-check's fallback, or a sweep that had to
recompute every position) stays exact by taking a slower path; the run records it in its info
(``fallbacks``) and :func:`note` prints it once per (model fingerprint, kind) in a process.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

log = logging.getLogger("workbench.forward.selfcheck")
_lock = threading.Lock()
_printed: set[tuple[str, str]] = set()


def note(model: LoadedModel, what: str, text: str) -> None:
    """Print a fallback to a slower exact path once per model and kind (it is also recorded
    in the run's info by the caller)."""
    key = (model.fingerprint, what)
    with _lock:
        if key in _printed:
            return
        _printed.add(key)
    log.warning("%s on %s: %s", what, model.name, text)


def clear() -> None:
    """Forget what was printed (tests)."""
    with _lock:
        _printed.clear()

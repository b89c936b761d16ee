"""Library versions a result depends on, and the versions the committed lock file pins.

Read from installed package metadata (``importlib.metadata``): nothing is imported, so a store
hit still needs neither torch nor transformers. ``LIBRARIES`` enter every run key and every
manifest; the lock (``requirements.lock`` at the repository root, written by ``make lock``) is
what a fresh ``make setup`` installs and what the self-checks name when they fail.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "transformer-lens")
"""The libraries whose internals the fast paths rely on (with the workbench itself)."""

LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"
_PIN = re.compile(r"^#?\s*([A-Za-z0-9_.\-]+)==([^\s;\\]+)")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def library_versions() -> dict[str, str]:
    """``{torch, transformers, transformer-lens, workbench}`` -> installed version."""
    from workbench import __version__

    return {**{name: _version(name) for name in LIBRARIES}, "workbench": str(__version__)}


def versions_text(versions: dict[str, str]) -> str:
    """``torch 2.13.0+cpu, transformers 5.23.0, ...`` (one line)."""
    return ", ".join(f"{k} {v}" for k, v in versions.items())


@functools.cache
def locked_versions() -> dict[str, str]:
    """The lock's pins of :data:`LIBRARIES` (empty when no lock file ships with this install).

    torch is installed before the lock (the CPU wheel); the lock records its pin in a comment
    line ``# torch==...``, which is read as a pin too."""
    if not LOCK_FILE.is_file():
        return {}
    pins: dict[str, str] = {}
    for line in LOCK_FILE.read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line.strip())
        if m and m.group(1).lower() in LIBRARIES:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def lock_mismatch() -> dict[str, tuple[str, str]]:
    """``{library: (installed, locked)}`` for every locked library installed at another version."""
    have = library_versions()
    return {k: (have[k], v) for k, v in locked_versions().items() if have.get(k) != v}

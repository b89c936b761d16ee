"""Where the workbench keeps its files (results store, converted models, caches) and where its
shipped data is."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    """``$WORKBENCH_HOME`` if set, else ``~/.cache/workbench``; created on first use."""
    env = os.environ.get("WORKBENCH_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "workbench"
    home.mkdir(parents=True, exist_ok=True)
    return home


def data_dir() -> Path:
    """The shipped data directory: ``$WORKBENCH_DATA_DIR`` if set, else ``<repo>/data``."""
    override = os.environ.get("WORKBENCH_DATA_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "data"


def specs_dir() -> Path:
    """The shipped runnable specs (``<repo>/analyses``)."""
    return Path(__file__).resolve().parents[1] / "analyses"

"""Where the workbench keeps its files (results store, converted models, caches)."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    """``$WORKBENCH_HOME`` if set, else ``~/.cache/workbench``; created on first use."""
    env = os.environ.get("WORKBENCH_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "workbench"
    home.mkdir(parents=True, exist_ok=True)
    return home

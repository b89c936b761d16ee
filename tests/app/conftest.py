"""What the single-page AppTest files share: a fresh ``$WORKBENCH_HOME`` on the tiny model with
the app's modules importable (and forgotten afterwards), and opening one page."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

APP = Path(__file__).resolve().parents[2] / "app"
MODEL = "tiny-llama"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", MODEL)
    monkeypatch.syspath_prepend(str(APP))
    yield tmp_path
    for name in ("caches", "widgets", "views"):
        sys.modules.pop(name, None)


def open_page(page: str, timeout: int = 120) -> Any:
    """``pages/{page}.py`` under AppTest, run once."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP / "Home.py"), default_timeout=timeout)
    at.switch_page(f"pages/{page}.py")
    return at.run()

"""Shared fixtures: models are loaded once per session and handed out read-only.

Tiers: unit tests use tiny random models and the trained toy model (no download); tests marked
``models`` use the real de-quantised SmolLM2-135M and Gemma 3 270M (converted-weights cache
under ``$WORKBENCH_HOME``).
"""

from __future__ import annotations

import random

import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def load():
    """``load(name)``: a session-wide cache of loaded models."""
    from workbench.runner import ModelPool

    pool = ModelPool()
    return pool.get


@pytest.fixture(scope="session")
def smollm2(load):
    return load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3(load):
    return load("gemma3-270m")


@pytest.fixture(scope="session")
def toy(load):
    return load("toy-induction")


@pytest.fixture()
def store(tmp_path):
    from workbench.store import ResultStore

    return ResultStore(tmp_path / "store")

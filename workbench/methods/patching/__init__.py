"""Activation patching, exact and fast (see :mod:`workbench.methods.patching.analysis`).

Importing this package (or its ``schemas``) does not import torch, so the registry and the CLI
can list the parameters; ``activation_patching`` is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from workbench.methods.patching.schemas import ActivationPatchingParams

__all__ = ["ActivationPatchingParams", "activation_patching", "first_diff_position"]


def __getattr__(name: str) -> Any:
    if name in ("activation_patching", "first_diff_position"):
        from workbench.methods.patching import analysis

        return getattr(analysis, name)
    raise AttributeError(name)

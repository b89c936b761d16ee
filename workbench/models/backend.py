"""CPU backend for the fast paths' matrix products: oneDNN where it beats the default BLAS.

PyTorch's fp32 ``nn.Linear`` on x86 CPUs calls MKL's ``sgemm``. On AMD CPUs MKL takes its AVX2
code path even where the CPU has full-width AVX-512 (e.g. AMD Zen 5), while oneDNN, which PyTorch
also ships, dispatches on the instruction set and uses it: on this project's 2-core AMD EPYC
machine a ``[2048, 576] x [576, 1536]`` product runs at ~80 GMAC/s through MKL and ~175 through
oneDNN.

:func:`fast_linears` routes every fp32 CPU ``nn.Linear`` inside a module through oneDNN
(``torch.ops.mkldnn._linear_pointwise``, ``y = x W^T + b``) for the duration of a ``with`` block,
where a one-time calibration on this machine finds oneDNN at least :data:`MIN_GAIN` times faster
(never on CUDA, never for inputs that need gradients: the op has no backward). It is the same
fp32 arithmetic in another summation order, so results differ at fp32 rounding level only
(``tests/test_backend.py`` bounds it against float64 and the patching sweep against
TransformerLens). ``WORKBENCH_LINEAR_BACKEND=default|onednn|auto`` (default ``auto``) overrides the
choice; the reference implementations never use it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from workbench.errors import WorkbenchError

MIN_GAIN = 1.2
"""oneDNN is used under ``auto`` only if calibration finds it this many times faster."""

MIN_OUTPUTS = 4096
"""Products with fewer output elements (rows x out features; e.g. one decoding step through a
narrow projection) stay on the default BLAS, whose per-call overhead is lower."""

_CHOICE: dict[str, bool] = {}
T = TypeVar("T")


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # type: ignore[no-any-return]


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear op."""
    ok = bool(torch.backends.mkldnn.is_available())
    return ok and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _time(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def calibrate(m: int = 1024, k: int = 576, n: int = 1536) -> tuple[float, float]:
    """Best-of-5 seconds of one ``[m, k] x [k, n]`` fp32 product: (default BLAS, oneDNN)."""
    with torch.inference_mode():
        x, w = torch.randn(m, k), torch.randn(n, k)
        return _time(lambda: torch.nn.functional.linear(x, w)), _time(
            lambda: _onednn_linear(x, w, None)
        )


def use_onednn() -> bool:
    """The backend choice for this process (see the module docstring); calibrated once."""
    mode = os.environ.get("WORKBENCH_LINEAR_BACKEND", "auto").strip().lower()
    if mode not in ("auto", "default", "onednn"):
        raise WorkbenchError(
            f"WORKBENCH_LINEAR_BACKEND={mode!r} is not a linear backend",
            "unset it or set it to auto, default or onednn",
        )
    if mode == "default" or not onednn_available():
        return False
    if mode == "onednn":
        return True
    if "auto" not in _CHOICE:
        try:
            blas, dnnl = calibrate()
            _CHOICE["auto"] = dnnl * MIN_GAIN <= blas
        except RuntimeError:  # the op exists but this CPU/build cannot run it
            _CHOICE["auto"] = False
    return _CHOICE["auto"]


def _forward(lin: nn.Linear) -> Callable[[Tensor], Tensor]:
    default = nn.Linear.forward.__get__(lin)

    def forward(x: Tensor) -> Tensor:
        w, b = lin.weight, lin.bias
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or x.numel() // max(1, x.shape[-1]) * w.shape[0] < MIN_OUTPUTS
        ):
            return default(x)  # type: ignore[no-any-return]
        return _onednn_linear(x, w, b)

    return forward


def on_fast_linears(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run ``fn(model, ...)`` inside ``fast_linears(model.bridge)``."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> T:
        with fast_linears(model.bridge):
            return fn(model, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def fast_linears(module: nn.Module) -> Iterator[int]:
    """Route ``module``'s fp32 CPU ``nn.Linear`` layers through oneDNN inside the block, where
    :func:`use_onednn` says so; yields how many layers were switched (0: default BLAS). The
    layers' own ``forward`` is always restored; a layer already switched by an enclosing block
    (or another thread) is left to it."""
    switched: list[nn.Linear] = []
    if use_onednn():
        for mod in module.modules():
            if (
                type(mod) is nn.Linear
                and "forward" not in mod.__dict__
                and mod.weight.device.type == "cpu"
                and mod.weight.dtype == torch.float32
            ):
                mod.forward = _forward(mod)  # type: ignore[method-assign,assignment]
                switched.append(mod)
    try:
        yield len(switched)
    finally:
        for mod in switched:
            mod.__dict__.pop("forward", None)

"""Where a model runs (``device``) and in what precision (``dtype``), validated before anything
is loaded or queued.

- ``device``: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``mps``; one that this machine does not
  have is a one-line error. The device does not enter the run key: the same computation on
  another device is the same result up to floating-point rounding.
- ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16`` (a GPU's: CPU kernels for it are
  incomplete). The weights are cast after loading (the converted-weights cache stays float32),
  and the dtype enters the model fingerprint, so results of different precisions never serve
  each other; float32 fingerprints are unchanged.
- :data:`TOLERANCE`: the relative bound ``max |fast - reference| <= tol * max(1, max |ref|)`` the
  self-checks and tests allow a fast path per dtype: float32 exactness as always (1e-4), bf16
  3e-2 (8 mantissa bits: one rounding is ``2^-8 = 3.9e-3``, a forward accumulates several),
  float16 5e-3.
"""

from __future__ import annotations

import re
from typing import Any

from workbench.errors import WorkbenchError
from workbench.types import sha256_hex

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def check_dtype(dtype: str | None, device: str = DEFAULT_DEVICE) -> str:
    """``dtype`` (default float32) if known and runnable on ``device``; else a one-line error."""
    dtype = DEFAULT_DTYPE if dtype is None else str(dtype)
    if dtype not in DTYPES:
        raise WorkbenchError(f"unknown dtype '{dtype}'", f"choose from {', '.join(DTYPES)}")
    if dtype == "float16" and device == "cpu":
        raise WorkbenchError(
            "dtype float16 does not run on the CPU here (incomplete CPU kernels)",
            "use bfloat16 on the CPU, or float16 on a GPU (device = cuda)",
        )
    return dtype


def check_device(device: str | None) -> str:
    """``device`` (default cpu) if this machine has it; else a one-line error naming what it
    has. Imports torch only for a device other than the CPU."""
    device = DEFAULT_DEVICE if device is None else str(device).strip().lower()
    if not _DEVICE.match(device):
        raise WorkbenchError(f"unknown device '{device}'", "use cpu, cuda, cuda:N or mps")
    if device == "cpu":
        return device
    import torch

    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= n:
            have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(n))])
            raise WorkbenchError(
                f"device '{device}' does not exist on this machine ({n} CUDA device(s))",
                f"use one of: {have}",
            )
    elif not (torch.backends.mps.is_available()):
        raise WorkbenchError("device 'mps' does not exist on this machine", "use cpu")
    return device


def torch_dtype(dtype: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def keyed_fingerprint(fingerprint: str, dtype: str) -> str:
    """The fingerprint of the weights in ``dtype``: float32's is the weights' own."""
    if dtype == DEFAULT_DTYPE:
        return fingerprint
    return sha256_hex("workbench.dtype", fingerprint, dtype)[:16]

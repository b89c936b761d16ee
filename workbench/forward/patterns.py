"""Detection patterns: where a head of a given kind is expected to attend, from the tokens.

For a sequence of ``T`` tokens the detection pattern ``D`` (``q_pos x k_pos``) is a 0/1
lower-triangular matrix (TransformerLens ``head_detector``; Olsson et al. 2022):

- ``previous_token``: ``D[q, q-1] = 1``
- ``duplicate_token``: ``D[q, k] = 1`` if ``tok[k] == tok[q]`` and ``k < q``
- ``induction``: ``D[q, k] = 1`` if ``tok[k-1] == tok[q]`` and ``k - 1 < q``, ``k >= 1``

The head detectors score a head's pattern against ``D``; the KV-head scores pool it per KV head.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def detection_patterns(
    tokens: Int[Tensor, "batch pos"], kind: str
) -> Float[Tensor, "batch pos pos"]:
    """The 0/1 detection pattern ``D`` of ``kind`` for each sequence (module docstring)."""
    b, t = tokens.shape
    dev = tokens.device
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev), diagonal=-1)
    if kind == "previous_token":
        d = torch.zeros(t, t, dtype=torch.bool, device=dev)
        d[1:, :-1] = torch.eye(t - 1, dtype=torch.bool, device=dev)
        return d.expand(b, t, t).float()
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, q, k]
    dup = same & lower
    if kind == "duplicate_token":
        return dup.float()
    if kind == "induction":
        ind = torch.zeros_like(dup)
        ind[:, :, 1:] = dup[:, :, :-1]  # key k qualifies when k-1 is a duplicate of q
        return torch.tril(ind).float()
    raise ValueError(f"unknown detector {kind!r}")

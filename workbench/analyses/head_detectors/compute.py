"""Classic head detectors: previous-token, duplicate-token and induction heads.

Definitions follow TransformerLens ``head_detector`` (Olsson et al. 2022 for induction heads).
For a sequence of ``T`` tokens and a head's attention pattern ``A`` (``q_pos x k_pos``), the
detection pattern ``D`` is a 0/1 lower-triangular matrix:

- previous token: ``D[q, q-1] = 1``
- duplicate token: ``D[q, k] = 1`` if ``tok[k] == tok[q]`` and ``k < q``
- induction: ``D[q, k] = 1`` if ``tok[k-1] == tok[q]`` and ``k - 1 < q``, ``k >= 1``

Scores (per sequence, then averaged over sequences, as TL averages a list of prompts):

- ``mul`` (default): ``sum(A' * D) / sum(A')`` where ``A'`` is ``A`` with the BOS column
  and/or the diagonal zeroed when ``exclude_bos`` / ``exclude_current_token`` are set
- ``abs``: ``1 - round(sum(|A - D|') / T, 3)`` (TL's rounding kept, for equality)

Unlike TL, no ``T x T`` pattern is kept: each layer's patterns are reduced to ``[batch,
n_heads]`` scores inside the hook, the cache is never written to, and all heads are scored
with one tensor op per layer rather than a Python loop over heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.analyses.head_detectors import HeadDetectorParams
from workbench.forward.patterns import detection_patterns
from workbench.hooks import hook_name, hooked
from workbench.progress import steps
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, HeadMetric, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def score_patterns(
    pattern: Float[Tensor, "batch head q k"],
    detection: Float[Tensor, "batch q k"],
    *,
    exclude_bos: bool,
    exclude_current_token: bool,
    error_measure: str,
) -> Float[Tensor, "batch head"]:
    """Per-sequence, per-head similarity of ``pattern`` to ``detection`` (module formulas)."""
    t = pattern.shape[-1]
    keep = torch.ones(t, t, dtype=pattern.dtype, device=pattern.device)
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current_token:
        keep.fill_diagonal_(0)
    det = detection[:, None].to(pattern.dtype)
    if error_measure == "mul":
        masked = pattern * keep
        return (masked * det).sum((-1, -2)) / masked.sum((-1, -2))
    diff = (pattern - det).abs() * keep
    raw = diff.sum((-1, -2)) / t  # TL: mean over T*T, times T
    return 1 - torch.round(raw * 1000) / 1000


def head_detectors(
    model: LoadedModel, prompts: PromptSet, params: HeadDetectorParams
) -> AnalysisOutput:
    """Score every head with each detector on ``prompts.clean``; mean and stderr over sequences."""
    tokens = prompts.clean
    n_layers, n_heads = model.n_layers, model.n_heads
    per_seq = {d: torch.zeros(tokens.shape[0], n_layers, n_heads) for d in params.detectors}

    batches = range(0, tokens.shape[0], params.batch_size)
    for start in steps(batches, desc="head detectors"):
        batch = tokens[start : start + params.batch_size]
        dets = {d: detection_patterns(batch, d) for d in params.detectors}

        def make_hook(layer: int, start: int = start, dets: dict[str, Tensor] = dets) -> Any:
            def hook(pattern: Tensor, hook: Any) -> None:
                p = pattern.detach().float()
                for d, det in dets.items():
                    per_seq[d][start : start + p.shape[0], layer] = score_patterns(
                        p,
                        det,
                        exclude_bos=params.exclude_bos,
                        exclude_current_token=params.exclude_current_token,
                        error_measure=params.error_measure,
                    ).cpu()

            return hook

        hooks = [(hook_name("pattern", layer), make_hook(layer)) for layer in range(n_layers)]
        with torch.no_grad(), hooked(model.bridge, hooks):
            model.bridge(batch, prepend_bos=False, return_type=None)

    n = int(tokens.shape[0])
    metrics = {}
    for d, s in per_seq.items():
        mean, stderr = mean_stderr(s.numpy())
        metrics[d] = HeadMetric(mean, stderr, n)
    return AnalysisOutput(
        head_metrics=metrics,
        info={
            "n_sequences": n,
            "seq_len": int(tokens.shape[1]),
            "detectors": list(params.detectors),
        },
    )

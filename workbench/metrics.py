"""Patching metrics, read at the final position (Wang et al. 2022; Heimersheim & Nanda 2024).

All functions take the final-position logits ``Float[Tensor, "batch d_vocab"]`` and return one
value per prompt ``Float[Tensor, "batch"]``, so results keep per-prompt values (mean, stderr):

- ``logit_diff``:  ``logit[correct] - logit[incorrect]``
- ``prob``:        ``softmax(logits)[correct]``
- ``loss``:        ``-log softmax(logits)[correct]`` (cross-entropy of the answer)
- ``kl``:          ``KL(p_clean || p) = sum_v p_clean(v) (log p_clean(v) - log p(v))``
- ``norm_logit_diff``: ``(LD - LD_corrupt) / (LD_clean - LD_corrupt)``: 0 = no effect, 1 = full
  recovery. Normalised with the *mean* clean and corrupted logit differences (as in the IOI
  notebooks), not per prompt, so a prompt with ``LD_clean ~ LD_corrupt`` cannot blow it up.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.types import METRICS


def logit_diff(
    logits: Float[Tensor, "batch vocab"],
    correct: Int[Tensor, " batch"],
    incorrect: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """``logit[correct] - logit[incorrect]`` per prompt."""
    return logits.gather(-1, correct[:, None])[:, 0] - logits.gather(-1, incorrect[:, None])[:, 0]


def answer_prob(
    logits: Float[Tensor, "batch vocab"], correct: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """``softmax(logits)[correct]`` per prompt."""
    return logits.float().softmax(-1).gather(-1, correct[:, None])[:, 0]


def answer_loss(
    logits: Float[Tensor, "batch vocab"], correct: Int[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    """``-log softmax(logits)[correct]`` per prompt."""
    return -logits.float().log_softmax(-1).gather(-1, correct[:, None])[:, 0]


def kl_from_clean(
    logits: Float[Tensor, "batch vocab"], clean_logits: Float[Tensor, "batch vocab"]
) -> Float[Tensor, " batch"]:
    """``KL(p_clean || p)`` per prompt."""
    logp = logits.float().log_softmax(-1)
    logq = clean_logits.float().log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def per_prompt(
    name: str,
    logits: Float[Tensor, "batch vocab"],
    correct: Int[Tensor, " batch"],
    incorrect: Int[Tensor, " batch"],
    clean_logits: Float[Tensor, "batch vocab"] | None = None,
) -> Float[Tensor, " batch"]:
    """The raw per-prompt value of metric ``name`` (``norm_logit_diff`` gives the raw
    logit difference here; normalise the means with :func:`normalise`)."""
    if name in ("logit_diff", "norm_logit_diff"):
        out = logit_diff(logits, correct, incorrect)
    elif name == "prob":
        out = answer_prob(logits, correct)
    elif name == "loss":
        out = answer_loss(logits, correct)
    elif name == "kl":
        if clean_logits is None:
            raise ValueError("kl needs the clean run's logits")
        out = kl_from_clean(logits, clean_logits)
    else:
        raise WorkbenchError(f"unknown metric '{name}'", f"choose from {', '.join(METRICS)}")
    check_finite(name, out)
    return out


def normalise(value: Tensor, clean: float, corrupt: float) -> Tensor:
    """``(value - corrupt) / (clean - corrupt)`` with the baselines' mean logit differences."""
    denom = clean - corrupt
    if abs(denom) < 1e-6:
        raise WorkbenchError(
            "normalised logit difference undefined: clean and corrupted runs have the same mean "
            f"logit difference ({clean:.4g})",
            'use metric = "logit_diff" or prompts whose corruption changes the answer',
        )
    return (value - corrupt) / denom


def check_finite(name: str, values: Tensor) -> None:
    if not torch.isfinite(values).all():
        raise WorkbenchError(
            f"metric '{name}' returned NaN or infinite values",
            "check the prompts and answer ids (nothing was stored)",
        )

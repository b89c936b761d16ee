"""Per-prompt answer scores under ACT and the paired-bootstrap noise floor of ``act_search``.

**Answer choices.** A prompt's choices are its task's label set where the prompt set has one
(``meta["choices"]`` with ``meta["gold_index"]``, e.g. ``label_choice``), else the pair
(``correct``, ``incorrect``). From the final-position logits ``z`` with gold ``g`` and the other
choices ``W``, three scores per prompt:

- ``margin = z_g - max_{w in W} z_w`` (for a pair: the logit difference), and *correct* means
  ``margin > 0`` (the argmax over the choices is gold; a tie counts as wrong);
- ``logprob = z_g - logsumexp_{c in {g} + W} z_c``: gold's log-probability among the choices
  (the continuous counterpart of the argmax; the search's tie-breaker);
- ``vocab_logprob = log_softmax(z)_g`` over the whole vocabulary (reported only).

**Noise floor** (:func:`noise_floor`). With ``d_h[p]`` the change of prompt ``p``'s correctness
(-1, 0 or +1) when head ``h`` alone is calibrated and ``e_h[p]`` the change of its ``logprob``,
draw ``B = n_boot`` resamples of the ``n`` calibration prompts with replacement (one seeded set
of resamples shared by every head, so the comparison is paired) and let ``D*_hb``, ``E*_hb`` be
the resampled means. Head ``h`` is kept iff

1. ``mean_p d_h[p] > 0`` (it raises calibration accuracy: ACT's own criterion),
2. ``#{b: D*_hb < 0} <= alpha B`` (the accuracy gain is not negative in more than ``alpha`` of
   the resamples) and
3. ``#{b: E*_hb <= 0} <= alpha B`` (its gold log-prob gain is positive in all but ``alpha``).

On a ~50-prompt set one head flips few prompts, so a bootstrap bound on the accuracy gain alone
is rarely above zero (a gain of one prompt with no loss has ``D* = 0`` in ``e^-1`` of the
resamples); 2 and 3 ask that the gain be no loss in accuracy and a resampling-stable gain in
the continuous score. No correction for the number of heads searched is made (stated with the
count that passed). ``[alpha, 1 - alpha]`` quantiles of ``D*`` and ``E*`` are reported as the
heads' intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from workbench.forward.attention_edits import act_edit
from workbench.forward.head_sweep import sweep_heads
from workbench.forward.resume import ResumableRun
from workbench.types import Head, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

SCORES = ("margin", "logprob", "vocab_logprob")


def answer_choices(ps: PromptSet) -> tuple[Tensor, Tensor]:
    """``choices[n, K]`` token ids with gold in column 0 and ``valid[n, K]`` (rows padded)."""
    per = ps.meta.get("choices")
    if per is None:
        rows = [[int(a), int(b)] for a, b in zip(ps.correct, ps.incorrect, strict=True)]
    else:
        gold = ps.meta["gold_index"]
        rows = [[int(c[g])] + [int(x) for i, x in enumerate(c) if i != g]
                for c, g in zip(per, gold, strict=True)]  # fmt: skip
    k = max(len(r) for r in rows)
    choices = torch.tensor([r + [r[0]] * (k - len(r)) for r in rows], dtype=torch.long)
    valid = torch.tensor([[True] * len(r) + [False] * (k - len(r)) for r in rows])
    return choices, valid


def choice_metric(choices: Tensor, valid: Tensor) -> Any:
    """``logits[rows, vocab] -> [rows, 3]`` (margin, logprob, vocab_logprob); row ``r`` is
    prompt ``r % n``, as :func:`~workbench.forward.head_sweep.sweep_heads` orders a wave."""
    n = int(choices.shape[0])

    def metric(logits: Tensor) -> Tensor:
        logits = logits.float()
        rows = int(logits.shape[0])
        idx = torch.arange(rows, device=logits.device) % n
        c, ok = choices.to(logits.device)[idx], valid.to(logits.device)[idx]
        z = logits.gather(1, c)
        gold = z[:, 0]
        others = z[:, 1:].masked_fill(~ok[:, 1:], float("-inf"))
        margin = gold - others.max(1).values
        lp = gold - torch.logsumexp(z.masked_fill(~ok, float("-inf")), 1)
        vocab_lp = gold - torch.logsumexp(logits, 1)
        return torch.stack([margin, lp, vocab_lp], 1)

    return metric


def score_prompts(
    model: LoadedModel,
    ps: PromptSet,
    variants: Sequence[Sequence[Head]],
    tau: float,
    beta: float,
    batch_tokens: int,
    desc: str = "ACT head sweep",
) -> tuple[Tensor, Tensor, float]:
    """Scores ``[n, 3]`` of the unmodified model and ``[V, n, 3]`` with each variant's heads
    calibrated together (batched, resuming at each variant's lowest layer), and the cost in
    forwards of the ``n`` prompts."""
    metric = choice_metric(*answer_choices(ps))
    base = ResumableRun(model, ps.clean)
    base_scores = metric(base.final_logits).cpu()
    if not variants:
        return base_scores, torch.zeros(0, ps.n, len(SCORES)), 0.0
    out, cost = sweep_heads(
        model, base, variants, "pattern", act_edit(tau, beta), metric,
        batch_tokens=batch_tokens, desc=desc,
    )  # fmt: skip
    return base_scores, torch.stack([o.cpu() for o in out]), cost


def correct(scores: Tensor | np.ndarray) -> np.ndarray:
    """Per-prompt correctness ``margin > 0`` (last axis: the three scores)."""
    return np.asarray(scores[..., 0] > 0, dtype=np.float64)


def noise_floor(
    d_acc: np.ndarray, d_lp: np.ndarray, n_boot: int, alpha: float, seed: int
) -> dict[str, np.ndarray]:
    """The rule of the module docstring for ``d_acc``, ``d_lp`` ``[heads, n]``: per head the
    gains, the bootstrap shares and quantiles, and ``chosen``."""
    n = int(d_acc.shape[1])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # [B, n]
    boot_acc = d_acc @ counts.T / n  # [heads, B]
    boot_lp = d_lp @ counts.T / n
    acc_gain, lp_gain = d_acc.mean(1), d_lp.mean(1)
    acc_neg = (boot_acc < 0).mean(1)  # sums of integers: exact
    lp_nonpos = (boot_lp <= 0).mean(1)
    chosen = (acc_gain > 0) & (acc_neg <= alpha) & (lp_nonpos <= alpha)
    return {
        "acc_gain": acc_gain,
        "acc_lo": np.quantile(boot_acc, alpha, axis=1),
        "acc_hi": np.quantile(boot_acc, 1 - alpha, axis=1),
        "acc_neg_share": acc_neg,
        "logprob_gain": lp_gain,
        "logprob_lo": np.quantile(boot_lp, alpha, axis=1),
        "logprob_hi": np.quantile(boot_lp, 1 - alpha, axis=1),
        "logprob_nonpos_share": lp_nonpos,
        "chosen": chosen,
    }

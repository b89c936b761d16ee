"""Circuit faithfulness, and the smallest faithful circuit (Wang et al. 2022, sec. 4).

With ``M(S)`` the mean logit difference ``logit[correct] - logit[incorrect]`` on the clean
prompts when every head *outside* ``S`` is mean-ablated (``z`` replaced by its mean over the
reference prompts, per position: :func:`~workbench.forward.interventions.ablate_heads`). The
reference is the corrupted prompt set by default (for IOI the ABC set, as Wang et al.
mean-ablate over ABC); ``reference="clean"`` takes the mean over the clean prompts, which
keeps task structure (on SmolLM2 IOI, keeping one head then already gives faithfulness 1.0):

    faithfulness(C) = (M(C) - M({})) / (M(all heads) - M({}))

so 1 means the circuit alone keeps the full logit difference and 0 that it keeps no more than
ablating every head. ``M(all heads)`` is the unablated model; ``M({})`` ablates all heads.

:func:`minimal_faithful` orders heads by a per-head score (``|score|`` with ``absolute``) and finds
the smallest ``k`` whose top-``k`` set reaches ``faithfulness >= share``: doubling ``k = 1, 2, 4,
...`` up to the first ``k`` that reaches it, then bisection between that ``k`` and the one before
(about ``2 log2 k`` measurements, one forward each after one reference forward that all share). This
assumes faithfulness grows with ``k`` along the score order; it need not (on SmolLM2 IOI,
mean-ablating all but the top 14 heads keeps more of the logit difference than keeping the top 135),
so every measured ``(k, faithfulness)`` is returned, and the returned ``k`` was measured to reach
the share with ``k - 1`` measured not to (or ``k = 1``). Doubling from small ``k`` finds the first
crossing; a bisection over ``[0, N]`` can jump past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from workbench import metrics as M
from workbench.circuits import run_scores, select_heads
from workbench.errors import WorkbenchError
from workbench.forward.interventions import ablate_heads, reference_z
from workbench.types import Circuit, Derivation, Head, PromptSet, canonical_json

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.store import ResultStore

__all__ = ["MinimalFaithful", "circuit_metric", "faithfulness", "minimal_faithful"]

Reference = Literal["clean", "corrupt"]


def circuit_metric(
    model: LoadedModel,
    prompts: PromptSet,
    keep: Sequence[Head],
    *,
    reference: Reference = "corrupt",
    reference_acts: dict[int, Tensor] | None = None,
) -> float:
    """``M(keep)``: mean clean logit difference with every head outside ``keep`` mean-ablated
    (``reference_acts``: :func:`reference_activations`, computed once for many calls)."""
    keep_set = set(keep)
    others = [
        Head(la, h)
        for la in range(model.n_layers)
        for h in range(model.n_heads)
        if Head(la, h) not in keep_set
    ]
    ref = prompts.clean if reference == "clean" else prompts.corrupt
    with (
        torch.no_grad(),
        ablate_heads(
            model, others, "mean", reference_tokens=ref, reference_acts=reference_acts
        ) as bridge,
    ):
        logits = bridge(prompts.clean, prepend_bos=False)[:, -1]
    return float(M.logit_diff(logits, prompts.correct, prompts.incorrect).double().mean())


@dataclass(frozen=True)
class Baselines:
    full: float
    ablated: float

    def faithfulness(self, value: float) -> float:
        span = self.full - self.ablated
        if abs(span) < 1e-9:
            raise WorkbenchError(
                "faithfulness is undefined: ablating every head leaves the logit difference "
                f"unchanged ({self.full:.4g})",
                "use prompts the model solves (a positive clean logit difference)",
            )
        return (value - self.ablated) / span


def reference_activations(
    model: LoadedModel, prompts: PromptSet, reference: Reference = "corrupt"
) -> dict[int, Tensor]:
    """Every layer's ``hook_z`` on the reference prompts: the mean-ablation values of
    :func:`circuit_metric`, one forward for any number of measured circuits."""
    return reference_z(model, prompts.clean if reference == "clean" else prompts.corrupt)


def baselines(
    model: LoadedModel,
    prompts: PromptSet,
    reference: Reference = "corrupt",
    reference_acts: dict[int, Tensor] | None = None,
) -> Baselines:
    with torch.no_grad():
        logits = model.bridge(prompts.clean, prepend_bos=False)[:, -1]
    full = float(M.logit_diff(logits, prompts.correct, prompts.incorrect).double().mean())
    ablated = circuit_metric(model, prompts, [], reference=reference, reference_acts=reference_acts)
    return Baselines(full, ablated)


def faithfulness(
    model: LoadedModel,
    prompts: PromptSet,
    heads: Sequence[Head],
    *,
    reference: Reference = "corrupt",
) -> float:
    """Measured faithfulness of the head set ``heads`` (module docstring)."""
    acts = reference_activations(model, prompts, reference)
    base = baselines(model, prompts, reference, acts)
    return base.faithfulness(
        circuit_metric(model, prompts, heads, reference=reference, reference_acts=acts)
    )


@dataclass(frozen=True)
class MinimalFaithful:
    """The result of :func:`minimal_faithful`: the chosen heads (score order), ``k``, the
    measured faithfulness, the baselines and every measured ``(k, faithfulness)``."""

    heads: tuple[Head, ...]
    k: int
    faithfulness: float
    full: float
    ablated: float
    curve: tuple[tuple[int, float], ...]


def minimal_faithful(
    model: LoadedModel,
    prompts: PromptSet,
    scores: Any,
    *,
    share: float = 0.8,
    absolute: bool = True,
    reference: Reference = "corrupt",
) -> MinimalFaithful:
    """Smallest top-``k`` set by ``scores`` (``[n_layers, n_heads]``) with faithfulness >= share."""
    if not 0 < share <= 1:
        raise WorkbenchError(f"share must be in (0, 1], got {share}", "pass share=0.8, say")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (model.n_layers, model.n_heads):
        raise WorkbenchError(
            f"scores of shape {s.shape} do not fit the model ({model.n_layers} x {model.n_heads})",
            "pass per-head scores of this model",
        )
    order = select_heads(s, "top_k", k=int(np.isfinite(s).sum()), absolute=absolute)
    acts = reference_activations(model, prompts, reference)
    base = baselines(model, prompts, reference, acts)
    measured: dict[int, float] = {}

    def f(k: int) -> float:
        if k not in measured:
            measured[k] = base.faithfulness(
                circuit_metric(model, prompts, order[:k], reference=reference, reference_acts=acts)
            )
        return measured[k]

    n = len(order)
    # doubling: the first k in 1, 2, 4, ..., n that reaches the share (small circuits first)
    lo, hi = 0, 1  # invariant after the loop: f(hi) >= share; f(lo) < share (f(0): empty set)
    while f(hi) < share:
        if hi == n:
            raise WorkbenchError(
                f"even all {n} scored heads keep only {f(n):.3f} of the metric (< {share})",
                "lower share or score every head",
            )
        lo, hi = hi, min(2 * hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) >= share:
            hi = mid
        else:
            lo = mid
    curve = tuple(sorted(measured.items()))
    return MinimalFaithful(tuple(order[:hi]), hi, f(hi), base.full, base.ablated, curve)


def derive_minimal_faithful(
    model: LoadedModel,
    prompts: PromptSet,
    store: ResultStore,
    run_id: str,
    *,
    metric: str | None = None,
    share: float = 0.8,
    absolute: bool = True,
    reference: Reference = "corrupt",
) -> Circuit:
    """The ``minimal_faithful`` circuit of a stored per-head run, measured on ``prompts``."""
    scores, info = run_scores(store, run_id, metric)
    if info["model"] != model.name:
        raise WorkbenchError(
            f"run {info['run_id']} is of model {info['model']}, not {model.name}",
            "load the run's model",
        )
    res = minimal_faithful(
        model, prompts, scores, share=share, absolute=absolute, reference=reference
    )
    params = {
        "share": share,
        "absolute": absolute,
        "ablation": "mean",
        "reference": reference,
        "k": res.k,
        "curve": [list(p) for p in res.curve],
        "metric_full": res.full,
        "metric_all_ablated": res.ablated,
        "prompt_hash": prompts.content_hash(),
        "n_prompts": prompts.n,
    }
    derivation = Derivation(
        rule="minimal_faithful",
        params_json=canonical_json(params),
        source_run=info["run_id"],
        analysis=info["analysis"],
        metric=info["metric"],
        task=info["task"],
    )
    role = f"{info['metric']} ({info['task']})"
    return Circuit.of(
        model.name, res.heads, derivation, scores.shape, dict.fromkeys(res.heads, role),
        res.faithfulness,
    )  # fmt: skip

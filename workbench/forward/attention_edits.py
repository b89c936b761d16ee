"""Interventions that change what chosen heads attend to: ACT calibration and PASTA steering.

Both are context managers like :mod:`workbench.forward.interventions` (hooks attached through
:func:`workbench.hooks.hooked`, always removed); they act per *query* head, also under
grouped-query attention.

**Column score** (the sink criterion shared with ``attention_sinks``' hidden sinks): for one
head's pattern ``A`` (post-softmax, ``N`` query rows over ``N`` keys in a full forward),

``s_j = sum_i A_ij / (N - j)``  (the mean attention key ``j`` gets from the queries a causal
mask lets see it; Gu et al.'s ``alpha_k``). Under a KV cache (``n_q < n_k``) the sum runs over
the forward's own rows and ``N - j`` becomes ``min(n_q, n_k - j)``, the rows that see ``j``.

The divisor is the causal count ``N - j`` on every layer, **sliding-window layers included**:
with window ``w`` only ``min(w, N - j)`` queries see key ``j`` (the other rows hold 0 there), so
on such a layer ``s_j`` is the mean over those queries times ``min(w, N - j) / (N - j)``: lower,
for keys ``j < N - w``, than the mean over the queries that see them (a stricter sink test for
early keys), and the same as on a global layer when ``N <= w``. Kept so: it is the formula as
written (Yu et al., Gu et al.) and the criterion ``attention_sinks`` shares.

**ACT** (Yu et al. 2024, :func:`calibrate_attention`): the sink set ``S`` = columns with
``s_j > tau`` except the first such column (normally position 0, which is kept). Each row
scales its weight on ``S`` by ``beta`` and gives the freed mass back to the other keys in
proportion to their weights: with ``m_i = sum_{j in S} A_ij``,

``A'_ij = beta A_ij`` (``j in S``),  ``A'_ij = A_ij (1 - beta m_i) / (1 - m_i)`` (otherwise),

so every row still sums to one. Computed as ``A_ij (1 + (1 - beta) m_i / r_i)`` with ``r_i`` the
row's measured weight outside ``S`` (``= 1 - m_i``): the freed mass ``(1 - beta) m_i`` spread in
proportion, which keeps each row's sum as it was to rounding and is exactly ``A`` at
``beta = 1``. A row whose whole weight is on ``S`` (``r_i < 1e-12``: no key outside ``S`` to
give the mass to) is left unchanged, its sink weight not scaled by ``beta`` either; every
other row is calibrated, and every row still sums to one. ``beta = 1`` changes nothing; the
first sink column is never scaled down.

**Under a KV cache** (cached decoding, one new query per forward) ``hook_pattern`` holds only
the new row ``[.., 1, n_k]``: the divisor is ``min(1, n_k - j) = 1``, so ``s_j = A_{new, j}``,
the sink set is the keys that row alone gives more than ``tau``, and only that row is
calibrated (the cached keys and values are what the prefill computed, with or without the
edit). Full-forward ACT at that position scores the columns over all ``N`` rows and calibrates
every row, so the two give different logits (equal at ``beta = 1``). The analyses that use ACT
(``act_search``, ``intervention_eval``: :func:`act_edit` in the head sweep) run full forwards.

**PASTA** (Zhang et al. 2024, :func:`steer_attention`): the attention on prompt keys outside the
highlighted span ``[start, stop)`` is multiplied by ``alpha`` and every row renormalised, i.e.
``log alpha`` is added to those keys' pre-softmax scores (at ``hook_attn_scores``). Keys after
the prompt (generated tokens) are not steered. ``alpha = 1`` changes nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.forward.head_sweep import head_mask
from workbench.forward.interventions import _check_heads
from workbench.hooks import hook_name, hooked
from workbench.types import Head

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def column_scores(pattern: Float[Tensor, "*b q k"]) -> Float[Tensor, "*b k"]:
    """``s_j = sum_i A_ij / min(n_q, n_k - j)`` (module docstring): the rows a causal mask lets
    see ``j``, also on sliding-window layers (where only ``min(w, n_k - j)`` of them do); one
    cached decoding row (``n_q = 1``) gives ``s_j = A_{0j}``."""
    n_q, n_k = int(pattern.shape[-2]), int(pattern.shape[-1])
    j = torch.arange(n_k, device=pattern.device)
    seen = (n_k - j).clamp(max=n_q).to(torch.float32)
    return pattern.float().sum(-2) / seen


def sink_set(over: Any) -> Any:
    """``over`` (columns whose score passes the threshold, last axis = keys; torch or numpy)
    without the first such column: ``over & (cumsum(over) > 1)``."""
    if isinstance(over, Tensor):
        return over & (over.int().cumsum(-1) > 1)
    return over & (over.astype("int64").cumsum(-1) > 1)


def sink_columns(pattern: Float[Tensor, "*b q k"], tau: float) -> Bool[Tensor, "*b k"]:
    """ACT's sink set ``S``: columns with ``s_j > tau`` except the first such column per head."""
    return sink_set(column_scores(pattern) > tau)  # type: ignore[no-any-return]


def calibrate_pattern(
    pattern: Float[Tensor, "*b q k"], sinks: Bool[Tensor, "*b k"], beta: float
) -> Float[Tensor, "*b q k"]:
    """``A'`` of ACT (module docstring): with ``m_i = sum_{j in S} A_ij`` and ``r_i`` the row's
    weight outside ``S``, ``A'_ij = beta A_ij`` (``j in S``) and
    ``A'_ij = A_ij (1 + (1 - beta) m_i / r_i)`` (otherwise); rows with ``r_i < 1e-12`` (all
    weight on ``S``) are returned unchanged. Rows keep their sums."""
    p = pattern.float()
    s = sinks[..., None, :].to(p.dtype)
    m = (p * s).sum(-1, keepdim=True)
    rest = (p * (1.0 - s)).sum(-1, keepdim=True)  # = 1 - m_i, measured (exact row sums)
    ok = rest > 1e-12
    grow = torch.where(ok, 1.0 + (1.0 - beta) * m / torch.where(ok, rest, 1.0), 1.0)
    scale = torch.where(ok, beta, 1.0)
    out = p * (s * scale + (1.0 - s) * grow)
    return out.to(pattern.dtype)


def _by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for h in heads:
        out.setdefault(h.layer, []).append(h.head)
    return out


def _unit(name: str, value: float, typical: str) -> float:
    if not (isinstance(value, int | float) and 0.0 < float(value) <= 1.0):
        raise WorkbenchError(f"{name} must be in (0, 1], got {value}", f"e.g. {name} = {typical}")
    return float(value)


@contextlib.contextmanager
def calibrate_attention(
    model: LoadedModel, heads: Iterable[Head], *, tau: float = 0.1, beta: float = 0.4
) -> Iterator[Any]:
    """ACT on ``heads`` for the duration of the block: ``A -> A'`` at ``hook_pattern``
    (module docstring), the sink set from the rows of each forward; yields the bridge. Under a
    KV cache a decoding step's sink set comes from its one new row alone, which is not
    full-forward ACT (module docstring)."""
    beta = _unit("beta", beta, "0.4")
    if not 0.0 < tau < 1.0:
        raise WorkbenchError(f"tau must be in (0, 1), got {tau}", "e.g. tau = 0.1 (ACT)")
    chosen = _by_layer(_check_heads(model, heads))

    def make(idx: list[int]) -> Any:
        ix = torch.tensor(idx)

        def hook(pattern: Tensor, hook: Any) -> Tensor:
            sub = pattern[:, ix.to(pattern.device)]
            new = calibrate_pattern(sub, sink_columns(sub, tau), beta)
            out = pattern.clone()
            out[:, ix.to(pattern.device)] = new
            return out

        return hook

    hooks = [(hook_name("pattern", la), make(idx)) for la, idx in sorted(chosen.items())]
    with hooked(model.bridge, hooks) as bridge:
        yield bridge


def check_spans(
    spans: Sequence[tuple[int, int]], prompt_lens: Sequence[int]
) -> list[tuple[int, int]]:
    """Each row's highlighted span ``[start, stop)`` inside its prompt, or a one-line error."""
    if len(spans) != len(prompt_lens):
        raise WorkbenchError(
            f"{len(spans)} highlight spans for {len(prompt_lens)} prompts", "give one per prompt"
        )
    out = []
    for i, ((a, b), n) in enumerate(zip(spans, prompt_lens, strict=True)):
        if not 0 <= int(a) < int(b) <= int(n):
            raise WorkbenchError(
                f"highlight span ({a}, {b}) of prompt {i} is outside its {n}-token prompt",
                f"use 0 <= start < stop <= {n}",
            )
        out.append((int(a), int(b)))
    return out


@contextlib.contextmanager
def steer_attention(
    model: LoadedModel,
    heads: Iterable[Head],
    spans: Sequence[tuple[int, int]],
    *,
    alpha: float = 0.01,
    prompt_lens: Sequence[int] | None = None,
) -> Iterator[Any]:
    """PASTA on ``heads``: per batch row ``r``, prompt keys outside ``spans[r]`` get
    ``log alpha`` added to their scores (module docstring); yields the bridge.

    ``prompt_lens[r]``: row ``r``'s prompt length (keys at or after it are not steered); by
    default the length of the first forward inside the block (the prompt, before any cached
    decoding). A single span applies to every row."""
    _unit("alpha", alpha, "0.01")
    chosen = _by_layer(_check_heads(model, heads))
    state: dict[str, Tensor] = {}

    def weights(n_rows: int, n_k: int, device: torch.device) -> Tensor:
        if "bias" not in state:
            lens = list(prompt_lens) if prompt_lens is not None else [n_k] * n_rows
            rows = list(spans) * n_rows if len(spans) == 1 and n_rows > 1 else list(spans)
            state["bias"] = steering_bias(rows, lens, alpha, max(lens)).to(device)
        bias = state["bias"]
        if int(bias.shape[0]) != n_rows:
            raise WorkbenchError(
                f"steering was set up for {int(bias.shape[0])} prompts, the forward has {n_rows}",
                "steer one batch per block",
            )
        if n_k > int(bias.shape[1]):
            bias = torch.cat([bias, bias.new_zeros(n_rows, n_k - int(bias.shape[1]))], 1)
        return bias[:, :n_k]

    def make(idx: list[int]) -> Any:
        ix = torch.tensor(idx)

        def hook(scores: Tensor, hook: Any) -> Tensor:
            bias = weights(int(scores.shape[0]), int(scores.shape[-1]), scores.device)
            out = scores.clone()
            sel = ix.to(scores.device)
            out[:, sel] = out[:, sel] + bias[:, None, None, :].to(out.dtype)
            return out

        return hook

    hooks = [(hook_name("scores", la), make(idx)) for la, idx in sorted(chosen.items())]
    with hooked(model.bridge, hooks) as bridge:
        yield bridge


def act_edit(tau: float, beta: float) -> Callable[[Tensor, Tensor, Tensor, int], Tensor]:
    """ACT as a per-row edit of ``hook_pattern`` for :func:`.head_sweep.sweep_heads`: the
    sink set from :func:`column_scores` of the forward's rows (full forwards there), causal
    divisor ``N - j`` on sliding-window layers too; all-sink rows unchanged."""
    beta = _unit("beta", beta, "0.4")

    def edit(pattern: Tensor, mask: Tensor, prompt: Tensor, layer: int) -> Tensor:
        new = calibrate_pattern(pattern, sink_columns(pattern, tau), beta)
        return torch.where(head_mask(pattern, mask, "pattern"), new, pattern)

    return edit


def steering_bias(
    spans: Sequence[tuple[int, int]], prompt_lens: Sequence[int], alpha: float, width: int
) -> Float[Tensor, "n k"]:
    """Per prompt, ``log alpha`` on its prompt keys outside its span, 0 elsewhere."""
    rows = check_spans(spans, prompt_lens)
    bias = torch.zeros(len(rows), width)
    log_alpha = math.log(_unit("alpha", alpha, "0.01"))
    for r, ((a, b), n) in enumerate(zip(rows, prompt_lens, strict=True)):
        bias[r, : int(n)] = log_alpha
        bias[r, a:b] = 0.0
    return bias


def pasta_edit(bias: Float[Tensor, "n k"]) -> Callable[[Tensor, Tensor, Tensor, int], Tensor]:
    """PASTA as a per-row edit of ``hook_attn_scores`` (``bias`` from :func:`steering_bias`)."""

    def edit(scores: Tensor, mask: Tensor, prompt: Tensor, layer: int) -> Tensor:
        b = bias.to(scores.device)[prompt][:, None, None, : int(scores.shape[-1])]
        return scores + head_mask(scores, mask, "scores").to(scores.dtype) * b.to(scores.dtype)

    return edit

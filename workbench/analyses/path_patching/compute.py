"""Path patching (Wang et al. 2022 "Interpretability in the Wild"; Goldowsky-Dill et al. 2023).

A sender head's effect through chosen receivers only. Direction convention:

- ``denoising`` (default): the *base* run is the corrupted prompt, the *source* the clean one;
  the sender's clean output is patched into the corrupted run.
- ``noising``: base = clean, source = corrupted; the sender's corrupted output goes into the clean
  run.

For one sender head ``s = (l_s, h_s)`` and receivers ``R``, the standard three-step algorithm:

1. run source and base, caching every head's ``z`` (and every ``mlp_out`` of the base run);
2. run the base input with ``z_s`` set to its source value and every OTHER head's ``z`` frozen to
   its base value (MLPs recomputed, as in the IOI paper, unless ``freeze_mlps``); cache the
   receivers' inputs: for a head receiver ``(l, h, q|k|v)`` the value at ``blocks.l.attn.hook_q``
   (head ``h``) or ``hook_k``/``hook_v`` (KV head ``h // (n_heads / n_kv_heads)``: with grouped-
   query attention the key/value input is shared, so patching it patches every query head of that
   group); for ``"logits"`` the final residual stream (``resid_post`` of the last layer);
3. run the base input again with only the receivers' inputs patched to the values from step 2
   (everything else recomputed) and read the metric at the final position.

Reported per sender (mean and stderr over prompts): ``logit_diff``: ``LD_patched - LD_base``;
``norm_logit_diff``: ``(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)`` (mean baselines; in
the noising direction 1 = no effect). Heads that are not senders are NaN. Costs two forwards per
sender. A sender at or after a receiver's layer cannot reach it (its ``q/k/v`` are computed first),
so the sweep covers the heads before the earliest receiver.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from workbench import metrics as M
from workbench.analyses.path_patching import PathPatchingParams
from workbench.errors import WorkbenchError
from workbench.forward.selfcheck import require
from workbench.hooks import every_layer, hook_name, hooked, kv_head_of, record
from workbench.models.backend import fast_linears
from workbench.progress import steps
from workbench.types import AnalysisOutput, Head, HeadMetric, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

Receiver = tuple[int, int, str]  # (layer, head, "q" | "k" | "v")
LOGITS = "logits"


def _run(model: LoadedModel, tokens: Tensor, hooks: Sequence[tuple[str, Any]]) -> Tensor:
    with torch.no_grad(), hooked(model.bridge, hooks):
        return model.bridge(tokens, prepend_bos=False)[:, -1]  # type: ignore[no-any-return]


def run_caches(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"]
) -> tuple[dict[str, Tensor], Tensor]:
    """Every layer's ``z`` and ``mlp_out`` of one run, and its final-position logits."""
    rec = record(model.bridge, tokens, every_layer(("z", "mlp_out"), model.n_layers), logits="last")
    assert rec.logits is not None
    return rec.by_name(), rec.logits


def _kv_index(model: LoadedModel, head: int, which: str) -> int:
    return head if which == "q" else kv_head_of(head, model.n_heads, model.n_kv_heads)


def check_receivers(model: LoadedModel, receivers: str | Sequence[Receiver]) -> list[Receiver]:
    """Validated receiver list (``[]`` means the logits)."""
    if isinstance(receivers, str):
        if receivers != LOGITS:
            raise WorkbenchError(
                f"path_patching: unknown receivers '{receivers}'",
                'use "logits" or a list of (layer, head, "q"|"k"|"v")',
            )
        return []
    out = []
    for r in receivers:
        if len(r) != 3 or r[2] not in ("q", "k", "v"):
            raise WorkbenchError(
                f"path_patching: bad receiver {tuple(r)!r}",
                'give (layer, head, "q"|"k"|"v"); which must be q, k or v',
            )
        layer, head, which = int(r[0]), int(r[1]), str(r[2])
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise WorkbenchError(
                f"path_patching: receiver L{layer}H{head} out of range",
                f"layers 0..{model.n_layers - 1}, heads 0..{model.n_heads - 1}",
            )
        out.append((layer, head, which))
    if not out:
        raise WorkbenchError("path_patching: no receivers given", 'use receivers = "logits"')
    return out


def receiver_layer(model: LoadedModel, receivers: list[Receiver]) -> int:
    """The earliest receiver layer (``n_layers`` for the logits)."""
    return min((r[0] for r in receivers), default=model.n_layers)


def path_patch_sender(
    model: LoadedModel,
    base_tokens: Int[Tensor, "batch pos"],
    sender: Head,
    receivers: list[Receiver],
    source: dict[str, Tensor],
    base: dict[str, Tensor],
    *,
    freeze_mlps: bool = False,
) -> Tensor:
    """Final-position logits ``[batch, vocab]`` of step 3 for one sender (module docstring).

    ``source`` / ``base`` are :func:`run_caches` stores; they are read, never written.
    """
    n_layers = model.n_layers

    def freeze_z(layer: int) -> Any:
        def fn(act: Tensor, hook: Any) -> Tensor:
            out = base[hook_name("z", layer)].clone()
            if layer == sender.layer:
                out[:, :, sender.head] = source[hook_name("z", layer)][:, :, sender.head]
            return out

        return fn

    def freeze(name: str) -> Any:
        return lambda act, hook: base[name].clone()

    hooks: list[tuple[str, Any]] = [(hook_name("z", lyr), freeze_z(lyr)) for lyr in range(n_layers)]
    if freeze_mlps:
        hooks += [(n, freeze(n)) for n in (hook_name("mlp_out", lyr) for lyr in range(n_layers))]
    # step 2: cache the receivers' inputs
    points: dict[tuple[str, int], list[int]] = defaultdict(list)
    if receivers:
        for layer, head, which in receivers:
            points[(which, layer)].append(_kv_index(model, head, which))
    else:
        points[("resid_post", n_layers - 1)] = []
    targets = {hook_name(kind, layer): idx for (kind, layer), idx in points.items()}
    got = record(model.bridge, base_tokens, points, during=hooks).by_name()

    # step 3: patch only the receivers' inputs
    def patch(name: str, idx: list[int]) -> Any:
        def fn(act: Tensor, hook: Any) -> Tensor:
            if not idx:
                return got[name].clone()
            out = act.clone()
            ix = sorted(set(idx))
            out[:, :, ix] = got[name][:, :, ix]
            return out

        return fn

    return _run(model, base_tokens, [(n, patch(n, idx)) for n, idx in targets.items()])


def _senders(
    model: LoadedModel, senders: Sequence[Sequence[int]] | None, first: int, last: int
) -> list[Head]:
    if senders is None:
        return [Head(lyr, h) for lyr in range(first) for h in range(model.n_heads)]
    out = []
    for s in senders:
        head = Head(int(s[0]), int(s[1]))
        if not (0 <= head.layer < model.n_layers and 0 <= head.head < model.n_heads):
            raise WorkbenchError(
                f"path_patching: sender {head} out of range",
                f"layers 0..{model.n_layers - 1}, heads 0..{model.n_heads - 1}",
            )
        if head.layer >= last:
            raise WorkbenchError(
                f"path_patching: sender {head} is not before any receiver (layer {last - 1} "
                "is the last receiver layer)",
                "choose senders in earlier layers",
            )
        out.append(head)
    return out


def path_patching(
    model: LoadedModel,
    prompts: PromptSet,
    params: PathPatchingParams,
    *,
    reference: bool = False,
) -> AnalysisOutput:
    """Path-patching effect of every sender head through the given receivers.

    With the logits as receiver the senders run batched from their own layer
    (:mod:`path_patching_fast`, one forward's worth per sender at most); ``reference=True``
    (and head receivers) use the two-pass algorithm, one sender at a time.
    """
    params.validate()
    receivers = check_receivers(model, params.receivers)  # type: ignore[arg-type]
    first = receiver_layer(model, receivers)
    last = max((r[0] for r in receivers), default=model.n_layers)
    senders = _senders(model, params.senders, first, last)
    fast = not receivers and not reference
    extra: dict[str, Any] = {}
    if fast:  # the sweep's own resumable runs give the baselines: no extra forwards
        extra["self_checks"] = require(model, "resume")
        from workbench.forward.paths import base_runs, logits_receiver_sweep

        with fast_linears(model.bridge):  # oneDNN where faster (models.backend)
            clean_run, corrupt_run = base_runs(model, prompts, freeze_mlps=params.freeze_mlps)
        clean_logits, corrupt_logits = clean_run.final_logits, corrupt_run.final_logits
    else:
        clean, clean_logits = run_caches(model, prompts.clean)
        corrupt, corrupt_logits = run_caches(model, prompts.corrupt)
    ld_clean = M.logit_diff(clean_logits, prompts.correct, prompts.incorrect)
    ld_corrupt = M.logit_diff(corrupt_logits, prompts.correct, prompts.incorrect)
    denoise = params.direction == "denoising"
    base_tokens, ld_base = (prompts.corrupt, ld_corrupt) if denoise else (prompts.clean, ld_clean)
    c_mean, k_mean = float(ld_clean.mean()), float(ld_corrupt.mean())
    if params.metric == "norm_logit_diff":
        M.normalise(ld_base, c_mean, k_mean)  # raises early when undefined

    mean = np.full((model.n_layers, model.n_heads), np.nan)
    se = np.full_like(mean, np.nan)
    if fast:
        base_run, source_run = (corrupt_run, clean_run) if denoise else (clean_run, corrupt_run)
        with fast_linears(model.bridge):
            swept, extra["fallbacks"] = logits_receiver_sweep(
                base_run, source_run, senders, freeze_mlps=params.freeze_mlps
            )
    else:
        source, base = (clean, corrupt) if denoise else (corrupt, clean)
    for s in senders if fast else steps(senders, desc="path patching senders"):
        if fast:
            logits = swept[s]
        else:
            logits = path_patch_sender(
                model, base_tokens, s, receivers, source, base, freeze_mlps=params.freeze_mlps
            )
        ld = M.logit_diff(logits, prompts.correct, prompts.incorrect)
        M.check_finite("logit_diff", ld)
        v = ld - ld_base if params.metric == "logit_diff" else M.normalise(ld, c_mean, k_mean)
        v = v.double()
        mean[s.layer, s.head] = float(v.mean())
        se[s.layer, s.head] = float(v.std() / np.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return AnalysisOutput(
        head_metrics={"path_patching": HeadMetric(mean=mean, stderr=se, n=prompts.n)},
        info={
            "metric": params.metric,
            "direction": params.direction,
            "freeze_mlps": params.freeze_mlps,
            "receivers": LOGITS if not receivers else [list(r) for r in receivers],
            "n_senders": len(senders),
            "method": "batched_resumed" if fast else "two_pass",
            "clean_logit_diff": c_mean,
            "corrupt_logit_diff": k_mean,
            **extra,
        },
    )

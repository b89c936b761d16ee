"""Activation patching (Wang et al. 2022; Heimersheim & Nanda 2024), exact and fast.

Denoising runs the corrupted prompt and writes one activation (a slice: a head, a position, a
layer's output) from the clean run; noising runs the clean prompt and writes the corrupted
activation. The metric is read at the final position per prompt (``workbench.metrics``):
``logit_diff``, ``prob``, ``loss``, ``kl`` (to the clean run) or ``norm_logit_diff``
``(LD - mean LD_corrupt) / (mean LD_clean - mean LD_corrupt)``. Every cell keeps its per-prompt
values: mean, stderr (``std(ddof=1) / sqrt(n)``), n.

The numbers equal TransformerLens ``patching.get_act_patch_*`` (one full forward per index)
but are computed by :func:`exact.fast_sweep` (resume at the patched layer, many variants per
batch, final position only). With ``positions="from_first_diff"``, positions before the first
token where any clean and corrupted prompt differ are filled with the base run's own metric
without a forward: their activations are identical in both runs (causal attention), so the
patch is the identity. ``reference=True`` runs the slow oracle (:mod:`reference`) instead.

Output: per-head sweeps over all positions in ``head_metrics[metric]`` (``[n_layers, heads]``;
for ``k``/``v`` the head axis is the KV-head index); every cell also in ``tables["grid"]``
(``component, layer, head, pos, metric, value, stderr, n, kv_head, computed``; ``head = -1``
for per-layer components, ``pos = -1`` for all positions).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from workbench import metrics as M
from workbench.analyses.activation_patching import (
    KV_COMPONENTS,
    ActivationPatchingParams,
    head_axis,
)
from workbench.analyses.activation_patching.reference import reference_sweep
from workbench.errors import WorkbenchError
from workbench.forward.components import first_diff_position, layer_indices, n_head_slots
from workbench.forward.resume import ResumableRun, fast_sweep, run_fallbacks
from workbench.forward.selfcheck import require
from workbench.models.backend import fast_linears
from workbench.stats import mean_stderr
from workbench.types import AnalysisOutput, HeadMetric, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

__all__ = ["ActivationPatchingParams", "activation_patching"]


def _check_inputs(model: LoadedModel, prompts: PromptSet, params: ActivationPatchingParams) -> None:
    params.validate()
    clean, corrupt = prompts.clean, prompts.corrupt
    if clean.ndim != 2 or clean.shape != corrupt.shape:
        raise WorkbenchError(
            f"activation_patching: clean {tuple(clean.shape)} and corrupted "
            f"{tuple(corrupt.shape)} token shapes differ",
            "give [batch, pos] prompts of equal token length",
        )
    n = int(clean.shape[0])
    if prompts.correct.shape != (n,) or prompts.incorrect.shape != (n,):
        raise WorkbenchError(
            "activation_patching: answer ids must be one per prompt",
            f"give correct/incorrect of shape [{n}]",
        )
    vocab = int(model.cfg.d_vocab)
    for name, ids in (("correct", prompts.correct), ("incorrect", prompts.incorrect)):
        if bool((ids < 0).any() or (ids >= vocab).any()):
            raise WorkbenchError(
                f"activation_patching: {name} answer ids outside the vocabulary [0, {vocab})",
                "tokenize the answers with this model's tokenizer",
            )
    bad = [layer for layer in params.layers if layer >= model.n_layers]
    if bad:
        raise WorkbenchError(
            f"activation_patching: layers {bad} out of range (model has {model.n_layers})",
            f"give layers in 0..{model.n_layers - 1}",
        )


def _stats(values: Tensor) -> tuple[float, float, int]:
    mean, stderr = mean_stderr(values.double().cpu().numpy())
    return float(mean), float(stderr), int(values.shape[0])


def activation_patching(
    model: LoadedModel,
    prompts: PromptSet,
    params: ActivationPatchingParams,
    *,
    reference: bool = False,
) -> AnalysisOutput:
    """Patch every index of ``params.component``; see the module docstring. The fast path's
    matrix products run on oneDNN where faster (:mod:`workbench.models.backend`, same fp32
    math); the reference stays on the default backend."""
    _check_inputs(model, prompts, params)
    checks = {} if reference else require(model, "resume")
    backend = contextlib.nullcontext(0) if reference else fast_linears(model.bridge)
    with backend as n_fast:
        out = _activation_patching(model, prompts, params, reference)
    out.info["linear_backend"] = "onednn" if n_fast else "default"
    if checks:
        out.info["self_checks"] = checks
    return out


def _activation_patching(
    model: LoadedModel, prompts: PromptSet, params: ActivationPatchingParams, reference: bool
) -> AnalysisOutput:
    import pandas as pd

    comp, metric_name = params.component, params.metric
    clean, corrupt = prompts.clean, prompts.corrupt
    n, seq_len = int(clean.shape[0]), int(clean.shape[1])
    denoise = params.direction == "denoising"
    base_tokens, donor_tokens = (corrupt, clean) if denoise else (clean, corrupt)

    clean_run = ResumableRun(model, clean, [comp])
    corrupt_run = ResumableRun(model, corrupt, [comp])
    base, donor = (corrupt_run, clean_run) if denoise else (clean_run, corrupt_run)
    clean_logits = clean_run.final_logits

    def metric(logits: Tensor) -> Tensor:
        reps = int(logits.shape[0]) // n
        return M.per_prompt(
            metric_name,
            logits,
            prompts.correct.repeat(reps),
            prompts.incorrect.repeat(reps),
            clean_logits.repeat(reps, 1),
        )

    clean_vals, corrupt_vals = metric(clean_logits), metric(corrupt_run.final_logits)
    # Logit differences read two columns per prompt: unembed only the answer columns.
    cols, col_metric = None, metric
    if metric_name in ("logit_diff", "norm_logit_diff"):
        cols, inverse = torch.unique(
            torch.cat([prompts.correct, prompts.incorrect]), return_inverse=True
        )
        col_correct, col_incorrect = inverse[:n], inverse[n:]

        def col_metric(logits: Tensor) -> Tensor:
            reps = int(logits.shape[0]) // n
            return M.per_prompt(
                "logit_diff", logits, col_correct.repeat(reps), col_incorrect.repeat(reps)
            )

    base_vals = corrupt_vals if denoise else clean_vals

    first = first_diff_position(clean, corrupt)
    skip_prefix = params.positions == "from_first_diff"
    per_pos = params.is_per_position
    computed_pos = list(range(first if skip_prefix else 0, seq_len))
    skipped_pos = list(range(first)) if skip_prefix and per_pos else []
    layers = sorted(set(params.layers)) if params.layers else list(range(model.n_layers))
    todo = {layer: layer_indices(model, comp, per_pos, computed_pos) for layer in layers}

    fallbacks: dict[str, str] = {}
    if reference:
        results = reference_sweep(model, base_tokens, donor_tokens, comp, todo, metric)
        cost = float(sum(len(v) for v in todo.values())) + 2.0
        start = 0
    else:
        wanted = first if (skip_prefix or not per_pos) else 0
        results, sweep_cost, start = fast_sweep(
            base, donor, comp, todo, col_metric, params.batch_tokens, start=wanted, columns=cols
        )
        cost = sweep_cost + 2.0
        fallbacks = run_fallbacks(base, wanted, start)
    computed_keys = set(results)
    if skipped_pos:  # per-position sweeps only: the identical prefix is the base run itself
        for layer in layers:
            for ix in layer_indices(model, comp, True, skipped_pos):
                results[(layer, ix)] = base_vals

    c_mean, k_mean = float(clean_vals.mean()), float(corrupt_vals.mean())
    if metric_name == "norm_logit_diff":
        results = {key: M.normalise(v, c_mean, k_mean) for key, v in results.items()}

    rows: list[dict[str, Any]] = []
    for (layer, ix), vals in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean, stderr, cnt = _stats(vals)
        rows.append(
            {
                "component": comp,
                "layer": layer,
                "head": ix.head,
                "pos": ix.pos,
                "metric": metric_name,
                "value": mean,
                "stderr": stderr,
                "n": cnt,
                "kv_head": comp in KV_COMPONENTS,
                "computed": (layer, ix) in computed_keys,
            }
        )
    grid = pd.DataFrame(rows)

    head_metrics: dict[str, HeadMetric] = {}
    n_h = n_head_slots(model, comp)
    if n_h and not per_pos:
        mean_arr = np.full((model.n_layers, n_h), np.nan)
        err_arr = np.full((model.n_layers, n_h), np.nan)
        for r in rows:
            mean_arr[r["layer"], r["head"]] = r["value"]
            err_arr[r["layer"], r["head"]] = r["stderr"]
        head_metrics[metric_name] = HeadMetric(mean_arr, err_arr, n)

    n_indices = sum(len(layer_indices(model, comp, per_pos, range(seq_len))) for _ in layers)
    info: dict[str, Any] = {
        "component": comp,
        "direction": params.direction,
        "metric": metric_name,
        "baseline_clean": 1.0 if metric_name == "norm_logit_diff" else c_mean,
        "baseline_corrupted": 0.0 if metric_name == "norm_logit_diff" else k_mean,
        "clean_logit_diff_mean": float(
            M.logit_diff(clean_logits, prompts.correct, prompts.incorrect).mean()
        ),
        "first_diff_pos": first,
        "positions_patched": computed_pos if per_pos else "all",
        "positions_filled_with_baseline": skipped_pos,
        "layers": layers,
        "head_axis": head_axis({"component": comp}),
        "recomputed_from_pos": start,
        "n_patches": len(results),
        "n_patches_computed": len(computed_keys),
        "cost_forward_equivalents": round(cost, 3),
        "cost_one_forward_per_index": float(n_indices + 2),
        "method": "reference" if reference else "fast_exact",
    }
    if not reference:
        info["fallbacks"] = fallbacks
    return AnalysisOutput(head_metrics=head_metrics, tables={"grid": grid}, info=info)

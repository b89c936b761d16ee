"""Many per-head interventions at once, batched through the resume-at-layer machinery.

A *variant* is a set of heads that one intervention acts on together (one head, the heads of one
layer, a chosen or random set). Every activation before the variant's lowest layer ``l`` equals
the unmodified run's, so the variant resumes at block ``l`` from the base run's ``resid_pre[l]``
(:class:`~workbench.forward.resume.ResumableRun`: blocks called with the
arguments the model gave them, GQA and Gemma's sliding layers included). Variants of many layers
share one batch per block (*waves* of at most ``batch_tokens`` rows x positions, as the patching
sweep): each joins the batch right before its lowest layer, ``n`` rows (one per prompt), and at
every layer ``i`` with heads of some variant, one hook on the intervention's activation
(``pattern``, ``scores`` or ``z``) edits each row's own heads only:
``edit(act, mask[rows, n_heads], prompt_of_row[rows], layer) -> act``. Only the final position
is unembedded; ``metric(logits[rows, vocab]) -> [rows, ...]`` per prompt.

Cost in forwards of the ``n`` prompts: ``sum_v (L - l_v) / L`` instead of one forward per
variant (:func:`naive_sweep`, the reference it is tested against: the intervention's own
context manager around a full forward per variant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked
from workbench.progress import steps
from workbench.types import Head

if TYPE_CHECKING:
    from workbench.forward.resume import ResumableRun
    from workbench.models.loading import LoadedModel

Edit = Callable[[Tensor, Tensor, Tensor, int], Tensor]
"""``(act, mask[rows, n_heads], prompt_of_row[rows], layer) -> act``."""
Metric = Callable[[Tensor], Tensor]
KINDS = ("pattern", "scores", "z")
_HEAD_AXIS = {"pattern": 1, "scores": 1, "z": 2}


def check_variants(model: LoadedModel, variants: Sequence[Sequence[Head]]) -> list[list[Head]]:
    """Non-empty head sets inside the model, or a one-line error."""
    out = []
    for i, v in enumerate(variants):
        heads = sorted({Head(int(h.layer), int(h.head)) for h in v})
        if not heads:
            raise WorkbenchError(f"variant {i} has no heads", "give at least one head per set")
        for h in heads:
            if not (0 <= h.layer < model.n_layers and 0 <= h.head < model.n_heads):
                raise WorkbenchError(
                    f"head L{h.layer}H{h.head} is outside the model ({model.n_layers} layers, "
                    f"{model.n_heads} heads)",
                    f"use layers 0..{model.n_layers - 1} and heads 0..{model.n_heads - 1}",
                )
        out.append(heads)
    return out


def head_mask(act: Tensor, mask: Bool[Tensor, "rows heads"], kind: str) -> Bool[Tensor, "rows ..."]:
    """``mask`` broadcast to ``act``'s shape along its head axis (``kind``)."""
    axis = _HEAD_AXIS[kind]
    shape = [int(mask.shape[0])] + [1] * (act.ndim - 1)
    shape[axis] = int(mask.shape[1])
    return mask.reshape(shape)


def sweep_heads(
    model: LoadedModel,
    base: ResumableRun,
    variants: Sequence[Sequence[Head]],
    kind: str,
    edit: Edit,
    metric: Metric,
    *,
    batch_tokens: int = 32768,
    desc: str = "head sweep",
) -> tuple[list[Tensor], float]:
    """``metric`` of every variant (a ``[n, ...]`` tensor each, in order) and the cost in
    forwards of the ``n`` prompts (module docstring)."""
    if kind not in KINDS:
        raise WorkbenchError(f"unknown intervention point '{kind}'", f"use one of {KINDS}")
    sets = check_variants(model, variants)
    n, n_layers, t = base.n, model.n_layers, base.seq_len
    order = sorted(range(len(sets)), key=lambda v: sets[v][0].layer)
    per_wave = max(1, batch_tokens // (n * t))
    out: list[Tensor | None] = [None] * len(sets)
    cost = 0.0
    waves = [order[i : i + per_wave] for i in range(0, len(order), per_wave)]
    for wave in steps(waves, desc=desc):
        entry = {v: sets[v][0].layer for v in wave}  # sorted by entry layer already
        entries: dict[int, Tensor] = {}
        for v in wave:
            r = base.resid(entry[v])
            entries[entry[v]] = r if entry[v] not in entries else torch.cat([entries[entry[v]], r])
        touched = sorted({h.layer for v in wave for h in sets[v]})
        hooks = [
            (hook_name(kind, la), _hook(kind, la, wave, entry, sets, n, edit)) for la in touched
        ]
        with hooked(model.bridge, hooks):
            logits = base.run_wave(entries, last_query_only=n_layers - 1 not in touched)
        values = metric(logits)
        for j, v in enumerate(wave):
            out[v] = values[j * n : (j + 1) * n]
        cost += sum((n_layers - entry[v]) / n_layers for v in wave)
    return [x for x in out if x is not None], cost


def _hook(
    kind: str, layer: int, wave: list[int], entry: dict[int, int], sets: list[list[Head]], n: int,
    edit: Edit,
) -> Any:  # fmt: skip
    """At ``layer`` the batch holds the wave's variants with entry layer <= ``layer``, in
    order: row ``j * n + p`` is variant ``wave[j]``'s prompt ``p``."""
    present = [v for v in wave if entry[v] <= layer]

    def hook(act: Tensor, hook: Any) -> Tensor:
        rows = len(present) * n
        if int(act.shape[0]) != rows:
            raise WorkbenchError(
                f"head sweep: layer {layer} saw {int(act.shape[0])} rows, expected {rows}",
                "report this (bridge version?)",
            )
        heads = int(act.shape[_HEAD_AXIS[kind]])
        mask = torch.zeros(rows, heads, dtype=torch.bool)
        for j, v in enumerate(present):
            for h in sets[v]:
                if h.layer == layer:
                    mask[j * n : (j + 1) * n, h.head] = True
        prompt = torch.arange(rows) % n
        return edit(act, mask.to(act.device), prompt.to(act.device), layer)

    return hook


def zero_edit(act: Tensor, mask: Tensor, prompt: Tensor, layer: int) -> Tensor:
    """Zero-ablate each row's heads at ``hook_z``: ``z[r, :, h] = 0`` where ``mask[r, h]``."""
    return torch.where(head_mask(act, mask, "z"), torch.zeros((), dtype=act.dtype), act)


@torch.no_grad()
def naive_sweep(
    model: LoadedModel,
    tokens: Int[Tensor, "n pos"],
    variants: Sequence[Sequence[Head]],
    context: Callable[[list[Head]], Any],
    metric: Metric,
) -> list[Tensor]:
    """The slow reference: per variant, one full forward inside ``context(heads)``."""
    out = []
    for heads in check_variants(model, variants):
        with context(heads):
            logits = model.bridge(tokens, prepend_bos=False, return_type="logits")[:, -1]
        out.append(metric(logits.float()))
    return out


def final_logits(model: LoadedModel, tokens: Int[Tensor, "n pos"]) -> Float[Tensor, "n vocab"]:
    """The unmodified model's final-position logits."""
    with torch.no_grad():
        return model.bridge(tokens, prepend_bos=False, return_type="logits")[:, -1].float()

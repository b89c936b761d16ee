"""Interventions as context managers: head ablation and activation patching.

Every intervention attaches its forward hooks through :func:`workbench.hooks.hooked`, so the
hooks are removed when the ``with`` block ends, normally or by an exception. Inside the block
the bridge runs with the intervention; the block yields the bridge.

Head ablation acts on ``hook_z`` (``batch pos n_heads d_head``: the head's attention-weighted
values, before ``W_O``; per *query* head, also under grouped-query attention):

- ``zero``:     ``z[:, :, h] = 0`` (the head writes nothing but its share of the output bias)
- ``mean``:     ``z[:, p, h] = mean_i z_ref[i, p, h]``: the mean over the reference prompts
  *per position* ``p`` (the usual choice for prompt templates of fixed length, e.g. IOI). The
  reference batch must have the input's length; ``mean_over_positions=True`` averages over
  positions too, which works for any input length.
- ``resample``: ``z[i, :, h] = z_ref[src(i), :, h]``: every prompt takes the head's ``z`` from
  another reference prompt. ``src`` is a seeded random cyclic permutation (a derangement when
  the reference has more than one prompt, so with ``reference = input`` no prompt keeps its own
  value); input prompt ``i`` uses reference row ``src(i mod n_ref)``.

The reference activations are computed once, on entry, with one forward pass over
``reference_tokens`` and no intervention; code that ablates many head sets against the same
reference computes them once with :func:`reference_z` and passes them as ``reference_acts``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked, record
from workbench.types import Head

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

AblationKind = Literal["zero", "mean", "resample"]
ABLATIONS: tuple[str, ...] = ("zero", "mean", "resample")

_HEAD_DIM = {"q": 2, "k": 2, "v": 2, "z": 2, "pattern": 1, "scores": 1}
"""The head axis of each per-head hook kind (others have none)."""
_POS_DIM = {"pattern": 2, "scores": 2}
"""The position axis (the query axis for patterns); 1 for every other kind."""


def _check_heads(model: LoadedModel, heads: Iterable[Head]) -> list[Head]:
    out = []
    for h in heads:
        layer, head = int(h.layer), int(h.head)
        if not 0 <= layer < model.n_layers or not 0 <= head < model.n_heads:
            raise WorkbenchError(
                f"head L{layer}H{head} is outside the model ({model.n_layers} layers, "
                f"{model.n_heads} heads)",
                f"use layers 0..{model.n_layers - 1} and heads 0..{model.n_heads - 1}",
            )
        out.append(Head(layer, head))
    return sorted(set(out))


def reference_z(
    model: LoadedModel, tokens: Int[Tensor, "batch pos"], layers: Sequence[int] | None = None
) -> dict[int, Tensor]:
    """``hook_z`` of ``layers`` (all by default) on ``tokens``, one clean forward pass (no
    intervention): the ``reference_acts`` of :func:`ablate_heads`."""
    layers = range(model.n_layers) if layers is None else layers
    rec = record(model.bridge, tokens, [("z", layer) for layer in layers])
    return {layer: act for (_, layer), act in rec.acts.items()}


def resample_sources(n_ref: int, seed: int) -> Tensor:
    """``src[i]``: the reference row prompt ``i`` reads from; a seeded random cyclic
    permutation, so ``src[i] != i`` whenever ``n_ref > 1``."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_ref, generator=gen)
    src = torch.empty(n_ref, dtype=torch.long)
    src[order] = order.roll(-1)
    return src


@contextlib.contextmanager
def ablate_heads(
    model: LoadedModel,
    heads: Iterable[Head],
    how: AblationKind = "zero",
    *,
    reference_tokens: Int[Tensor, "ref pos"] | None = None,
    seed: int = 0,
    mean_over_positions: bool = False,
    reference_acts: dict[int, Tensor] | None = None,
) -> Iterator[Any]:
    """Ablate ``heads`` (any set, across layers) for the duration of the block (module doc).
    ``reference_acts`` (from :func:`reference_z`) stands in for ``reference_tokens``' forward."""
    if how not in ABLATIONS:
        raise WorkbenchError(f"unknown ablation '{how}'", f"choose from {', '.join(ABLATIONS)}")
    chosen = _check_heads(model, heads)
    by_layer: dict[int, list[int]] = {}
    for h in chosen:
        by_layer.setdefault(h.layer, []).append(h.head)
    ref: dict[int, Tensor] = {}
    n_ref = 1
    if how != "zero" and reference_acts is not None:
        missing = sorted(set(by_layer) - set(reference_acts))
        if missing:
            raise WorkbenchError(
                f"reference_acts lack the ablated layers {missing}",
                "compute them with reference_z(model, tokens) (all layers by default)",
            )
        ref = reference_acts
        n_ref = int(next(iter(ref.values())).shape[0]) if ref else 1
    elif how != "zero":
        if reference_tokens is None or reference_tokens.ndim != 2 or reference_tokens.shape[0] < 1:
            raise WorkbenchError(
                f"{how} ablation needs reference_tokens of shape [batch, pos]",
                "pass reference_tokens=prompts.clean (or another batch of the same task)",
            )
        ref = reference_z(model, reference_tokens, sorted(by_layer))
        n_ref = int(reference_tokens.shape[0])
    src = resample_sources(n_ref, seed) if how == "resample" else None

    def make(layer: int, idx: list[int]) -> Any:
        def hook(z: Tensor, hook: Any) -> Tensor:
            out = z.clone()
            if how == "zero":
                out[:, :, idx] = 0.0
                return out
            r = ref[layer][:, :, idx].to(out.dtype)
            if how == "mean":
                if mean_over_positions:
                    out[:, :, idx] = r.mean(dim=(0, 1))
                    return out
                if r.shape[1] != out.shape[1]:
                    raise WorkbenchError(
                        f"mean ablation per position: reference length {r.shape[1]} != input "
                        f"length {out.shape[1]}",
                        "use a reference batch of the input's length or mean_over_positions=True",
                    )
                out[:, :, idx] = r.mean(dim=0)
                return out
            assert src is not None
            rows = src[torch.arange(out.shape[0]) % r.shape[0]]
            if r.shape[1] != out.shape[1]:
                raise WorkbenchError(
                    f"resample ablation: reference length {r.shape[1]} != input length "
                    f"{out.shape[1]}",
                    "use a reference batch of the input's token length",
                )
            out[:, :, idx] = r[rows]
            return out

        return hook

    hooks = [(hook_name("z", la), make(la, idx)) for la, idx in sorted(by_layer.items())]
    with hooked(model.bridge, hooks) as bridge:
        yield bridge


@contextlib.contextmanager
def patch_activation(
    model: LoadedModel,
    hook_kind: str,
    layer: int,
    value: Tensor,
    *,
    head: int | None = None,
    positions: Sequence[int] | None = None,
) -> Iterator[Any]:
    """Overwrite the activation ``hook_kind`` at ``layer`` with ``value`` inside the block.

    ``head`` selects one head (kinds ``q, k, v, z``: axis 2, ``k``/``v`` per KV head;
    ``pattern, scores``: axis 1); ``positions`` selects positions (the query axis for patterns).
    ``value`` is either a whole activation of the hooked shape (its selected part is copied in)
    or exactly the selected part. The given tensor is cloned, never written to, and the hooked
    activation is replaced by a patched copy.
    """
    if not 0 <= layer < model.n_layers:
        raise WorkbenchError(
            f"layer {layer} is outside the model ({model.n_layers} layers)",
            f"use layers 0..{model.n_layers - 1}",
        )
    name = hook_name(hook_kind, layer)
    head_dim = _HEAD_DIM.get(hook_kind)
    if head is not None and head_dim is None:
        raise WorkbenchError(
            f"hook kind '{hook_kind}' has no head axis", f"head= works with {', '.join(_HEAD_DIM)}"
        )
    pos_dim = _POS_DIM.get(hook_kind, 1)
    given = value.detach().clone()
    pos_index = None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)

    def hook(act: Tensor, hook: Any) -> Tensor:
        index: list[Any] = [slice(None)] * act.ndim
        if head is not None:
            assert head_dim is not None
            if not 0 <= head < act.shape[head_dim]:
                raise WorkbenchError(
                    f"head {head} is outside {hook_kind} (size {act.shape[head_dim]})",
                    f"use heads 0..{act.shape[head_dim] - 1}",
                )
            index[head_dim] = head
        if pos_index is not None:
            index[pos_dim] = pos_index.to(act.device)
        sel = tuple(index)
        out = act.clone()
        target_shape = out[sel].shape
        if given.shape == act.shape:
            out[sel] = given.to(out.device, out.dtype)[sel]
        elif given.shape == target_shape:
            out[sel] = given.to(out.device, out.dtype)
        else:
            raise WorkbenchError(
                f"patch value of shape {tuple(given.shape)} fits neither {name} "
                f"{tuple(act.shape)} nor its selection {tuple(target_shape)}",
                "pass the whole activation or exactly the selected part",
            )
        return out

    with hooked(model.bridge, [(name, hook)]) as bridge:
        yield bridge

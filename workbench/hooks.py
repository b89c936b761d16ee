"""Hook names and layouts, built in one place; the context manager every intervention goes
through, and :func:`record`, the one way an activation is captured.

TransformerLens 4.x bridge names (per layer ``l``):

==================  ==========================================  ==============================
kind                hook                                        shape
==================  ==========================================  ==============================
``resid_pre``       ``blocks.{l}.hook_resid_pre``               ``batch pos d_model``
``resid_mid``       ``blocks.{l}.hook_resid_mid``               ``batch pos d_model``
``resid_post``      ``blocks.{l}.hook_resid_post``              ``batch pos d_model``
``attn_out``        ``blocks.{l}.hook_attn_out``                ``batch pos d_model``
``mlp_out``         ``blocks.{l}.hook_mlp_out``                 ``batch pos d_model``
``q``               ``blocks.{l}.attn.hook_q``                  ``batch pos n_heads d_head``
``k`` / ``v``       ``blocks.{l}.attn.hook_k`` / ``hook_v``     ``batch pos n_kv_heads d_head``
``rot_q``           ``blocks.{l}.attn.hook_rot_q`` (after RoPE) ``batch pos n_heads d_head``
``rot_k``           ``blocks.{l}.attn.hook_rot_k`` (after RoPE) ``batch pos n_kv_heads d_head``
``z``               ``blocks.{l}.attn.hook_z``                  ``batch pos n_heads d_head``
``pattern``         ``blocks.{l}.attn.hook_pattern``            ``batch n_heads q_pos k_pos``
``scores``          ``blocks.{l}.attn.hook_attn_scores``        ``batch n_heads q_pos k_pos``
``q_input`` ...     ``blocks.{l}.attn.hook_q_input`` (k, v)     ``batch pos n_heads d_model``
``mlp_in``          ``blocks.{l}.hook_mlp_in``                  ``batch pos d_model``
==================  ==========================================  ==============================

The input hooks (``q_input``, ``k_input``, ``v_input``, ``mlp_in``: what each receiver of an
edge reads) fire only while the bridge's split-qkv and mlp-in hooks are switched on (edge
attribution does, ``workbench.edges.common``), so they are not in :data:`HOOK_KINDS`.

Layouts: grouped-query attention shares each KV head among ``n_heads / n_kv_heads`` query
heads; query head ``h`` reads KV head ``kv_head_of(h) = h // (n_heads / n_kv_heads)``
(:func:`kv_group`). A per-head table's ``head`` column indexes query heads, KV heads or nothing
(``workbench.types.HEAD_AXES``), as the analysis's registry entry declares.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

_LAYER_HOOKS = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "rot_q": "blocks.{l}.attn.hook_rot_q",
    "rot_k": "blocks.{l}.attn.hook_rot_k",
    "z": "blocks.{l}.attn.hook_z",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "scores": "blocks.{l}.attn.hook_attn_scores",
}

_INPUT_HOOKS = {
    "q_input": "blocks.{l}.attn.hook_q_input",
    "k_input": "blocks.{l}.attn.hook_k_input",
    "v_input": "blocks.{l}.attn.hook_v_input",
    "mlp_in": "blocks.{l}.hook_mlp_in",
}

HOOK_KINDS: tuple[str, ...] = tuple(_LAYER_HOOKS)
HEAD_COMPONENTS = ("z", "q", "pattern")  # patchable kinds indexed by query head
KV_COMPONENTS = ("k", "v")  # patchable kinds indexed by KV head


def hook_name(kind: str, layer: int) -> str:
    """The bridge hook name of ``kind`` at ``layer`` (see the module table)."""
    template = _LAYER_HOOKS.get(kind) or _INPUT_HOOKS.get(kind)
    if template is None:
        known = ", ".join([*_LAYER_HOOKS, *_INPUT_HOOKS])
        raise ValueError(f"unknown hook kind {kind!r}; known: {known}")
    return template.format(l=layer)


HookFn = Callable[..., Any]


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(bridge: Any) -> threading.RLock:
    """The one re-entrant lock of a model (its bridge): hooks live on the model, so two threads
    hooking one model at once would see each other's hooks. Every hooked forward
    (:func:`hooked`, so :func:`record` too) and every analysis run by the runner holds it;
    callers in several threads serialise instead of corrupting each other's results."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(bridge)
        if lock is None:
            lock = _LOCKS[bridge] = threading.RLock()
        return lock


@contextlib.contextmanager
def hooked(bridge: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[Any]:
    """Attach forward hooks for the duration of the block, holding the model's lock
    (:func:`model_lock`); they are removed even on error."""
    with model_lock(bridge), bridge.hooks(fwd_hooks=list(fwd_hooks), reset_hooks_end=True):
        yield bridge


def kv_group(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per KV head (1 without grouped-query attention)."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads do not split over {n_kv_heads} KV heads")
    return n_heads // n_kv_heads


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The KV head query head ``head`` reads (module docstring)."""
    return head // kv_group(n_heads, n_kv_heads)


def every_layer(kinds: Iterable[str], n_layers: int) -> list[tuple[str, int]]:
    """``(kind, layer)`` for each kind at each of ``n_layers`` layers (kind-major)."""
    return [(kind, layer) for kind in kinds for layer in range(n_layers)]


@dataclass(eq=False)
class Recording:
    """Activations captured by :func:`record`: ``acts[(kind, layer)]`` and, when asked for,
    the ``logits`` of the run (``[batch, d_vocab]`` at the last position, or every position)."""

    acts: dict[tuple[str, int], Any] = field(default_factory=dict)
    logits: Tensor | None = None

    def by_name(self) -> dict[str, Any]:
        """The same activations keyed by hook name."""
        return {hook_name(kind, layer): act for (kind, layer), act in self.acts.items()}


def record(
    bridge: Any,
    tokens: Tensor,
    points: Iterable[tuple[str, int]],
    *,
    keep: Callable[[Tensor], Any] | None = None,
    logits: str | None = None,
    during: Sequence[tuple[str, HookFn]] = (),
) -> Recording:
    """One forward pass of ``tokens`` (no gradients, BOS not added) capturing the activation of
    every ``(kind, layer)`` in ``points`` as ``keep(act)`` (default: a detached copy), with the
    interventions ``during`` attached first (none by default: a clean run). ``logits``: None
    (not computed), ``"last"`` (the last position) or ``"all"``. Hooks are removed on exit,
    even on error."""
    import torch

    out = Recording()
    keep = keep or (lambda act: act.detach().clone())

    def grab(point: tuple[str, int]) -> HookFn:
        def hook(act: Tensor, hook: Any) -> None:
            out.acts[point] = keep(act)

        return hook

    hooks = [*during, *((hook_name(kind, layer), grab((kind, layer))) for kind, layer in points)]
    with torch.no_grad(), hooked(bridge, hooks):
        if logits is None:
            bridge(tokens, prepend_bos=False, return_type=None)
        else:
            lg = bridge(tokens, prepend_bos=False)
            out.logits = (lg[:, -1] if logits == "last" else lg).detach()
    return out

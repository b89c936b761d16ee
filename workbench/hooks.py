"""Hook names, built in one place, and the context manager every intervention goes through.

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
``z``               ``blocks.{l}.attn.hook_z``                  ``batch pos n_heads d_head``
``pattern``         ``blocks.{l}.attn.hook_pattern``            ``batch n_heads q_pos k_pos``
``scores``          ``blocks.{l}.attn.hook_attn_scores``        ``batch n_heads q_pos k_pos``
==================  ==========================================  ==============================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_LAYER_HOOKS = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "z": "blocks.{l}.attn.hook_z",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "scores": "blocks.{l}.attn.hook_attn_scores",
}

HOOK_KINDS: tuple[str, ...] = tuple(_LAYER_HOOKS)


def hook_name(kind: str, layer: int) -> str:
    """The bridge hook name of ``kind`` at ``layer`` (see the module table)."""
    try:
        return _LAYER_HOOKS[kind].format(l=layer)
    except KeyError:
        raise ValueError(f"unknown hook kind {kind!r}; known: {', '.join(_LAYER_HOOKS)}") from None


HookFn = Callable[..., Any]


@contextlib.contextmanager
def hooked(bridge: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[Any]:
    """Attach forward hooks for the duration of the block; they are removed even on error."""
    with bridge.hooks(fwd_hooks=list(fwd_hooks), reset_hooks_end=True):
        yield bridge

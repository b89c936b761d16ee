"""Workarounds for known upstream breaks: small, applied at boot, checked by the self-checks.

transformers 5.24 renamed the decoder layers' cache keyword ``past_key_values`` to ``cache``
(a ``deprecate_kwarg`` shim on the layers' ``forward``). TransformerLens 4.3's
``AttentionBridge._update_kv_cache`` (the one place every bridge attention updates the HF KV
cache) still looks only for ``past_key_values`` / ``layer_past``, finds neither, and never
writes the cache: every cached decoding step then attends to itself alone (``docs/install.md``,
"transformers 5.24 and the compat shim"). :func:`install` wraps that method so a cache passed
as ``cache`` is used too. On transformers < 5.24 the keyword never appears and the wrapper only
forwards the call.

Nothing here is trusted: :mod:`workbench.forward.selfcheck` compares cached decoding and the
patching engine's resumed runs against full forwards on every loaded model, with or without
these workarounds. ``WORKBENCH_COMPAT=off`` leaves the libraries untouched (to see a break as
upstream ships it).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

CACHE_KEYWORDS = ("past_key_values", "past_key_value", "layer_past", "cache")
"""Names under which a decoder layer may receive its HF cache, across transformers releases."""

_MARK = "_workbench_cache_kwarg"


def enabled() -> bool:
    return os.environ.get("WORKBENCH_COMPAT", "on").strip().lower() not in ("off", "0", "false")


def _wrap_update_kv_cache(fn: Any) -> Any:
    @functools.wraps(fn)
    def update(self: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        if (
            kwargs.get("past_key_values") is None
            and kwargs.get("layer_past") is None
            and kwargs.get("cache") is not None
        ):
            kwargs["past_key_values"] = kwargs["cache"]
        return fn(self, k, v, **kwargs)

    setattr(update, _MARK, True)
    return update


def install() -> list[str]:
    """Apply the workarounds (idempotent); returns the names of those active."""
    if not enabled():
        return []
    from transformer_lens.model_bridge.generalized_components import attention

    cls = attention.AttentionBridge
    method = cls.__dict__.get("_update_kv_cache")
    if method is None:  # TransformerLens moved it: nothing to wrap, the self-checks decide
        return []
    if not getattr(method, _MARK, False):
        cls._update_kv_cache = _wrap_update_kv_cache(method)  # type: ignore[method-assign]
        # The bridge itself passes `past_key_values` to the HF model on every cached step; on
        # 5.24 each call warns that the name is deprecated. Only that warning is silenced.
        warnings.filterwarnings(
            "ignore", message=r"`past_key_values` is deprecated", category=FutureWarning
        )
    return ["cache_kwarg"]


def active() -> list[str]:
    """The workarounds in force now (for the run's info)."""
    if not enabled():
        return []
    try:
        from transformer_lens.model_bridge.generalized_components import attention
    except ImportError:
        return []
    method = attention.AttentionBridge.__dict__.get("_update_kv_cache")
    return ["cache_kwarg"] if getattr(method, _MARK, False) else []

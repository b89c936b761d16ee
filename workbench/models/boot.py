"""Booting a loaded HF model into a TransformerLens ``TransformerBridge``: the one place it is done.

:func:`boot_bridge` is used by the model loader (named, GGUF and hub models) and by the tiny
test models; :func:`quiet` silences what transformers and TransformerLens print while loading.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence stdout, stderr, warnings, log records below ERROR (transformers' and
    TransformerLens' loggers included) and hub progress bars for the duration of the block."""
    from transformers.utils import logging as hf_logging

    previous = logging.root.manager.disable
    hf_level = hf_logging.get_verbosity()
    tl_log = logging.getLogger("transformer_lens")
    tl_level = tl_log.level
    bars = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    logging.disable(logging.WARNING)
    hf_logging.set_verbosity_error()
    tl_log.setLevel(logging.ERROR)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        hf_logging.set_verbosity(hf_level)
        tl_log.setLevel(tl_level)
        if bars is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = bars


@contextlib.contextmanager
def keep_tokenizer(tokenizer: Any) -> Iterator[None]:
    """Keep TransformerLens from reloading an in-memory tokenizer at boot.

    At boot TransformerLens (``get_tokenizer_with_bos``) re-loads the tokenizer by its
    ``name_or_path`` with ``add_bos_token=True`` unless ``init_kwargs`` says BOS is already on;
    a tokenizer built in memory has no name to load from (a ``KeyError``). Claiming
    ``add_bos_token`` for the boot makes it keep our object; TransformerLens then probes the
    real encoding and records ``tokenizer_prepends_bos=False``. The claim is undone afterwards.
    """
    kwargs = tokenizer.init_kwargs
    saved = {k: kwargs[k] for k in ("name_or_path", "add_bos_token") if k in kwargs}
    kwargs.setdefault("name_or_path", getattr(tokenizer, "name_or_path", ""))
    kwargs["add_bos_token"] = True
    try:
        yield
    finally:
        for key in ("name_or_path", "add_bos_token"):
            kwargs.pop(key, None)
        kwargs.update(saved)


def boot_bridge(
    hf_model: Any,
    tokenizer: Any,
    name: str,
    *,
    device: str = "cpu",
    in_memory_tokenizer: bool = False,
    architectures: Sequence[str] = (),
) -> TransformerBridge:
    """Wrap a loaded HF model in a ``TransformerBridge`` on ``device``, quietly, in eval mode,
    its parameters frozen (``requires_grad=False``; analyses ask for gradients of activations).

    ``name`` is the HF name the bridge's architecture adapter is looked up by (e.g.
    ``"workbench/tiny-llama"`` is only a label): with ``hf_model`` given the bridge reads
    ``hf_model.config`` and never contacts the hub. ``architectures`` overrides the config's
    (Gemma 3's GGUF config has none). ``in_memory_tokenizer``: the tokenizer was built in
    memory and cannot be reloaded by name (see :func:`keep_tokenizer`). The upstream
    workarounds of :mod:`workbench.models.compat` are installed first. The bridge wraps the HF
    modules in place and forces eager attention: the HF model still computes the same logits,
    but its ``state_dict`` keys gain ``_original_component`` segments, so save weights before
    booting or from a deep copy. It prepends BOS to *string* inputs by default
    (``cfg.default_prepend_bos``); pass token tensors with ``prepend_bos=False``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from workbench.models import compat

    compat.install()
    if architectures:
        hf_model.config.architectures = list(architectures)
    keep = keep_tokenizer(tokenizer) if in_memory_tokenizer else contextlib.nullcontext()
    with quiet(), keep:
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=device
        )
    hf_model.eval()
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge

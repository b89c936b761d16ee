"""Loading models into TransformerLens 4.x (``TransformerBridge``), offline, with a weights cache.

GGUF models are de-quantised by ``transformers`` (20-60 s); the result is written once as
safetensors + config + tokenizer under ``$WORKBENCH_HOME/models/<name>-<fingerprint>/`` so a
warm load takes seconds. Nothing is ever unpickled: weights are read with safetensors only.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.home import workbench_home
from workbench.models.boot import quiet
from workbench.models.codec import TextCodec, default_prepend_bos
from workbench.models.known import ModelEntry, fingerprint, get_entry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    """A booted bridge with what every analysis needs to know about it."""

    name: str
    entry: ModelEntry
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    codec: TextCodec
    fingerprint: str
    load_seconds: float = 0.0
    cache_hit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.bridge.cfg.n_heads)

    @property
    def n_kv_heads(self) -> int:
        kv = getattr(self.bridge.cfg, "n_key_value_heads", None)
        return int(kv) if kv else self.n_heads

    @property
    def prepend_bos(self) -> bool:
        return self.codec.prepend_bos

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.name!r}, layers={self.n_layers}, heads={self.n_heads}, "
            f"kv_heads={self.n_kv_heads}, prepend_bos={self.prepend_bos}, "
            f"fingerprint={self.fingerprint}, load={self.load_seconds:.1f}s"
            f"{' (cached weights)' if self.cache_hit else ''})"
        )


def converted_dir(entry: ModelEntry, fp: str) -> Path:
    return workbench_home() / "models" / f"{entry.name}-{fp}"


def _convert_gguf(entry: ModelEntry, target: Path) -> None:
    """De-quantise the GGUF once and write safetensors + config + tokenizer atomically."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert entry.gguf_locator is not None
    gguf = entry.gguf_locator()
    with quiet():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if entry.architectures:
        cfg.architectures = list(entry.architectures)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        cfg.to_json_file(str(tmp / "config.json"))
        tok.save_pretrained(str(tmp))
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_converted(folder: Path) -> tuple[Any, Any]:
    """Build the HF model without random init and copy the stored fp32 tensors in.

    Tied parameters (e.g. embedding and unembedding) are stored once by safetensors; every
    name of a tied group is filled from the stored one.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    with quiet():
        cfg = AutoConfig.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = load_file(str(folder / "model.safetensors"))
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict) and getattr(cfg, "tie_word_embeddings", True):
        for target, source in tied.items():
            if target in state and source not in state:
                state[source] = state[target]
            elif source in state and target not in state:
                state[target] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise WorkbenchError(
            f"converted weights in {folder} do not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            f"delete {folder} to convert again",
        )
    model.tie_weights()
    model.eval()
    return model, tok


def _hf_from_gguf(entry: ModelEntry, fp: str) -> tuple[Any, Any, bool]:
    target = converted_dir(entry, fp)
    hit = (target / "model.safetensors").exists()
    if not hit:
        _convert_gguf(entry, target)
    try:
        model, tok = _load_converted(target)
    except WorkbenchError:
        raise
    except Exception as exc:  # damaged cache: convert again, once
        log.warning("converted weights at %s unreadable (%s); converting again", target, exc)
        shutil.rmtree(target, ignore_errors=True)
        _convert_gguf(entry, target)
        model, tok = _load_converted(target)
        hit = False
    return model, tok, hit


def _hf_from_tiny(entry: ModelEntry) -> tuple[Any, Any]:
    from workbench.models import tiny
    from workbench.tasks import task_vocabulary

    tok = tiny.word_tokenizer(task_vocabulary())
    model = tiny.tiny_hf_model(entry.tiny_arch, vocab_size=len(tok))  # type: ignore[arg-type]
    return model, tok


def load_model(
    name: str,
    *,
    prepend_bos: bool | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """Load ``name`` into a ``TransformerBridge`` on ``device`` in ``dtype``
    (``workbench.models.precision``; default cpu, float32).

    ``prepend_bos=None`` follows the model's own tokenizer (SmolLM2: no BOS; Gemma 3: BOS);
    ``True``/``False`` overrides it. Prompt sets built with the returned codec carry the choice.
    """
    from workbench.models.precision import check_device, check_dtype, keyed_fingerprint

    device = check_device(device)
    dtype = check_dtype(dtype, device)
    entry = get_entry(name)
    weights_fp = fingerprint(name)  # the converted-weights cache is the float32 weights'
    fp = keyed_fingerprint(weights_fp, dtype)
    t0 = time.perf_counter()
    hit = False
    extra: dict[str, Any] = {}
    if entry.source == "gguf":
        hf_model, tok, hit = _hf_from_gguf(entry, weights_fp)
    elif entry.source == "tiny":
        hf_model, tok = _hf_from_tiny(entry)
    elif entry.source == "toy":
        from workbench.models import tiny

        hf_model, tok, extra = tiny.load_toy_induction()
    else:
        hf_model, tok = _hf_from_hub(entry.hf_name)
    if dtype != "float32":  # cast after loading: the converted-weights cache stays float32
        from workbench.models.precision import torch_dtype

        hf_model = hf_model.to(dtype=torch_dtype(dtype))
    bridge = _boot(entry, hf_model, tok, device)
    n_ctx = int(getattr(bridge.cfg, "n_ctx", 0) or 0) or 2048
    bos = default_prepend_bos(tok) if prepend_bos is None else prepend_bos
    codec = TextCodec(tok, prepend_bos=bos, n_ctx=n_ctx, model_name=name)
    seconds = time.perf_counter() - t0
    return LoadedModel(name, entry, bridge, tok, codec, fp, seconds, hit, extra, device, dtype)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick DNS + TCP check, so an offline machine fails at once rather than after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(hf_name: str, why: str) -> WorkbenchError:
    from workbench.models.known import MODELS

    offline = ", ".join(n for n, e in MODELS.items() if e.source == "gguf")
    return WorkbenchError(
        f"cannot load '{hf_name}' from the hub ({why})", f"offline, use one of: {offline}"
    )


def _hf_from_hub(hf_name: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(hf_name).is_dir() and not _hub_reachable():
        raise _offline_error(hf_name, "the hub is not reachable")
    try:
        with quiet():
            tok = AutoTokenizer.from_pretrained(hf_name)
            model = AutoModelForCausalLM.from_pretrained(hf_name, dtype=torch.float32)
    except OSError as exc:
        raise _offline_error(hf_name, type(exc).__name__) from None
    model.eval()
    return model, tok


def _boot(entry: ModelEntry, hf_model: Any, tok: Any, device: str | None) -> Any:
    from workbench.models.boot import boot_bridge

    return boot_bridge(
        hf_model,
        tok,
        entry.hf_name,
        device=device or "cpu",
        in_memory_tokenizer=entry.source in ("tiny", "toy"),  # TL must not try to reload them
        architectures=entry.architectures,
    )

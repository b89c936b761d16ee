"""PASTA attention steering profiled per head and evaluated: parameters, the JSON head
configuration and the registry entry (torch-free; ``compute.py`` profiles and evaluates,
``highlight.py`` finds the highlighted spans).

Head configuration (:func:`head_config`): ``{"model": name, "alpha": alpha, "heads": {"<layer>":
[head, ...]}}``; ``heads`` is exactly PASTA's own ``head_config`` (QingruZhang/PASTA: a mapping
of layer id, as a string, to a list of head ids, e.g. ``config/head_config/.../top5_cf_*.json``
holds ``{"16": [7, 10], "22": [5]}``), so ``json.load(f)["heads"]`` goes straight into
``pastalib.PASTA(head_config=...)``. :func:`read_head_config` reads both forms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.heads import parse_heads
from workbench.types import Analysis, Head


@dataclass(frozen=True)
class PastaParams:
    """PASTA (Zhang et al. 2024): in chosen heads the attention on prompt keys outside a
    highlighted span is multiplied by ``alpha`` and renormalised. Heads are profiled one at a
    time (coarse by layer, then the heads of the best layers) on profiling prompts, then the
    top-k are evaluated on held-out needle and knowledge-conflict prompts against random
    k-head sets (``pasta_profile.compute``)."""

    alpha: float = field(
        default=0.01,
        metadata={"help": "scale of the attention outside the highlight, in (0, 1] (1: no change)"},
    )
    top_layers: int = field(
        default=3, metadata={"help": "best layers of the coarse pass whose heads are profiled"}
    )
    n_heads_chosen: int = field(default=4, metadata={"help": "k: heads chosen (top-k gains)"})
    n_random: int = field(default=20, metadata={"help": "random k-head sets (uniform, >= 1)"})
    needle_random: int = field(
        default=0,
        metadata={"help": "random sets also decoded on needles: the first n (0: all n_random)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the random head sets"})
    target: Literal["both", "needle", "conflict"] = field(
        default="both", metadata={"help": "what the heads are profiled on"}
    )
    evaluate: Literal["both", "needle", "conflict"] = field(
        default="both", metadata={"help": "what the chosen heads are evaluated on"}
    )
    highlight: Literal["gold", "auto"] = field(
        default="gold",
        metadata={"help": "profiling highlight: the gold span, or the model's own pick"},
    )
    heads: tuple[str, ...] = field(
        default=(), metadata={"help": "evaluate these heads (L<layer>H<head>) instead of profiling"}
    )
    profile_needles: int = field(
        default=4,
        metadata={
            "help": "needle samples of the file's first n needles profile, the rest evaluate"
        },
    )
    profile_depths: tuple[float, ...] = field(
        default=(),
        metadata={
            "help": "depths (of the task's) used for profiling, the others for evaluation "
            "(empty: every depth for both)"
        },
    )
    conflict_format: Literal["sentence", "paragraph", "both"] = field(
        default="both", metadata={"help": "knowledge_conflict context format"}
    )
    conflict_source: Literal["smollm2_verified", "all"] = field(
        default="smollm2_verified", metadata={"help": "knowledge_conflict records"}
    )
    conflict_test_fraction: float = field(
        default=0.5, metadata={"help": "knowledge_conflict: share of records in the test split"}
    )
    conflict_seed: int = field(default=0, metadata={"help": "knowledge_conflict split seed"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy needle answer length"})
    batch_tokens: int = field(
        default=32768, metadata={"help": "rows x positions per batched sweep wave"}
    )

    def validate(self) -> None:
        a = self.alpha
        if not 0.0 < a <= 1.0:
            raise WorkbenchError(
                f"pasta_profile: alpha must be in (0, 1], got {a:g}", "e.g. alpha = 0.01 (PASTA's)"
            )
        if self.n_random < 1:
            raise WorkbenchError(
                f"pasta_profile: n_random must be >= 1, got {self.n_random}", "use n_random = 20"
            )
        if not 0 <= self.needle_random <= self.n_random:
            raise WorkbenchError(
                f"pasta_profile: needle_random must be in [0, n_random], got {self.needle_random}",
                "use 0 (every random set) or fewer than n_random",
            )
        for name in ("top_layers", "n_heads_chosen", "max_new_tokens", "batch_tokens"):
            if getattr(self, name) < 1:
                raise WorkbenchError(
                    f"pasta_profile: {name} must be >= 1, got {getattr(self, name)}",
                    "use the default",
                )
        if self.profile_needles < 0:
            raise WorkbenchError("pasta_profile: profile_needles must be >= 0", "e.g. 4")
        if not 0.0 < self.conflict_test_fraction < 1.0:
            raise WorkbenchError(
                "pasta_profile: conflict_test_fraction must be in (0, 1) (both splits are used)",
                "e.g. 0.5",
            )
        parse_heads(self.heads, "pasta_profile")


def head_config(
    source: Any, alpha: float | None = None, model: str | None = None
) -> dict[str, Any]:
    """The JSON head configuration (module docstring) of ``source``: a stored pasta_profile
    :class:`~workbench.result.Result` (its chosen heads, alpha and model unless given) or heads
    (``Head`` or ``(layer, head)`` pairs)."""
    if hasattr(source, "tables") and hasattr(source, "key"):
        chosen = source.tables["chosen"]
        heads = [
            Head(int(la), int(h)) for la, h in zip(chosen["layer"], chosen["head"], strict=True)
        ]
        alpha = float(source.key["params"]["alpha"]) if alpha is None else alpha
        model = str(source.key["model"]) if model is None else model
    else:
        heads = [h if isinstance(h, Head) else Head(int(h[0]), int(h[1])) for h in source]
    if alpha is None or model is None:
        raise WorkbenchError("head_config: give alpha and the model name", "or pass a result")
    layers: dict[int, list[int]] = {}
    for h in sorted(set(heads)):
        layers.setdefault(int(h.layer), []).append(int(h.head))
    return {
        "model": model,
        "alpha": float(alpha),
        "heads": {str(la): hs for la, hs in sorted(layers.items())},
    }


def write_head_config(config: Mapping[str, Any], path: str | Path) -> Path:
    """Write a :func:`head_config` as JSON to ``path`` (parents created); the path."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config), indent=1) + "\n", encoding="utf-8")
    return out


def read_head_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A head configuration from a path or a loaded mapping, in this module's layout or as
    PASTA's bare ``{"<layer>": [head, ...]}``: ``{"model", "alpha", "heads": [Head, ...]}``
    (model and alpha None for the bare form)."""
    raw = source if isinstance(source, Mapping) else json.loads(Path(source).read_text("utf-8"))
    spec = raw.get("heads", raw)
    try:
        heads = sorted({Head(int(la), int(h)) for la, hs in spec.items() for h in hs})
    except (TypeError, ValueError, AttributeError):
        raise WorkbenchError(
            "head config: 'heads' must map layer ids to lists of head ids",
            'e.g. {"16": [7, 10], "22": [5]}',
        ) from None
    alpha = raw.get("alpha") if "heads" in raw else None
    return {
        "model": raw.get("model") if "heads" in raw else None,
        "alpha": None if alpha is None else float(alpha),
        "heads": heads,
    }


def conflict_task_params(params: PastaParams, split: str) -> dict[str, Any]:
    """The ``knowledge_conflict`` parameters of one split (``select`` profiles, ``test``
    evaluates)."""
    return {
        "split": split,
        "format": params.conflict_format,
        "source": params.conflict_source,
        "test_fraction": params.conflict_test_fraction,
        "seed": params.conflict_seed,
    }


def conflict_tasks(params: PastaParams) -> list[tuple[str, dict[str, Any]]]:
    """The knowledge-conflict prompt sets a run builds itself (the ``select`` split when its
    target uses conflicts, ``test`` when its evaluation does): their recipes enter the run key."""
    splits = [s for s, use in (("select", params.target), ("test", params.evaluate))
              if use in ("both", "conflict")]  # fmt: skip
    return [("knowledge_conflict", conflict_task_params(params, s)) for s in splits]


def _load() -> Any:
    from workbench.analyses.pasta_profile.compute import pasta_profile

    return pasta_profile


ENTRY = Analysis(
    name="pasta_profile",
    description="PASTA attention steering: per-head profiling (coarse by layer, then the heads "
    "of the best layers), the top-k heads evaluated on held-out needle recall and "
    "knowledge-conflict context rate (gold and automatic highlight) against random k-head "
    "sets; percentile, p-value and a PASTA JSON head configuration",
    params_cls=PastaParams,
    loader=_load,
    default_task="needle",
    task_kind="needle",
    tasks=("needle",),
    chooses_heads=True,
    data_tasks=conflict_tasks,
    reference="Zhang et al. 2024 (PASTA, AutoPASTA)",
)

"""MoA attention influence of sink + window streaming layouts (Fu et al. 2024): parameters and
registry entry (torch-free; ``compute.py`` scores, ``reference.py`` is the plain loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.types import Analysis


@dataclass(frozen=True)
class MoAInfluenceParams:
    """MoA's first-order loss change from streaming each head (``sink`` initial keys and the
    ``window`` most recent ones kept), per query head and pooled per KV head."""

    sink: int = field(default=4, metadata={"help": "initial keys every query keeps (k < sink)"})
    windows: tuple[int, ...] = field(
        default=(64, 128, 256),
        metadata={"help": "recent-key windows w scored (q - w < k <= q kept), one metric each"},
    )
    batch_size: int = field(default=1, metadata={"help": "sequences per forward and backward"})

    def validate(self) -> None:
        if self.sink < 0:
            raise WorkbenchError(
                f"moa_influence: sink must be >= 0, got {self.sink}", "use sink = 4"
            )
        if not self.windows:
            raise WorkbenchError(
                "moa_influence: windows is empty", "give at least one, e.g. windows = [128]"
            )
        bad = [w for w in self.windows if w < 1]
        if bad:
            raise WorkbenchError(
                f"moa_influence: every window must be >= 1, got {list(self.windows)}",
                "e.g. windows = [64, 128, 256]",
            )
        if len(set(self.windows)) != len(self.windows):
            raise WorkbenchError(
                f"moa_influence: windows must be distinct, got {list(self.windows)}",
                "list each window once",
            )
        if self.batch_size < 1:
            raise WorkbenchError("moa_influence: batch_size must be >= 1", "set batch_size = 1")


def _load() -> Any:
    from workbench.analyses.moa_influence.compute import moa_influence

    return moa_influence


ENTRY = Analysis(
    name="moa_influence",
    description="MoA attention influence: first-order loss change (on the model's own greedy "
    "predictions) from streaming each head with sink + window, per query head and per KV head "
    "(max, mean, and sum: the effect of streaming the whole KV head)",
    params_cls=MoAInfluenceParams,
    loader=_load,
    default_task="texts",
    tasks=("texts",),
    reference="Fu et al. 2024 (MoA)",
)

"""Classic head detectors: parameters and registry entry (torch-free; ``compute.py`` scores)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.types import Analysis, RoleRule

DETECTORS = ("previous_token", "duplicate_token", "induction")


@dataclass(frozen=True)
class HeadDetectorParams:
    """Classic head detectors (TransformerLens ``head_detector`` definitions)."""

    detectors: tuple[str, ...] = field(
        default=DETECTORS, metadata={"help": "which of previous_token, duplicate_token, induction"}
    )
    exclude_bos: bool = field(
        default=False, metadata={"help": "zero the attention to position 0 before scoring"}
    )
    exclude_current_token: bool = field(
        default=False, metadata={"help": "zero the attention to the query's own position"}
    )
    error_measure: Literal["mul", "abs"] = field(
        default="mul",
        metadata={"help": "mul: share of attention on the pattern; abs: 1 - mean |A - D| * T"},
    )
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})

    def validate(self) -> None:
        bad = [d for d in self.detectors if d not in DETECTORS]
        if bad or not self.detectors:
            raise WorkbenchError(
                f"head_detectors: unknown detector(s) {bad or '(none given)'}",
                f"choose from {', '.join(DETECTORS)}",
            )
        if self.batch_size < 1:
            raise WorkbenchError("head_detectors: batch_size must be >= 1", "set batch_size = 8")


def _load() -> Any:
    from workbench.analyses.head_detectors.compute import head_detectors

    return head_detectors


ENTRY = Analysis(
    name="head_detectors",
    description="previous-token, duplicate-token and induction scores per head "
    "(share of attention on the expected positions)",
    params_cls=HeadDetectorParams,
    loader=_load,
    default_task="induction",
    roles=(
        RoleRule("induction head", "induction", ">", 0.4, "head_detectors", "Olsson et al. 2022"),
        RoleRule("previous-token head", "previous_token", ">", 0.4, "head_detectors"),
        RoleRule("duplicate-token head", "duplicate_token", ">", 0.4, "head_detectors"),
    ),
    reference="TransformerLens head_detector; Olsson et al. 2022",
)

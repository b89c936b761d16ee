"""Parameter schemas of the registered analyses (torch-free, so the CLI can list them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from workbench.errors import WorkbenchError

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

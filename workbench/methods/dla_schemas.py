"""Parameter schemas of direct logit attribution and the logit lens (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.errors import WorkbenchError


def _check_batch(name: str, batch_size: int) -> None:
    if batch_size < 1:
        raise WorkbenchError(f"{name}: batch_size must be >= 1", "set batch_size = 8")


@dataclass(frozen=True)
class DLAParams:
    """Direct logit attribution at the final position (final norm's scale frozen)."""

    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})

    def validate(self) -> None:
        _check_batch("direct_logit_attribution", self.batch_size)


@dataclass(frozen=True)
class LogitLensParams:
    """Logit lens: the residual stream after each layer through the final norm and unembedding."""

    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})

    def validate(self) -> None:
        _check_batch("logit_lens", self.batch_size)

"""DuoAttention gates (Xiao et al. 2024): one trained mix of full and streaming attention per KV
head; parameters and registry entry (torch-free; ``compute.py`` trains the gates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.types import Analysis


@dataclass(frozen=True)
class DuoGateParams:
    """DuoAttention's gate per KV head, trained (model frozen) to keep the final hidden states at
    the needle answer positions close to full attention's under an L1 penalty on the gates."""

    sink: int = field(default=4, metadata={"help": "initial keys streaming keeps (k < sink)"})
    window: int = field(
        default=64, metadata={"help": "recent keys streaming keeps (q - window < k <= q)"}
    )
    steps: int = field(default=20, metadata={"help": "optimizer steps (each over every sample)"})
    lr: float = field(
        default=0.05,
        metadata={"help": "peak Adam learning rate of the gates (the paper's warm-up and decay)"},
    )
    l1: float = field(
        default=0.05,
        metadata={"help": "weight lambda of the L1 penalty mean_g alpha_g (the paper's 0.05)"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of torch's RNG during training (forked; the run draws nothing)"},
    )

    def validate(self) -> None:
        if self.sink < 0:
            raise WorkbenchError(f"duo_gates: sink must be >= 0, got {self.sink}", "use sink = 4")
        if self.window < 1:
            raise WorkbenchError(
                f"duo_gates: window must be >= 1, got {self.window}", "use window = 64"
            )
        if self.steps < 1:
            raise WorkbenchError(
                f"duo_gates: steps must be >= 1, got {self.steps}", "use steps = 20"
            )
        if not self.lr > 0:
            raise WorkbenchError(f"duo_gates: lr must be > 0, got {self.lr:g}", "use lr = 0.05")
        if not self.l1 >= 0:
            raise WorkbenchError(
                f"duo_gates: l1 must be >= 0, got {self.l1:g}", "use l1 = 0.05 (the paper's)"
            )


def _load() -> Any:
    from workbench.analyses.duo_gates.compute import duo_gates

    return duo_gates


ENTRY = Analysis(
    name="duo_gates",
    description="DuoAttention gates: per KV head, a trained mix alpha of full and sink + window "
    "streaming attention keeping the final hidden states at needle answers close to full "
    "attention's (L1 on the gates); threshold them into a KV-cache plan",
    params_cls=DuoGateParams,
    loader=_load,
    default_task="needle",
    task_kind="needle",
    variant_params=("window", "sink", "l1"),  # atlas column duo_gates[64].duo_gate@needle
    tasks=("needle",),
    reference="Xiao et al. 2024 (DuoAttention)",
)

"""Path patching: parameters and registry entry (torch-free; ``compute.py`` the analysis and its
plain reference, ``resumed.py`` the exact fast path on the activation-patching resume engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.types import DIRECTIONS, Analysis

PATH_METRICS = ("logit_diff", "norm_logit_diff")
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class PathPatchingParams:
    """Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): each sender head's effect
    through the chosen receivers only."""

    receivers: str | tuple[tuple[int | str, ...], ...] = field(
        default="logits",
        metadata={
            "help": '"logits" or a list of (layer, head, "q"|"k"|"v") receiver head inputs '
            "(k/v of a GQA model are per KV head: patching one patches every query head "
            "sharing it)"
        },
    )
    senders: tuple[tuple[int, ...], ...] | None = field(
        default=None,
        metadata={
            "help": "(layer, head) senders; default: every head before the earliest receiver"
        },
    )
    metric: str = field(
        default="logit_diff",
        metadata={"help": "logit_diff (change from the base run) or norm_logit_diff"},
    )
    direction: Literal["denoising", "noising"] = field(
        default="denoising",
        metadata={
            "help": "denoising: clean sender into the corrupted run; noising: corrupted sender "
            "into the clean run"
        },
    )
    freeze_mlps: bool = field(
        default=False,
        metadata={"help": "also freeze MLP outputs in the sender pass (IOI paper: recomputed)"},
    )

    def validate(self) -> None:
        where = "path_patching"
        if self.metric not in PATH_METRICS:
            raise WorkbenchError(
                f"{where}: unknown metric '{self.metric}'", f"choose from {', '.join(PATH_METRICS)}"
            )
        if self.direction not in DIRECTIONS:
            raise WorkbenchError(
                f"{where}: unknown direction '{self.direction}'", "choose denoising or noising"
            )
        if isinstance(self.receivers, str):
            if self.receivers != "logits":
                raise WorkbenchError(
                    f"{where}: unknown receivers '{self.receivers}'",
                    'use "logits" or a list of (layer, head, "q"|"k"|"v")',
                )
        else:
            if len(self.receivers) == 0:
                raise WorkbenchError(f"{where}: no receivers given", 'use receivers = "logits"')
            for r in self.receivers:
                ok = len(r) == 3 and all(isinstance(x, int) for x in r[:2])
                if not ok or r[2] not in QKV:
                    raise WorkbenchError(
                        f"{where}: bad receiver {tuple(r)!r}",
                        'give (layer, head, "q"|"k"|"v") for each receiver',
                    )
        for s in self.senders or ():
            if len(s) != 2 or not all(isinstance(x, int) for x in s):
                raise WorkbenchError(
                    f"{where}: bad sender {tuple(s)!r}", "give (layer, head) for each sender"
                )


def _load() -> Any:
    from workbench.analyses.path_patching.compute import path_patching

    return path_patching


ENTRY = Analysis(
    name="path_patching",
    description="each sender head's effect through chosen receivers only (logits or "
    "later heads' q/k/v), other heads frozen",
    params_cls=PathPatchingParams,
    loader=_load,
    default_task="ioi",
    checks=("resume",),
    variant_params=("receivers", "direction"),
    reference="Wang et al. 2022 (IOI); Goldowsky-Dill et al. 2023",
)

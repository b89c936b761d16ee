"""Direct logit attribution: its parameters and registry entry (torch-free; the computation is
``compute.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.params import check_batch
from workbench.types import Analysis


@dataclass(frozen=True)
class DLAParams:
    """Direct logit attribution at the final position (final norm's scale frozen)."""

    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})

    def validate(self) -> None:
        check_batch("direct_logit_attribution", self.batch_size)


def _load() -> Any:
    from workbench.analyses.direct_logit_attribution.compute import direct_logit_attribution

    return direct_logit_attribution


ENTRY = Analysis(
    name="direct_logit_attribution",
    description="each head's, MLP's and the embeddings' direct effect on the final-position "
    "logit difference (final norm scale frozen; components sum to the logit difference)",
    params_cls=DLAParams,
    loader=_load,
    default_task="ioi",
    head_page="Direct logit attribution",
    reference="Elhage et al. 2021; Wang et al. 2022 (IOI)",
)

"""Parameter schema of retrieval-head scoring (torch-free, so the CLI can list it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from workbench.errors import WorkbenchError

MODES = ("faithful", "fast")


@dataclass(frozen=True)
class RetrievalParams:
    """Retrieval-head scores on needle-in-a-haystack samples (Wu et al. 2024)."""

    mode: Literal["faithful", "fast"] = field(
        default="faithful",
        metadata={
            "help": "faithful: greedy decoding with a KV cache, argmax per step (the paper); "
            "fast: teacher-forced, one forward over the answer tokens"
        },
    )
    fast_answer: Literal["real_needle", "needle"] = field(
        default="real_needle",
        metadata={
            "help": "fast mode: teacher-force real_needle (the task's answer) or the whole "
            "needle sentence (what instruct models often repeat)"
        },
    )
    max_new_tokens: int = field(
        default=48, metadata={"help": "faithful mode: most tokens generated per sample"}
    )
    recall_threshold: float = field(
        default=0.5,
        metadata={"help": "a sample counts when ROUGE-1 recall of its answer is > this"},
    )
    prefill_chunk: int = field(
        default=512, metadata={"help": "context tokens per prefill forward (bounds memory)"}
    )
    reuse_prefix: bool = field(
        default=True,
        metadata={"help": "reuse the KV cache of the prefix a sample shares with the next one"},
    )

    def validate(self) -> None:
        if self.max_new_tokens < 2:
            raise WorkbenchError(
                f"retrieval_heads: max_new_tokens must be >= 2, got {self.max_new_tokens}",
                "use max_new_tokens = 48",
            )
        if not 0 <= self.recall_threshold < 1:
            raise WorkbenchError(
                f"retrieval_heads: recall_threshold {self.recall_threshold:g} outside [0, 1)",
                "use recall_threshold = 0.5 (the paper's)",
            )
        if self.prefill_chunk < 1:
            raise WorkbenchError(
                "retrieval_heads: prefill_chunk must be >= 1", "use prefill_chunk = 512"
            )

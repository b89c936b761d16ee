"""Retrieval heads (Wu et al. 2024): parameters and registry entry (torch-free).

Modules: ``compute.py`` the analysis; ``faithful.py`` the paper's scoring while greedy decoding
(on the batched KV-cache decoder of ``decode.py``); ``teacher_forced.py`` the approximation
(mode ``fast``: one forward over the forced answer); ``span.py`` where copy hits count;
``rouge.py`` the recall of an answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.types import Analysis, RoleRule

MODES = ("faithful", "fast")
SPANS = ("real_needle", "paper_search", "needle")


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
    span: Literal["real_needle", "paper_search", "needle"] = field(
        default="real_needle",
        metadata={
            "help": "where copy hits count: real_needle located exactly in the context (the "
            "paper's span), paper_search (the authors' token-set search for it, which can miss "
            "on byte-level BPE), or needle (the whole inserted needle sentence)"
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
        default=50,
        metadata={"help": "faithful mode: most tokens generated per sample (the paper's 50)"},
    )
    recall_threshold: float = field(
        default=0.5,
        metadata={
            "help": "faithful mode: a sample counts when ROUGE-1 recall (Porter-stemmed) of its "
            "answer is > this (the paper's 0.5); fast mode counts by its greedy filter"
        },
    )
    prefill_chunk: int = field(
        default=512, metadata={"help": "context tokens per prefill forward (bounds memory)"}
    )
    reuse_prefix: bool = field(
        default=True,
        metadata={"help": "reuse the KV cache of the prefix a sample shares with the next one"},
    )
    decode_batch: int = field(
        default=16,
        metadata={"help": "faithful mode: samples of one length decoded together (1: one by one)"},
    )

    lookahead: int = field(
        default=8,
        metadata={
            "help": "faithful mode: tokens drafted from the context and verified per decoding "
            "forward (prompt lookup; only what greedy decoding would produce is kept; 0: one "
            "token per forward)"
        },
    )

    def validate(self) -> None:
        if self.lookahead < 0:
            raise WorkbenchError(
                "retrieval_heads: lookahead must be >= 0", "use lookahead = 8 (or 0)"
            )
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
        if self.decode_batch < 1:
            raise WorkbenchError(
                "retrieval_heads: decode_batch must be >= 1", "use decode_batch = 16"
            )
        if self.prefill_chunk < 1:
            raise WorkbenchError(
                "retrieval_heads: prefill_chunk must be >= 1", "use prefill_chunk = 512"
            )


def _load() -> Any:
    from workbench.analyses.retrieval_heads.compute import retrieval_heads

    return retrieval_heads


ENTRY = Analysis(
    name="retrieval_heads",
    description="retrieval score per query head on needle-in-a-haystack samples: copy hits "
    "of the argmax key while decoding (faithful) or teacher-forced (fast)",
    params_cls=RetrievalParams,
    loader=_load,
    default_task="needle",
    task_kind="needle",
    version="2",  # the paper's span, first-token scoring, stemmed ROUGE-1
    checks=("kv_cache",),
    roles=(RoleRule("retrieval head", "retrieval_score", ">", 0.1, None, "Wu et al. 2024"),),
    tasks=("needle",),
    reference="Wu et al. 2024 (Retrieval Head Mechanistically Explains Long-Context Factuality)",
)

"""A thin, explicit view of a model's tokenizer for building prompt sets.

BOS handling is explicit: ``prepend_bos`` says whether prompt sets built with this codec start
with the BOS token. By default it follows the model's own tokenizer (SmolLM2's adds none;
note that TransformerLens prepends one unless told not to), and the user can override it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError


@dataclass
class TextCodec:
    """Encode/decode text without special tokens; ``prepend_bos`` decides the BOS policy."""

    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    prepend_bos: bool
    n_ctx: int
    model_name: str = ""

    @property
    def bos_token_id(self) -> int | None:
        bos = self.tokenizer.bos_token_id
        return None if bos is None else int(bos)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a whole prompt: BOS first when ``prepend_bos``."""
        ids = self.encode(text)
        if self.prepend_bos:
            if self.bos_token_id is None:
                raise WorkbenchError(
                    f"model {self.model_name!r} has no BOS token", "set prepend_bos = false"
                )
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    def single_token(self, text: str) -> int | None:
        """The id of ``text`` if it is exactly one token (no special tokens), else None."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def str_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([i]) for i in ids]


def default_prepend_bos(tokenizer: Any) -> bool:
    """Follow the tokenizer: True when encoding a probe text adds its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos

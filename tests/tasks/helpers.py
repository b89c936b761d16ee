"""Shared pieces of the task tests: the word-level tokenizer over ``task_vocabulary()`` (no
model), a codec on it, and the one-line error check."""

from __future__ import annotations

import pytest

from workbench.errors import WorkbenchError
from workbench.models import tiny
from workbench.models.codec import TextCodec
from workbench.tasks import task_vocabulary


def word_tokenizer():
    return tiny.word_tokenizer(task_vocabulary())


def codec_of(tok, bos: bool, n_ctx: int = 1024) -> TextCodec:
    return TextCodec(tok, prepend_bos=bos, n_ctx=n_ctx, model_name="tiny-test")


def one_line_error(excinfo: pytest.ExceptionInfo[WorkbenchError], *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg

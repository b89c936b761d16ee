import pytest

from tests.tasks.helpers import word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()

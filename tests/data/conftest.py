"""Fixtures of the data tests."""

import pytest

from ttt_train.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer():
    return load_tokenizer("byte")

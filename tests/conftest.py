"""Fixtures shared by the test modules."""

import pytest

from tiny import tiny_model, tiny_tokenizer


def pytest_collection_modifyitems(items):
    # A whole tiny reproduction (tests/test_reproduce.py's `tiny_run` fixture) runs every stage: the integration
    # tier, marked here so that a test added there is marked too.
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random llama with its tokenizer, saved as a Hugging Face folder (a user's local model)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)

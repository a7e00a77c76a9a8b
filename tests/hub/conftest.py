"""Fixtures shared by the Hub upload tests."""

import pytest
from helpers_hub import CORPUS
from helpers_model import tiny_model

from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.hub.saving import write_model_folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Sonett folder as training writes it (weights, config, code, tokenizer, card, results)."""
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=2)
    model = tiny_model("full", vocab_size=len(tokenizer))
    folder = tmp_path_factory.mktemp("upload") / "sonett-hardened"
    write_model_folder(model, tokenizer, folder, {"steps": 0, "validation_loss": 3.0})
    return folder

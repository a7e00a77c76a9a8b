"""The bad-input matrix, memory files: a file from another config is refused by SonettCache.load and
Conversation.load, a damaged or foreign one without unpickling it (docs/design.md, invariant 10)."""

from __future__ import annotations

import pickle

import pytest
from helpers_bad_input import Unpickled, bad_input_tokenizer, write_memory_file
from helpers_model import tiny_model

from sonett import SonettCache
from sonett.inference.conversation import Conversation


@pytest.fixture(scope="module")
def model():
    """Sliding and full attention, max_position_embeddings 256."""
    return tiny_model("mixed")


@pytest.fixture(scope="module")
def tokenizer():
    return bad_input_tokenizer()


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory, model):
    """The state of `model` after 6 tokens, saved as a memory file."""
    return write_memory_file(tmp_path_factory.mktemp("memory") / "state.safetensors", model)


@pytest.mark.parametrize("entry", ["SonettCache.load", "Conversation.load"])
def test_a_memory_file_from_another_config_is_refused(memory_file, tokenizer, entry):
    other = tiny_model("mixed", sliding_window=6)
    message = r"another config \(sliding_window: file 4 vs model 6\); load it with the model that wrote it"
    with pytest.raises(ValueError, match=message):
        if entry == "SonettCache.load":
            SonettCache.load(memory_file, other.config)
        else:
            Conversation.load(memory_file, other, tokenizer)


def test_a_damaged_or_foreign_memory_file_is_refused_without_unpickling(memory_file, tmp_path, model):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(memory_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SonettCache.load(truncated, model.config)
    evil, marker = tmp_path / "evil.safetensors", tmp_path / "unpickled"
    evil.write_bytes(pickle.dumps(Unpickled(marker)))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SonettCache.load(evil, model.config)
    assert not marker.exists()

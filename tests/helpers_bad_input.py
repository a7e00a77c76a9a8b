"""Shared by the bad-input matrix (tests/*/test_bad_input_*.py): its tokenizer, the saved folders that the config and
folder cases break, a memory file, and an object whose unpickling leaves a mark."""

from pathlib import Path

import torch
from helpers_model import random_ids, tiny_model

from sonett import SonettForCausalLM
from sonett.data.tokenizer import train_bpe_tokenizer

CORPUS = ["a picture of a cat", "what is in this image?", "def add(a, b):\n    return a + b\n"] * 4


def bad_input_tokenizer():
    """A small byte-level BPE tokenizer (vocabulary 300) with Sonett's special tokens and chat template."""
    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


def save_reference_folders(root: Path, model: SonettForCausalLM) -> Path:
    """Under `root`: `complete` (model saved as is), `wider` (same kinds, hidden_size 64) and `sharded` (model in
    20 KB shards); returns `root`."""
    model.save_pretrained(root / "complete")
    tiny_model("mixed", hidden_size=64, intermediate_size=64).save_pretrained(root / "wider")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def write_memory_file(path: Path, model: SonettForCausalLM) -> Path:
    """The model's cache after 6 tokens, saved to `path` with `SonettCache.save`."""
    with torch.no_grad():
        model(random_ids(1, 6), use_cache=True).cache.save(path)
    return path


class Unpickled:
    """Unpickling this writes `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))

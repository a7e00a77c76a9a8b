"""Shared by the training, fine-tuning and client tests: a micro preset with a small corpus for fast runs of the
pretraining loop, and a tiny every-kind config over a given tokenizer with the projections LoRA must reach."""

import json
from pathlib import Path

from helpers_remote import EVERY_KIND

from sonett import SonettConfig

MICRO_PRESET = {
    "_comment": "a very small model of every layer kind, for fast loop tests",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
    "sliding_window": 8,
    "layer_types": ["linear_attention", "sliding_attention", "memory_attention", "full_attention"],
    "linear_feature_dim": 4,
    "linear_chunk_size": 16,
    "memory_chunk_size": 16,
}


def write_micro_run_files(folder: Path, documents: int = 60) -> dict:
    """A micro preset and a small text corpus in `folder`; returns the PretrainArguments fields that use them.

    With these settings an epoch is 5 micro-batches of 4 blocks, so with 2 accumulation steps each epoch ends
    with a one-micro-batch optimizer step.
    """
    folder.mkdir(parents=True, exist_ok=True)
    preset = folder / "micro.json"
    preset.write_text(json.dumps(MICRO_PRESET))
    corpus = folder / "corpus.txt"
    corpus.write_text(
        "\n".join(f"def step_{i}(value): return value * {i % 7} + {i % 5}  # {'x' * (i % 4)}" for i in range(documents))
        + "\n"
    )
    return dict(
        config=str(preset),
        data_files=[str(corpus)],
        vocab_size=300,
        block_size=32,
        batch_size=4,
        warmup_steps=2,
        learning_rate=1e-2,
        validation_fraction=0.2,
        eval_blocks=5,
        report_to="none",
    )


# The linear projections of each mixer kind and of the MLP: what LoRA must wrap on an every-kind model.
MIXER_PROJECTIONS = {
    "linear_attention": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"},
    "sliding_attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "memory_attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "full_attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
}
MLP_PROJECTIONS = {"gate_proj", "up_proj", "down_proj"}


def every_kind_config(tokenizer, **overrides) -> SonettConfig:
    """A tiny config with one layer of every mixer kind (EVERY_KIND) and the tokenizer's vocabulary and special ids."""
    values = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": len(EVERY_KIND),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "layer_types": list(EVERY_KIND),
        "sliding_window": 8,
        "linear_feature_dim": 4,
        "initializer_range": 0.2,  # embeddings large enough that a frozen output layer can express confident logits
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return SonettConfig(**{**values, **overrides})

"""Reference models for side-by-side measurements (benchmarks and comparisons); not shipped as remote code."""

from __future__ import annotations

from transformers import LlamaConfig

from .configuration_sonett import SonettConfig


def llama_config_like(config: SonettConfig, max_position_embeddings: int | None = None) -> LlamaConfig:
    """A transformers `LlamaConfig` of the same shape as a Sonett config.

    Same vocabulary, width, MLP width, depth, heads, KV heads and head size; tied embeddings, sdpa attention
    and one RoPE base (1e6) for every layer.
    """
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=max_position_embeddings or config.max_position_embeddings,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attn_implementation="sdpa",
    )


__all__ = ["llama_config_like"]

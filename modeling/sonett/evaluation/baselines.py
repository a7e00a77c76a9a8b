"""Reference models for side-by-side measurements (benchmarks and comparisons); not shipped as remote code."""

from __future__ import annotations

import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sonett.model.configuration_sonett import SonettConfig
from sonett.model.modeling_sonett import SonettForCausalLM

logger = logging.getLogger(__name__)

# A Llama baseline for a comparison may differ from the Sonett model's parameter count by at most this fraction.
PARAMETER_TOLERANCE = 0.05


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
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def llama_config_matching(config: SonettConfig, max_position_embeddings: int | None = None) -> LlamaConfig:
    """A `LlamaConfig` of Sonett's shape whose parameter count equals Sonett's as closely as the MLP width allows.

    Sonett's mixers carry parameters Llama's attention lacks (feature maps, short convolutions, gates, memory
    projections), so the Llama MLP is widened (or narrowed) until the counts match. Builds models on the meta
    device, so it costs no memory. Raises ValueError if the best match is off by more than 5%.
    """
    with torch.device("meta"):
        target = _parameters(SonettForCausalLM(config))
        llama = llama_config_like(config, max_position_embeddings)
        base = _parameters(LlamaForCausalLM(llama))
    # each unit of intermediate_size adds 3 * hidden_size parameters per layer (gate, up and down projections)
    per_unit = 3 * config.hidden_size * config.num_hidden_layers
    llama.intermediate_size = max(1, config.intermediate_size + round((target - base) / per_unit))
    with torch.device("meta"):
        matched = _parameters(LlamaForCausalLM(llama))
    if abs(matched - target) > PARAMETER_TOLERANCE * target:
        raise ValueError(
            f"No Llama MLP width matches Sonett's {target:,} parameters within 5% (best {matched:,}); "
            "the difference lies outside the MLP, so compare at another width."
        )
    logger.info(
        "Llama baseline: intermediate_size %d -> %d, %s parameters against Sonett's %s",
        config.intermediate_size,
        llama.intermediate_size,
        f"{matched:,}",
        f"{target:,}",
    )
    return llama


__all__ = ["PARAMETER_TOLERANCE", "llama_config_like", "llama_config_matching"]

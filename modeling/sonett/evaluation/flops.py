"""FLOPs per token of a Sonett (or transformers Llama) config at one context length, counted from the config alone.

One multiply-accumulate (MAC) counts as 2 FLOPs. Counted (docs/benchmarks.md, "How FLOPs are counted"):

- every weight matrix: 2 x its MACs per token (q/k/v/o and the linear mixers' gate and decay projections, the MLP,
  the hourglass's pooling and upsampling maps and `lm_head`); the embedding lookup is not arithmetic and is left out;
- softmax attention (full, sliding, and the window of memory attention): 4 * n_eff * head_dim * heads per token, the
  scores and the weighted sum, where n_eff is the mean number of keys a causal query sees (about context / 2 for full
  attention, about the window for sliding attention);
- linear attention in its chunked form (the form training and prefill run), with the Taylor feature size
  d_phi = 1 + d + d^2: per chunk of C tokens and head, C^2 * d (scores: for Taylor 1 + s + s^2 / 2 from the d-wide
  products, which is exact) + C^2 * head_dim (scores @ values) + 2 * C * d_phi * head_dim (the chunk's state
  contribution and the read of the carried state), on the length padded to whole chunks, plus
  (N + 1) * N * d_phi * head_dim per head for the states before the N chunks (one batched product); plus the short
  depthwise convolution (conv_size MACs per channel and token);
- memory attention's memory read in its chunked form (the query positions padded to whole chunks of c, all chunks
  at once): heads * (c^2 * d + c * d * (d_v + 1) + c^2 * (d_v + 1)) + kv_heads * c * d * (d_v + 1) per chunk for the
  `linear` update (the normaliser rides along as a ones column of the values); `delta` replaces it with the WY form;
- hourglass layers run on 1 / k of the tokens, at context / k, and their windows count shortened tokens.

Elementwise work (norms, activations, feature maps, softmax, RoPE, decays) is not counted, as in the usual
6 * parameters * tokens training estimate. Training is 3 x the forward (the backward costs two forwards).
"""

from __future__ import annotations

import dataclasses
import math

from transformers import PreTrainedConfig

# Model types counted as a stack of full-attention layers (the baseline of `sonett benchmark`).
FULL_ATTENTION_MODEL_TYPES = ("llama",)


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token of one sequence of `context` tokens, by part (all averaged over the tokens).

    weights: the weight matrices of the decoder layers and the hourglass (2 x MACs), lm_head excluded.
    lm_head: the output projection of one position.
    attention: softmax attention scores and weighted sums (full, sliding, memory attention's window).
    chunked: the chunked linear-attention and memory-read forms (their batched matmuls).
    conv: the short depthwise convolutions of the linear-attention layers.
    """

    context: int
    weights: float
    lm_head: float
    attention: float
    chunked: float
    conv: float

    @property
    def forward(self) -> float:
        """FLOPs per token of a forward that computes logits at every position (as training does)."""
        return self.weights + self.lm_head + self.attention + self.chunked + self.conv

    @property
    def training(self) -> float:
        """FLOPs per token of one training step: forward + backward = 3 x the forward."""
        return 3.0 * self.forward

    @property
    def prefill(self) -> float:
        """FLOPs per token of a prefill that computes the last position's logits only (`logits_to_keep=1`)."""
        return self.forward - self.lm_head + self.lm_head / self.context


def causal_keys(context: float, window: int | None = None) -> float:
    """n_eff: the mean number of keys a causal query sees over `context` positions, itself included.

    Full attention (window None): (context + 1) / 2. A window W (keys a query sees, itself included): the first W
    queries see 1..W keys, the rest W each.
    """
    if window is None or window >= context:
        return (context + 1) / 2
    return (window * (window + 1) / 2 + (context - window) * window) / context


def _linear_attention_chunked_macs(config, context: int) -> float:
    """MACs of `fused_chunk_linear_attention` over one sequence (all heads), on the length padded to whole chunks."""
    feature_dim = config.linear_feature_dim
    if config.linear_feature_map == "taylor":
        d_phi = 1 + feature_dim + feature_dim**2
    else:
        d_phi = feature_dim
    chunk = config.linear_chunk_size
    if chunk > max(context, 256):  # linear_attention_sonett.FULL_CHUNK_PADDING_MAX: a short input is one chunk
        chunk = max(context, 1)
    chunks = math.ceil(context / chunk)
    head_dim = config.head_dim
    per_chunk = chunk * chunk * feature_dim + chunk * chunk * head_dim + 2 * chunk * d_phi * head_dim
    states = (chunks + 1) * chunks * d_phi * head_dim  # linear_attention_sonett.chunk_states
    return config.num_attention_heads * (chunks * per_chunk + states)


def _memory_read_macs(config, context: int) -> float:
    """MACs of `memory_read` from an empty memory: `context` query positions padded to whole chunks, all chunks at
    once (`linear`: the ones column carries the normaliser, d_v + 1 wide; `delta`: the WY terms and one state
    product per chunk)."""
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    c, chunks = config.memory_chunk_size, math.ceil(context / config.memory_chunk_size)
    if config.memory_update == "delta":
        per_chunk = kv_heads * (c * c * d + c * d * (d + d)) + heads * (c * c * d + c * c * (d + d) + c * d * d)
        per_chunk += kv_heads * d * d * d  # the state's erase product, chunk by chunk
    else:
        per_chunk = kv_heads * c * d * (d + 1) + heads * (c * c * d + c * d * (d + 1) + c * c * (d + 1))
    return chunks * per_chunk


def _layer_kinds(config) -> list[str]:
    if getattr(config, "model_type", None) in FULL_ATTENTION_MODEL_TYPES:
        return ["full_attention"] * config.num_hidden_layers
    return list(config.layer_types)


def forward_flops(config: PreTrainedConfig, context: int) -> FlopCount:
    """Forward FLOPs per token of a `SonettConfig` (or a `LlamaConfig`, every layer full attention) on one sequence
    of `context` tokens, by part (see `FlopCount` and this module's docstring for what is counted).

    Raises ValueError for a context below 1 or a config with cross-attention layers (their cost depends on the
    images, not on the config and the length).
    """
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"forward_flops: context must be a positive number of tokens, got {context!r}.")
    if getattr(config, "cross_attention_layers", None):
        raise ValueError(
            "forward_flops counts text decoders; this config has cross_attention_layers, whose cost depends on the "
            "images. Count its text model (cross_attention_layers=None) instead."
        )
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    mlp = 3 * hidden * inter
    attention_projections = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden

    hierarchy = getattr(config, "hierarchy_settings", None)  # None for a flat stack and for Llama
    factor = hierarchy.shorten_factor if hierarchy else 1  # shortened layers run on ceil(context / k) tokens
    span = hierarchy.span if hierarchy else range(0)

    weights = attention = chunked = conv = 0.0
    for index, kind in enumerate(_layer_kinds(config)):
        length = math.ceil(context / factor) if index in span else context  # tokens this layer runs on
        share = length / context
        if kind == "linear_attention":
            qk = heads * config.linear_feature_dim
            value = heads * head_dim
            layer_weights = hidden * (2 * qk + 2 * value + heads) + value * hidden
            chunked += share * 2 * _linear_attention_chunked_macs(config, length) / length
            conv += share * 2 * (2 * qk + value) * config.linear_conv_size
        else:
            layer_weights = attention_projections
            window = None if kind == "full_attention" else config.sliding_window
            attention += share * 4 * causal_keys(length, window) * head_dim * heads
            if kind == "memory_attention":
                chunked += share * 2 * _memory_read_macs(config, length) / length
        weights += share * 2 * (layer_weights + mlp)
    if hierarchy:
        # per shortened token: pooling (k * hidden -> hidden, if linear) and upsampling (hidden -> slots * hidden)
        pooling = factor * hidden * hidden if hierarchy.pooling == "linear" else 0
        slots = factor if hierarchy.upsampling == "linear" else 1
        weights += 2 * (pooling + hidden * slots * hidden) * math.ceil(context / factor) / context
    lm_head = 2.0 * hidden * config.vocab_size
    return FlopCount(context=context, weights=weights, lm_head=lm_head, attention=attention, chunked=chunked, conv=conv)


__all__ = ["FlopCount", "causal_keys", "forward_flops"]

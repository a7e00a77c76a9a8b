"""A model's footprint from its config alone (`sonett info`): the layer mix, the parameters by part and layer kind,
and the size of the decoding state, beside a transformers Llama of the same size.

The decoding state (`SonettCache`, batch 1) of each layer kind:

- `full_attention`: keys and values of every token seen, `2 * kv_heads * head_dim` values per token: it grows with
  the context, as a Llama's KV cache does;
- `sliding_attention`: keys and values of the last `sliding_window - 1` tokens: capped once the window is full;
- `memory_attention`: the same window plus its un-rotated keys, and a compressive memory `(kv_heads, head_dim,
  head_dim)` with its normaliser `(kv_heads, head_dim)` in fp32: capped;
- `linear_attention`: the recurrent state `(heads, d_phi, head_dim)` in fp32 and the short convolution's last
  `linear_conv_size - 1` inputs: constant;
- with a `hierarchy`, the layers of the shortened span see one token per group of `shorten_factor` (a full-attention
  layer there grows `shorten_factor` times slower), and the hourglass keeps the incomplete group and the last
  upsampled group, `(2 * shorten_factor - 1) * hidden_size` values, plus two int64 row counters.

Models are built on the meta device: no weights are loaded or allocated.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sonett.evaluation.baselines import llama_config_like, llama_config_matching
from sonett.model.configuration_sonett import SonettConfig
from sonett.model.linear_attention_sonett import linear_feature_size
from sonett.model.modeling_sonett import SonettForCausalLM, SonettForConditionalGeneration

FP32_BYTES = 4
INT64_BYTES = 8


@dataclass(frozen=True)
class StateSize:
    """How a decoding state grows: `per_token` bytes for each token (once every window is full) on top of
    `constant` bytes (the windows, linear and memory states, the hourglass buffers)."""

    per_token: float
    constant: int

    def at(self, tokens: int) -> float:
        """The state after `tokens` tokens, for `tokens` past every window."""
        return self.constant + self.per_token * tokens


def element_size(dtype: torch.dtype) -> int:
    """Bytes of one value of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


def _shorten_factor(config: SonettConfig) -> int:
    """The hierarchy's shorten factor k (1 without a hierarchy)."""
    settings = config.hierarchy_settings
    return settings.shorten_factor if settings is not None else 1


def layer_state_bytes(kind: str, config: SonettConfig, seen: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one cache layer of `kind` holds after it has seen `seen` tokens (batch 1; the state in `dtype`, the fp32
    parts in fp32)."""
    if seen <= 0:
        return 0
    kv, dim, size = config.num_key_value_heads, config.head_dim, element_size(dtype)
    if kind == "full_attention":
        return 2 * kv * seen * dim * size
    if kind in ("sliding_attention", "memory_attention"):
        stored = min(seen, config.sliding_window - 1)  # the window: the last sliding_window - 1 tokens
        if kind == "sliding_attention":
            return 2 * kv * stored * dim * size
        return 3 * kv * stored * dim * size + FP32_BYTES * (kv * dim * dim + kv * dim)
    if kind == "linear_attention":
        heads, features = config.num_attention_heads, config.linear_feature_dim
        state = FP32_BYTES * heads * linear_feature_size(config.linear_feature_map, features) * dim
        if config.linear_conv_size > 1:
            channels = 2 * heads * features + heads * dim
            state += channels * (config.linear_conv_size - 1) * size
        return state
    raise ValueError(f"No known decoding state for the layer kind {kind!r}.")


def decode_state_bytes(config: SonettConfig, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the whole `SonettCache` after `tokens` tokens at batch 1 (text only: no image keys and values).

    Equals `SonettCache.nbytes()` after a forward over `tokens` tokens with the config's windows (a model with
    adaptive spans trims its windows to the learned spans, so it holds at most this).
    """
    config = config.get_text_config(decoder=True)
    k, span = _shorten_factor(config), config.hierarchy_span()
    shortened = -(-tokens // k)  # complete groups: group j holds positions jk - k + 1 .. jk
    total = sum(
        layer_state_bytes(kind, config, shortened if i in span else tokens, dtype)
        for i, kind in enumerate(config.layer_types)
    )
    if config.hierarchy_settings is not None and tokens > 0:
        total += (2 * k - 1) * config.hidden_size * element_size(dtype) + 2 * INT64_BYTES
    return total


def state_size(config: SonettConfig, dtype: torch.dtype = torch.float32) -> StateSize:
    """Growth and constant part of the decoding state (batch 1): full-attention layers add per token (1/k per token
    inside a hierarchy's span), every other layer and the hourglass hold a capped state."""
    config = config.get_text_config(decoder=True)
    k, span = _shorten_factor(config), config.hierarchy_span()
    full = layer_state_bytes("full_attention", config, 1, dtype)
    per_token = sum(
        full / (k if i in span else 1) for i, kind in enumerate(config.layer_types) if kind == "full_attention"
    )
    filled = config.sliding_window or 1  # tokens after which every window is full
    constant = sum(
        layer_state_bytes(kind, config, filled, dtype) for kind in config.layer_types if kind != "full_attention"
    )
    if config.hierarchy_settings is not None:
        constant += (2 * k - 1) * config.hidden_size * element_size(dtype) + 2 * INT64_BYTES
    return StateSize(per_token=per_token, constant=constant)


def llama_state_size(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> StateSize:
    """A transformers Llama's KV cache: keys and values of every token in every layer, nothing constant."""
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_size(dtype)
    return StateSize(per_token=per_token, constant=0)


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def meta_model(config: SonettConfig) -> SonettForCausalLM:
    """The model of `config` on the meta device (no memory, no weights): multimodal when it has a vision config."""
    model_class = SonettForConditionalGeneration if config.vision_config is not None else SonettForCausalLM
    with torch.device("meta"):
        return model_class(config)


def parameter_counts(model: SonettForCausalLM) -> dict:
    """Parameters by part: total, embedding, output head (0 when tied), final norm, per layer kind (the decoder
    layers of that kind: mixer, MLP and norms), hourglass, cross-attention blocks, vision encoder and projector."""
    base = model.model
    per_kind: Counter[str] = Counter()
    for kind, layer in zip(model.config.get_text_config(decoder=True).layer_types, base.layers):
        per_kind[kind] += _count(layer)
    embedding = _count(base.embed_tokens)
    tied = model.lm_head.weight is base.embed_tokens.weight
    return {
        "total": _count(model),
        "embedding": embedding,
        "output_head": 0 if tied else _count(model.lm_head),
        "per_kind": dict(per_kind),
        "final_norm": _count(base.norm),
        "hourglass": _count(getattr(base, "hourglass", None)),
        "cross_attention": _count(getattr(base, "cross_attention_blocks", None)),
        "vision": _count(getattr(model, "vision_model", None)) + _count(getattr(model, "multi_modal_projector", None)),
    }


def equal_size_llama(config: SonettConfig) -> tuple[LlamaConfig, int, bool]:
    """The Llama the comparisons use: Sonett's shape with the MLP width matched to Sonett's parameter count; when no
    width matches within 5%, the same shape unmatched. Returns (config, parameters, matched)."""
    text = config.get_text_config(decoder=True)
    try:
        llama, matched = llama_config_matching(text), True
    except ValueError:
        llama, matched = llama_config_like(text), False
    with torch.device("meta"):
        parameters = _count(LlamaForCausalLM(llama))
    return llama, parameters, matched


def footprint(config: SonettConfig, dtype: torch.dtype = torch.float32, contexts: tuple[int, ...] = ()) -> dict:
    """Everything `sonett info` reports, as plain data (JSON-ready): layers, parameters, state, and the same for an
    equal-size Llama. `contexts`: lengths at which to give the exact state of both."""
    text = config.get_text_config(decoder=True)
    model = meta_model(config)
    sonett_state = state_size(text, dtype)
    llama, llama_parameters, matched = equal_size_llama(config)
    llama_state = llama_state_size(llama, dtype)
    hierarchy = None
    if text.hierarchy_settings is not None:
        span = text.hierarchy_span()
        hierarchy = {
            "shorten_factor": _shorten_factor(text),
            "start_layer": span.start,
            "end_layer": span.stop,
            "shortened_kinds": dict(Counter(text.layer_types[i] for i in span)),
        }
    return {
        "architecture": type(model).__name__,
        "layers": {
            "count": len(text.layer_types),
            "kinds": dict(Counter(text.layer_types)),
            "layer_types": list(text.layer_types),
            "hierarchy": hierarchy,
            "sliding_window": text.sliding_window,
            "adaptive_span": bool(text.adaptive_span),
        },
        "shape": {
            "hidden_size": text.hidden_size,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.head_dim,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
        },
        "parameters": parameter_counts(model),
        "state": {
            "dtype": str(dtype).removeprefix("torch."),
            "per_token_bytes": sonett_state.per_token,
            "constant_bytes": sonett_state.constant,
            "at_bytes": {str(n): decode_state_bytes(text, n, dtype) for n in contexts},
        },
        "llama": {
            "parameters": llama_parameters,
            "parameter_matched": matched,
            "intermediate_size": llama.intermediate_size,
            "per_token_bytes": llama_state.per_token,
            "constant_bytes": 0,
            "at_bytes": {str(n): math.ceil(llama_state.at(n)) for n in contexts},
        },
    }


__all__ = [
    "StateSize",
    "decode_state_bytes",
    "equal_size_llama",
    "footprint",
    "layer_state_bytes",
    "llama_state_size",
    "meta_model",
    "parameter_counts",
    "state_size",
]

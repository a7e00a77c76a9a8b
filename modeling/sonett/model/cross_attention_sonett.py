"""Gated cross-attention from text to images (Flamingo's GATED XATTN-DENSE, with mllama's q/k norms).

A block sits before each decoder layer listed in `config.cross_attention_layers`:

    h = h + tanh(attn_gate) * cross_attention(norm(h), image tokens)
    h = h + tanh(mlp_gate) * mlp(norm(h))        (only at positions that see at least one image)

Both gates start at 0, so a new block leaves the text model's outputs exactly unchanged. Each text position sees
only the images whose marker comes at or before it (`visible`); a position that sees none gets nothing.
Image keys and values are computed once per image and kept in the cache for decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_sonett import SonettConfig
from .layers_sonett import SonettMLP, SonettRMSNorm


class SonettCrossAttention(nn.Module):
    """Text queries attend to image keys/values; grouped KV heads, RMSNorm on queries and keys, no RoPE."""

    def __init__(self, config: SonettConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.q_norm = SonettRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = SonettRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def image_keys_values(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens `(batch, image_tokens, hidden)` -> keys, values `(batch, kv_heads, image_tokens, head_dim)`."""
        batch, length, _ = image_tokens.shape
        keys = self.k_norm(self.k_proj(image_tokens).view(batch, length, self.num_kv_heads, self.head_dim))
        values = self.v_proj(image_tokens).view(batch, length, self.num_kv_heads, self.head_dim)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states `(batch, seq, hidden)`, keys/values from `image_keys_values`, visible `(batch, seq,
        image_tokens)` bool. Returns `(batch, seq, hidden)`, zero where a position sees no image token."""
        batch, length, _ = hidden_states.shape
        query = self.q_norm(self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim))
        groups = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(groups, dim=1).to(query.dtype)
        values = values.repeat_interleave(groups, dim=1).to(query.dtype)
        sees_any = visible.any(dim=-1, keepdim=True)  # (batch, seq, 1)
        # A row that sees nothing would be all -inf; let it see everything and zero its output instead.
        mask = (visible | ~sees_any)[:, None]
        out = F.scaled_dot_product_attention(query.transpose(1, 2), keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, -1) * sees_any
        return self.o_proj(out)


class SonettCrossAttentionBlock(nn.Module):
    """One gated cross-attention + MLP block (tanh gates start at 0)."""

    def __init__(self, config: SonettConfig) -> None:
        super().__init__()
        self.input_layernorm = SonettRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn = SonettCrossAttention(config)
        self.post_attention_layernorm = SonettRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SonettMLP(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states `(batch, seq, hidden)` -> the same shape (see `SonettCrossAttention.forward`)."""
        attended = self.cross_attn(self.input_layernorm(hidden_states), keys, values, visible)
        hidden_states = hidden_states + self.attn_gate.tanh() * attended
        sees_any = visible.any(dim=-1, keepdim=True).to(hidden_states.dtype)
        return hidden_states + self.mlp_gate.tanh() * self.mlp(self.post_attention_layernorm(hidden_states)) * sees_any


__all__ = ["SonettCrossAttention", "SonettCrossAttentionBlock"]

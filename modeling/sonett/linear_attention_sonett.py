"""Gated linear attention mixer for the `linear_attention` layer kind (stub, being written)."""

from __future__ import annotations

import torch
from torch import nn

from .configuration_sonett import SonettConfig


class SonettLinearAttention(nn.Module):
    def __init__(self, config: SonettConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx

    @staticmethod
    def build_mask(kind: str, **mask_kwargs) -> torch.Tensor | None:
        return None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        raise NotImplementedError


__all__ = ["SonettLinearAttention"]

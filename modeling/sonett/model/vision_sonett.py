"""Sonett's image side: a small ViT encoder and the projector into the text model's width.

The encoder cuts an image into patches (one strided convolution, or a convolutional stem), embeds them with
learned row and column embeddings (2-D positions) and runs bidirectional pre-norm blocks. The projector maps
patch features into the text width through a two-layer MLP and an RMSNorm; with `num_visual_tokens`, a resampler
(learned queries attending to the patches, as Flamingo's Perceiver resampler) first reduces every image to a fixed
number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_sonett import SonettConfig, SonettVisionConfig
from .layers_sonett import SonettRMSNorm


class SonettVisionAttention(nn.Module):
    """Bidirectional multi-head attention over `(batch, tokens, hidden)`; keys/values may come from other states."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states `(batch, q_len, hidden)`, context `(batch, kv_len, hidden)` (default: hidden_states)."""
        context = hidden_states if context is None else context
        batch, q_len, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(context)), heads(self.v_proj(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, -1))


class SonettVisionBlock(nn.Module):
    """Pre-norm transformer block with LayerScale (CaiT): `x += s1 * attn(norm(x)); x += s2 * mlp(norm(x))`, no mask.

    The per-channel scales start at `LAYER_SCALE_INIT`, so a new encoder starts close to its patch embedding and
    its features are learnable from the first steps (a small ViT trained from scratch learns far slower without).
    """

    LAYER_SCALE_INIT = 0.1

    def __init__(self, config: SonettVisionConfig) -> None:
        super().__init__()
        self.attn_scale = nn.Parameter(torch.full((config.hidden_size,), self.LAYER_SCALE_INIT))
        self.mlp_scale = nn.Parameter(torch.full((config.hidden_size,), self.LAYER_SCALE_INIT))
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SonettVisionAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn_scale * self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp_scale * self.down_proj(F.gelu(self.up_proj(self.layer_norm2(hidden_states))))


class SonettStemConvolution(nn.Conv2d):
    """A convolution of `SonettConvolutionalStem`, initialised fan-in (He) for the activation that follows it
    (`nonlinearity`, a `torch.nn.init.calculate_gain` name) by `SonettPreTrainedModel._init_weights`."""

    def __init__(self, in_channels: int, out_channels: int, nonlinearity: str, **kwargs) -> None:
        super().__init__(in_channels, out_channels, **kwargs)
        self.nonlinearity = nonlinearity


class SonettConvolutionalStem(nn.Module):
    """Pixels `(images, channels, H, W)` -> patch features `(images, hidden, H / patch, W / patch)` through
    log2(patch) 3x3 stride-2 convolutions with GELU (channels doubling up to `hidden_size`) and a 1x1 convolution
    (Xiao et al. 2021). The convolutions use fan-in (He) initialisation (`SonettStemConvolution`), so the features
    keep the pixels' scale."""

    def __init__(self, config: SonettVisionConfig) -> None:
        super().__init__()
        steps = config.patch_size.bit_length() - 1
        widths = [config.num_channels] + [max(config.hidden_size >> (steps - 1 - i), 8) for i in range(steps)]
        self.convs = nn.ModuleList(
            SonettStemConvolution(widths[i], widths[i + 1], "relu", kernel_size=3, stride=2, padding=1)
            for i in range(steps)
        )
        self.proj = SonettStemConvolution(widths[-1], config.hidden_size, "linear", kernel_size=1)

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight (its dtype is the stem's input dtype)."""
        return self.convs[0].weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = pixel_values
        for conv in self.convs:
            hidden_states = F.gelu(conv(hidden_states))
        return self.proj(hidden_states)


class SonettVisionModel(nn.Module):
    """ViT encoder: pixels `(images, channels, H, W)` -> patch features `(images, patches, vision hidden)`."""

    def __init__(self, config: SonettVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.grid = config.image_size // config.patch_size
        if config.stem == "convolutional":
            self.patch_embedding = SonettConvolutionalStem(config)
        else:
            self.patch_embedding = nn.Conv2d(
                config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
            )
        self.row_embedding = nn.Embedding(self.grid, config.hidden_size)
        self.column_embedding = nn.Embedding(self.grid, config.hidden_size)
        self.layers = nn.ModuleList(SonettVisionBlock(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (images, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{tuple(pixel_values.shape)}; prepare images with SonettImageProcessor / SonettProcessor."
            )
        pixel_values = pixel_values.to(self.patch_embedding.weight.dtype)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (images, grid * grid, hidden)
        index = torch.arange(self.grid, device=patches.device)
        positions = (self.row_embedding(index)[:, None] + self.column_embedding(index)[None, :]).flatten(0, 1)
        hidden_states = patches + positions
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.post_layernorm(hidden_states)


class SonettMultiModalProjector(nn.Module):
    """Patch features `(images, patches, vision hidden)` -> visual tokens `(images, tokens, text hidden)`."""

    def __init__(self, config: SonettConfig) -> None:
        super().__init__()
        vision = config.vision_config
        self.resampler_queries = None
        if vision.num_visual_tokens is not None:
            self.resampler_queries = nn.Parameter(torch.zeros(vision.num_visual_tokens, vision.hidden_size))
            self.resampler_norm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
            self.resampler = SonettVisionAttention(vision.hidden_size, vision.num_attention_heads)
        self.up_proj = nn.Linear(vision.hidden_size, config.hidden_size)
        self.down_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # Visual tokens at unit RMS, the scale of the text residual stream they are read into; without it they
        # start ~50x smaller and the cross-attention's value path learns far too slowly.
        self.norm = SonettRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.resampler_queries is not None:
            queries = self.resampler_queries.expand(features.shape[0], -1, -1)
            features = queries + self.resampler(queries, self.resampler_norm(features))
        return self.norm(self.down_proj(F.gelu(self.up_proj(features))))


__all__ = ["SonettMultiModalProjector", "SonettStemConvolution", "SonettVisionModel"]

"""`SonettCache`: the whole decoding state of a Sonett model, one cache layer per decoder layer.

The class of each layer comes from `config.layer_types` through `CACHE_LAYER_CLASSES`:

- `full_attention`    -> `SonettFullAttentionLayer`: keys/values `(batch, kv_heads, seq, head_dim)`, grows.
- `sliding_attention` -> `SonettSlidingWindowLayer`: keeps only the last `sliding_window - 1` keys/values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .configuration_sonett import SonettConfig


class SonettFullAttentionLayer(DynamicLayer):
    """Keys and values of a `full_attention` layer, `(batch, kv_heads, seq, head_dim)`; grows without bound."""


class SonettSlidingWindowLayer(DynamicSlidingWindowLayer):
    """Keys and values of a `sliding_attention` layer, trimmed to the last `sliding_window - 1` positions.

    `update` returns the trimmed past plus the new tokens, so a prompt longer than the window still attends
    correctly; `get_mask_sizes` tells the mask builder the matching key length and offset.
    """


# layer kind -> factory(config) building that kind's cache layer. Register new kinds here.
CACHE_LAYER_CLASSES: dict[str, Callable[[SonettConfig], object]] = {
    "full_attention": lambda config: SonettFullAttentionLayer(),
    "sliding_attention": lambda config: SonettSlidingWindowLayer(sliding_window=config.sliding_window),
}


class SonettCache(Cache):
    """Decoding state of every Sonett layer.

    Built from the config: `SonettCache(config)`. The model creates one itself when `use_cache=True` and no
    cache is passed; `generate()` then carries it from step to step through `outputs.cache`.
    """

    def __init__(self, config: SonettConfig) -> None:
        text_config = config.get_text_config(decoder=True)
        self.layer_types = list(text_config.layer_types)
        super().__init__(layers=[CACHE_LAYER_CLASSES[kind](text_config) for kind in self.layer_types])

    def cached_batch_size(self) -> int | None:
        """Batch size of the stored state, or None while the cache is still empty."""
        for layer in self.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() == 4:
                return keys.shape[0]
        return None

    def nbytes(self) -> int:
        """Bytes held by all cached tensors."""
        total = 0
        for layer in self.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


__all__ = ["CACHE_LAYER_CLASSES", "SonettCache", "SonettFullAttentionLayer", "SonettSlidingWindowLayer"]

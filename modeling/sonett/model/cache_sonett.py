"""`SonettCache`: the whole decoding state of a Sonett model, one cache layer per decoder layer.

The class of each layer comes from `config.layer_types` through `CACHE_LAYER_CLASSES`:

- `full_attention`    -> `SonettFullAttentionLayer`: keys/values `(batch, kv_heads, seq, head_dim)`, grows.
- `sliding_attention` -> `SonettSlidingWindowLayer`: the last `window - 1` keys/values (the window may be
  shorter than `sliding_window` when adaptive spans learned to look less far).
- `linear_attention`  -> `SonettLinearAttentionLayer`: a constant-size fp32 recurrent state plus the tail of
  the short convolution's input.
- `memory_attention`  -> `SonettMemoryLayer`: the sliding window plus a fp32 compressive memory
  `(batch, kv_heads, head_dim, head_dim)` and its normaliser `(batch, kv_heads, head_dim)`.

With a `hierarchy`, the layers of the shortened span keep their state in `SonettHourglassState` instead (see
there), because each row of a batch completes its groups of k tokens at its own steps.

The whole cache saves to and loads from one safetensors file (`save` / `load`), so a conversation can
continue in another process without re-reading earlier turns. A memory file is data from outside: `load` checks its
sha256 checksum (over every tensor and the metadata), the config it was made for, the weights it was made with, and
every tensor's name, shape, dtype and values before any of it is used (see `SonettCache.load`). The checksum is not
a signature: it catches damage and edits, not a forger who recomputes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer
from transformers.utils import is_torchdynamo_compiling

from .configuration_sonett import SonettConfig
from .linear_attention_sonett import linear_feature_size

CACHE_FILE_FORMAT = "sonett-cache"
# Version 2 added the checksum and the weights hash; version-1 files cannot be checked and are refused.
CACHE_FILE_VERSION = "2"
MAX_MEMORY_HEADER_BYTES = 64 * 1024 * 1024  # a memory file's header names a few tensors per layer: far below this
# The metadata of a version-2 memory file: exactly these keys (plus "hourglass_scalars" with a hierarchy).
CACHE_FILE_KEYS = ("format", "version", "fingerprint", "layer_windows", "scalars", "weights", "checksum")
# What a memory file that cannot be trusted tells the user to do.
START_AGAIN = (
    "delete it and start a new conversation (`sonett chat`: /reset; in Python a fresh `Conversation` or "
    "`model.make_cache()`), which builds the state again from the next turn."
)
# Config fields that shape the decoding state; a cache file only fits a config that agrees on all of them.
STATE_FIELDS = (
    "layer_types",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "adaptive_span",
    "linear_feature_map",
    "linear_feature_dim",
    "linear_conv_size",
    "memory_update",
    "vocab_size",
    "hierarchy",
    "cross_attention_layers",
)


def _select(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor.index_select(0, index.to(tensor.device))


class SonettFullAttentionLayer(DynamicLayer):
    """Keys and values of a `full_attention` layer, `(batch, kv_heads, seq, head_dim)`; grows without bound."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `DynamicLayer.update`, except that an empty layer keeps the new tensors themselves (a prefill copies
        no prompt-long keys and values)."""
        if self.is_initialized and self.keys.numel() > 0:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return self.keys, self.values

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values} if self.get_seq_length() > 0 else {}

    def state_scalars(self) -> dict[str, int]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        if tensors:
            self.lazy_initialization(tensors["keys"], tensors["values"])
            self.keys, self.values = tensors["keys"], tensors["values"]


class SonettSlidingWindowLayer(DynamicSlidingWindowLayer):
    """Keys and values of a windowed layer, trimmed to the last `sliding_window - 1` positions.

    `update` returns the trimmed past plus the new tokens, so a prompt longer than the window still attends
    correctly; `get_mask_sizes` tells the mask builder the matching key length and offset.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `DynamicSlidingWindowLayer.update`, but what the layer keeps after a long update is its own copy of
        the last `sliding_window - 1` positions, not a slice that would hold every key and value of the update alive
        as long as the cache; and an empty layer is not copied in front of the new tokens (a prefill copies nothing
        prompt-long). Returns the past window plus the new tokens, `(batch, kv_heads, past + new, head_dim)`."""
        if self.record_past or (self.is_initialized and self.keys.numel() > 0):
            full_keys, full_values = super().update(key_states, value_states, *args, **kwargs)
        else:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            full_keys, full_values = key_states, value_states
            self.keys = key_states[:, :, -self.sliding_window + 1 :, :]
            self.values = value_states[:, :, -self.sliding_window + 1 :, :]
        if not self.record_past and full_keys.shape[-2] > self.sliding_window:
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return full_keys, full_values

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values} if self.is_initialized else {}

    def state_scalars(self) -> dict[str, int]:
        return {"cumulative_length": self.cumulative_length}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        if tensors:
            self.lazy_initialization(tensors["keys"], tensors["values"])
            self.keys, self.values = tensors["keys"], tensors["values"]
        self.cumulative_length = int(scalars.get("cumulative_length", 0))


class SonettMemoryLayer(SonettSlidingWindowLayer):
    """State of a `memory_attention` layer: the local window and the compressive memory of older tokens.

    `keys` hold RoPE-rotated keys for the local attention; `memory_keys` the same window before RoPE, which
    is what the memory stores once a token leaves the window. `memory` `(batch, kv_heads, d_k, d_v)` and
    `normalizer` `(batch, kv_heads, d_k)` are fp32 and hold every token older than the window.
    """

    # Tokens folded into the memory cannot be taken out again, so assisted decoding cannot roll this layer back.
    is_croppable = False

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.memory_keys: torch.Tensor | None = None
        self.memory: torch.Tensor | None = None
        self.normalizer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, raw_key_states: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append rotated keys, values and the un-rotated `raw_key_states`; return the window plus new tokens."""
        past_raw = self.memory_keys if self.memory_keys is not None else raw_key_states[:, :, :0]
        self.memory_keys = torch.cat([past_raw, raw_key_states], dim=-2)[:, :, -self.sliding_window + 1 :, :]
        return super().update(key_states, value_states, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "A memory_attention state cannot be rolled back (cropped): evicted tokens are already in the memory."
            )

    def activate_past_recording(self) -> None:
        """No-op: this layer cannot be rolled back, so there is no past to record."""

    def memory_inputs(
        self,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(raw window keys, window values, memory, normaliser) before this step, or Nones when empty."""
        if not self.is_initialized:
            return None, None, None, None
        return self.memory_keys, self.values, self.memory, self.normalizer

    def entry_mask(self, padding: torch.Tensor | None, new_tokens: int) -> torch.Tensor | None:
        """`(batch, stored + new)` True for the real tokens among the stored window and the new tokens, or None
        when `padding` (the 2-D mask `(batch, cached + new)`) is None. Call it before `update`."""
        if padding is None:
            return None
        stored = self.memory_keys.shape[-2] if self.memory_keys is not None else 0
        return padding[:, -(stored + new_tokens) :]

    def set_memory(self, memory: torch.Tensor, normalizer: torch.Tensor) -> None:
        self.memory, self.normalizer = memory, normalizer

    def leaving_mask(self, padding: torch.Tensor | None) -> torch.Tensor | None:
        """`(batch,)` True where the oldest stored entry, which leaves the window at a one-token step, is a real
        token; None when `padding` (the 2-D mask `(batch, cached + 1)`) is None. Call it before `update`."""
        if padding is None:
            return None
        return padding[:, -(self.memory_keys.shape[-2] + 1)]

    def memory_buffers(
        self, batch: int, kv_heads: int, key_dim: int, value_dim: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory `(batch, kv_heads, key_dim, value_dim)` and normaliser `(batch, kv_heads, key_dim)` that a decode
        step may write in place (no-grad only): contiguous fp32 tensors owned by this layer, zeros before any token
        has left the window."""
        if self.memory is None:
            self.memory = torch.zeros(batch, kv_heads, key_dim, value_dim, dtype=torch.float32, device=device)
            self.normalizer = torch.zeros(batch, kv_heads, key_dim, dtype=torch.float32, device=device)
        elif not self.memory.is_contiguous() or (
            # an inference-mode tensor cannot be written in place outside inference mode: take a normal copy once
            not is_torchdynamo_compiling() and self.memory.is_inference() and not torch.is_inference_mode_enabled()
        ):
            self.memory, self.normalizer = self.memory.clone().contiguous(), self.normalizer.clone().contiguous()
        return self.memory, self.normalizer

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.memory_keys = _select(self.memory_keys, beam_idx)
        self.memory = _select(self.memory, beam_idx)
        self.normalizer = _select(self.normalizer, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for name in ("memory_keys", "memory", "normalizer"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for name in ("memory_keys", "memory", "normalizer"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[indices])

    def reset(self) -> None:
        super().reset()
        self.memory_keys = self.memory = self.normalizer = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        for name in ("memory_keys", "memory", "normalizer"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        super().load_state(tensors, scalars)
        self.memory_keys = tensors.get("memory_keys")
        self.memory = tensors.get("memory")
        self.normalizer = tensors.get("normalizer")


class SonettLinearAttentionLayer(CacheLayerMixin):
    """Constant-size state of a `linear_attention` layer.

    `recurrent_state` `(batch, heads, d_phi, head_dim)` in fp32 (d_phi is the feature size, 1 + d + d^2 for the
    Taylor map) and `conv_state` `(batch, channels, conv_size - 1)`, the last inputs of the short causal
    convolution (None without a convolution).
    """

    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.recurrent_state: torch.Tensor | None = None
        self.conv_state: torch.Tensor | None = None
        self.seq_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("linear_attention layers keep a recurrent state: use get_state / set_state.")

    def get_state(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(recurrent state, convolution state) before this step; Nones before the first token."""
        return self.recurrent_state, self.conv_state

    def set_state(self, recurrent_state: torch.Tensor, conv_state: torch.Tensor | None, num_new_tokens: int) -> None:
        self.recurrent_state, self.conv_state = recurrent_state, conv_state
        self.seq_length += num_new_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.recurrent_state = self.conv_state = None
        self.seq_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("A linear_attention state cannot be rolled back to an earlier token.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.recurrent_state = _select(self.recurrent_state, beam_idx)
        self.conv_state = _select(self.conv_state, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in ("recurrent_state", "conv_state"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("recurrent_state", "conv_state"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[indices])

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        if self.recurrent_state is not None:
            tensors["recurrent_state"] = self.recurrent_state
        if self.conv_state is not None:
            tensors["conv_state"] = self.conv_state
        return tensors

    def state_scalars(self) -> dict[str, int]:
        return {"seq_length": self.seq_length}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> None:
        self.recurrent_state = tensors.get("recurrent_state")
        self.conv_state = tensors.get("conv_state")
        self.seq_length = int(scalars.get("seq_length", 0))
        self.is_initialized = self.recurrent_state is not None


def _mark_static(*tensors: torch.Tensor | None) -> None:
    """Tag preallocated state as a fixed address for torch.compile / cudagraphs (not while tracing)."""
    if not is_torchdynamo_compiling():
        for tensor in tensors:
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)


class SonettStaticFullAttentionLayer(StaticLayer):
    """Keys and values of a `full_attention` layer preallocated to `(batch, kv_heads, max_cache_len, head_dim)`.

    transformers' `StaticLayer`: the seen-token count is a tensor, written in place, so a compiled decode step
    keeps its shapes and guards from step to step.
    """

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values} if self.is_initialized else {}

    def state_scalars(self) -> dict[str, int]:
        return {}


class SonettStaticSlidingWindowLayer(CacheLayerMixin):
    """Keys and values of a windowed layer in a fixed buffer of `window - 1` slots, `(batch, kv_heads, slots, dim)`.

    The slots are right-aligned: the last slot holds the newest cached token, and slots not yet filled sit at the
    front (`key_validity` masks them). `update` always returns the slots followed by the new tokens, so a decode
    step sees the same shapes at every step. The seen-token count is a tensor written in place.
    """

    is_compileable = True
    is_sliding = True
    # Tokens pushed out of the buffer cannot come back, so the layer cannot be rolled back.
    is_croppable = False
    supports_early_init = False

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.slots = max(sliding_window - 1, 0)
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.slots, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.slots, value_states.shape[-1])
        self.cumulative_length = self.cumulative_length.to(self.device)
        _mark_static(self.keys, self.values, self.cumulative_length)
        self.is_initialized = True

    @staticmethod
    def _push(buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write the newest `slots` of `buffer + new` back into `buffer` (in place); return `buffer + new`."""
        full = torch.cat([buffer, new], dim=-2)
        buffer.copy_(full[:, :, full.shape[-2] - buffer.shape[-2] :])
        return full

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the slots plus the new tokens `(batch, kv_heads, slots + new, dim)`; keep the newest slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        full_keys = self._push(self.keys, key_states)
        full_values = self._push(self.values, value_states)
        self.cumulative_length.add_(key_states.shape[-2])
        return full_keys, full_values

    def key_validity(self, attention_mask: torch.Tensor | None, new_tokens: int, batch_size: int) -> torch.Tensor:
        """`(batch, slots + new)` bool, True for the keys `update` will return that are real tokens.

        A slot is real once filled and when the 2-D `attention_mask` `(batch, cached + new)` marks its token as real;
        call it before `update`.
        """
        device = self.cumulative_length.device if attention_mask is None else attention_mask.device
        seen = self.cumulative_length.to(device)
        filled = torch.arange(self.slots, device=device) >= self.slots - seen
        valid = torch.cat([filled, torch.ones(new_tokens, dtype=torch.bool, device=device)])
        valid = valid[None, :].expand(batch_size, -1)
        if attention_mask is not None:
            padded = torch.cat([attention_mask.new_zeros(attention_mask.shape[0], self.slots), attention_mask], dim=1)
            valid = valid & padded[:, padded.shape[1] - self.slots - new_tokens :].bool()
        return valid

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_seq_length(self) -> torch.Tensor | int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        self.cumulative_length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("A static sliding-window state cannot be rolled back (cropped): its old tokens are gone.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:  # in place, so that the buffers keep their static addresses
            self.keys.copy_(self.keys.index_select(0, beam_idx.to(self.device)))
            self.values.copy_(self.values.index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values} if self.is_initialized else {}

    def state_scalars(self) -> dict[str, int]:
        return {}


class SonettStaticMemoryLayer(SonettStaticSlidingWindowLayer):
    """A `memory_attention` state in fixed buffers: the window slots (rotated keys, values and the un-rotated
    `memory_keys`) as in `SonettStaticSlidingWindowLayer`, and the fp32 memory `(batch, kv_heads, d_k, d_v)` and
    normaliser `(batch, kv_heads, d_k)`, allocated at the batch size on first use and then written in place."""

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.memory_keys: torch.Tensor | None = None
        self.memory: torch.Tensor | None = None
        self.normalizer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.memory_keys = torch.zeros_like(self.keys)
        _mark_static(self.memory_keys)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, raw_key_states: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `SonettStaticSlidingWindowLayer.update`, also keeping the un-rotated `raw_key_states`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._push(self.memory_keys, raw_key_states)
        return super().update(key_states, value_states)

    def memory_inputs(
        self,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(raw window slots, value slots, memory, normaliser) before this step, or Nones before the first token."""
        if not self.is_initialized:
            return None, None, None, None
        return self.memory_keys, self.values, self.memory, self.normalizer

    def entry_mask(self, padding: torch.Tensor | None, new_tokens: int) -> torch.Tensor | None:
        """Which memory entries (window slots + new tokens) are real tokens; see `SonettMemoryLayer.entry_mask`."""
        if not self.is_initialized:
            return None if padding is None else padding[:, -new_tokens:]
        return self.key_validity(padding, new_tokens, self.keys.shape[0])

    def set_memory(self, memory: torch.Tensor, normalizer: torch.Tensor) -> None:
        if self.memory is None:
            self.memory, self.normalizer = torch.zeros_like(memory), torch.zeros_like(normalizer)
            _mark_static(self.memory, self.normalizer)
        if memory is not self.memory:  # a decode step writes the buffers themselves
            self.memory.copy_(memory)
            self.normalizer.copy_(normalizer)

    def leaving_mask(self, padding: torch.Tensor | None) -> torch.Tensor:
        """`(batch,)` True where slot 0, which leaves the window at a one-token step, holds a real token: filled, and
        marked real by `padding` (the 2-D mask `(batch, cached + 1)`, or None). Call it before `update`."""
        filled = self.cumulative_length >= self.slots  # 0-d, no host sync
        if padding is None:
            return filled.expand(self.keys.shape[0])
        if padding.shape[1] <= self.slots:  # fewer tokens than slots so far: slot 0 is empty
            return padding.new_zeros(padding.shape[0], dtype=torch.bool)
        return padding[:, -(self.slots + 1)].bool() & filled

    def memory_buffers(
        self, batch: int, kv_heads: int, key_dim: int, value_dim: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The preallocated memory and normaliser (see `SonettMemoryLayer.memory_buffers`), allocated on first use."""
        if self.memory is None:
            self.memory = torch.zeros(batch, kv_heads, key_dim, value_dim, dtype=torch.float32, device=device)
            self.normalizer = torch.zeros(batch, kv_heads, key_dim, dtype=torch.float32, device=device)
            _mark_static(self.memory, self.normalizer)
        return self.memory, self.normalizer

    def activate_past_recording(self) -> None:
        """No-op: this layer cannot be rolled back, so there is no past to record."""

    def reset(self) -> None:
        super().reset()
        for tensor in (self.memory_keys, self.memory, self.normalizer):
            if tensor is not None:
                tensor.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for tensor in (self.memory_keys, self.memory, self.normalizer):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for name in ("memory_keys", "memory", "normalizer"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for name in ("memory_keys", "memory", "normalizer"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[indices])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        for name in ("memory_keys", "memory", "normalizer"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        return tensors


class SonettStaticLinearAttentionLayer(SonettLinearAttentionLayer):
    """A `linear_attention` state whose tensors are allocated at the batch size on first use and then written in
    place, with a tensor token count, so a compiled decode step reads and writes the same buffers every step."""

    is_compileable = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seq_length = torch.tensor(0, dtype=torch.long)

    def set_state(self, recurrent_state: torch.Tensor, conv_state: torch.Tensor | None, num_new_tokens: int) -> None:
        if self.recurrent_state is None:
            self.recurrent_state = torch.zeros_like(recurrent_state)
            self.conv_state = None if conv_state is None else torch.zeros_like(conv_state)
            self.seq_length = self.seq_length.to(recurrent_state.device)
            _mark_static(self.recurrent_state, self.conv_state, self.seq_length)
        if recurrent_state is not self.recurrent_state:  # a decode step may have updated the buffer in place
            self.recurrent_state.copy_(recurrent_state)
        if conv_state is not None:
            self.conv_state.copy_(conv_state)
        self.seq_length.add_(num_new_tokens)
        self.is_initialized = True

    def get_seq_length(self) -> torch.Tensor | int:
        return self.seq_length if self.is_initialized else 0

    def reset(self) -> None:
        for tensor in (self.recurrent_state, self.conv_state):
            if tensor is not None:
                tensor.zero_()
        self.seq_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for tensor in (self.recurrent_state, self.conv_state):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def state_scalars(self) -> dict[str, int]:
        return {}


class SonettHourglassCohort:
    """Rows of a batch whose shortened streams advance together, and the state of their shortened layers.

    Rows join a cohort when their first real token arrives; rows of one cohort complete their groups of k tokens
    at the same steps, so their shortened tokens form one left-padded batch.

    Attributes:
        rows: `(n,)` the rows of the full batch in this cohort.
        cache: a `SonettCache` of batch n holding the shortened layers' state (the other layers stay empty).
        padding: `(n,)` left-padding shortened tokens of each row (rows that started with fewer groups).
        length: shortened tokens so far, padding included.
    """

    def __init__(self, rows: torch.Tensor, cache: SonettCache, padding: torch.Tensor, length: int = 0) -> None:
        self.rows, self.cache, self.padding, self.length = rows, cache, padding, length

    def mask(self) -> torch.Tensor:
        """`(n, length)` bool: True for a real shortened token."""
        return torch.arange(self.length, device=self.padding.device)[None, :] >= self.padding[:, None]


class SonettHourglassState:
    """Decoding state of an hourglass hierarchy (shorten factor k).

    Attributes:
        buffer: `(batch, k - 1, hidden)` the incomplete group of full-length states (zeros where not yet filled).
        last_coarse: `(batch, k, hidden)` the upsampled output of each row's last complete group (one vector per
            place in a group), which the tokens until the next complete group read.
        cohorts: the rows grouped by the steps at which their groups complete, each with its shortened state.
    """

    def __init__(self, config: SonettConfig, layer_windows: dict[int, int]) -> None:
        self.config = config
        self.layer_windows = layer_windows
        self.shorten_factor = config.hierarchy_settings.shorten_factor
        self.buffer: torch.Tensor | None = None
        self.last_coarse: torch.Tensor | None = None
        self.cohorts: list[SonettHourglassCohort] = []

    def new_cohort(self, rows: torch.Tensor, padding: torch.Tensor | None = None, length: int = 0):
        """Start a cohort for `rows` `(n,)` (an empty shortened stream unless `padding` / `length` are given)."""
        if padding is None:
            padding = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
        cache = SonettCache(self.config, self.layer_windows, with_hourglass=False)
        cohort = SonettHourglassCohort(rows, cache, padding, length)
        self.cohorts.append(cohort)
        return cohort

    def assigned_rows(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """`(batch,)` bool: rows that already belong to a cohort."""
        assigned = torch.zeros(batch_size, dtype=torch.bool, device=device)
        for cohort in self.cohorts:
            assigned[cohort.rows.to(device)] = True
        return assigned

    def select_rows(self, indices: torch.Tensor) -> None:
        """Keep row `indices[i]` as new row i (beam reordering, repetition, selection); rows may repeat."""
        if self.buffer is None:
            return
        indices = indices.to(self.buffer.device)
        old_batch = self.buffer.shape[0]
        self.buffer, self.last_coarse = self.buffer[indices], self.last_coarse[indices]
        kept = []
        for cohort in self.cohorts:
            local = torch.full((old_batch,), -1, dtype=torch.long, device=indices.device)
            local[cohort.rows.to(indices.device)] = torch.arange(len(cohort.rows), device=indices.device)
            local = local[indices]
            members = (local >= 0).nonzero().squeeze(-1)
            if members.numel() == 0:
                continue
            cohort.cache.reorder_cache(local[members])
            cohort.rows, cohort.padding = members, cohort.padding[local[members].to(cohort.padding.device)]
            kept.append(cohort)
        self.cohorts = kept

    def reset(self) -> None:
        self.buffer = self.last_coarse = None
        self.cohorts = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.buffer is None:
            return {}
        tensors = {"buffer": self.buffer, "last_coarse": self.last_coarse}
        for c, cohort in enumerate(self.cohorts):
            tensors[f"cohorts.{c}.rows"] = cohort.rows
            tensors[f"cohorts.{c}.padding"] = cohort.padding
            for name, tensor in cohort.cache.state_tensors().items():
                tensors[f"cohorts.{c}.{name}"] = tensor
        return tensors

    def state_scalars(self) -> list:
        """Per cohort, its length and the per-layer scalars of its cache."""
        return [{"length": cohort.length, "layers": cohort.cache.state_scalars()} for cohort in self.cohorts]

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: list) -> None:
        self.reset()
        if "buffer" not in tensors:
            return
        self.buffer, self.last_coarse = tensors["buffer"], tensors["last_coarse"]
        for c, cohort_scalars in enumerate(scalars):
            prefix = f"cohorts.{c}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            cohort = self.new_cohort(own.pop("rows"), own.pop("padding"), int(cohort_scalars["length"]))
            cohort.cache.load_state(own, cohort_scalars["layers"])


# layer kind -> factory(config, window) building that kind's cache layer. Register new kinds here.
CACHE_LAYER_CLASSES: dict[str, Callable[[SonettConfig, int | None], CacheLayerMixin]] = {
    "full_attention": lambda config, window: SonettFullAttentionLayer(),
    "sliding_attention": lambda config, window: SonettSlidingWindowLayer(sliding_window=window),
    "linear_attention": lambda config, window: SonettLinearAttentionLayer(),
    "memory_attention": lambda config, window: SonettMemoryLayer(sliding_window=window),
}
# layer kind -> factory(config, window, max_cache_len) building that kind's layer of a `SonettStaticCache`.
STATIC_CACHE_LAYER_CLASSES: dict[str, Callable[[SonettConfig, int | None, int], CacheLayerMixin]] = {
    "full_attention": lambda config, window, length: SonettStaticFullAttentionLayer(max_cache_len=length),
    "sliding_attention": lambda config, window, length: SonettStaticSlidingWindowLayer(sliding_window=window),
    "linear_attention": lambda config, window, length: SonettStaticLinearAttentionLayer(),
    "memory_attention": lambda config, window, length: SonettStaticMemoryLayer(sliding_window=window),
}
# What `generation_config.cache_implementation` may name for a Sonett model (None is the dynamic cache).
SUPPORTED_CACHE_IMPLEMENTATIONS = ("dynamic", "static")


def state_fingerprint(config: SonettConfig) -> dict:
    """The config fields that shape the decoding state."""
    return {name: getattr(config, name, None) for name in STATE_FIELDS}


class MemoryFileError(ValueError):
    """A memory file that cannot be used: truncated, damaged or edited (checksum), malformed, from an older Sonett,
    or made by a model with another config or other weights. The message names the file, the problem and the fix."""


class _BadFileError(ValueError):
    """A problem with a memory file's metadata or tensors; `SonettCache.load` turns it into a `MemoryFileError`."""


def _hash_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    """Feed `name`, dtype, shape and the raw bytes of `tensor` into `digest` (the bytes' length follows from them)."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest.update(json.dumps([name, str(flat.dtype), list(tensor.shape)]).encode() + b"\n")
    digest.update(memoryview(flat.view(torch.uint8).numpy()))


def state_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 (hex) over a memory file's metadata (every key but "checksum") and every tensor's name, dtype, shape
    and bytes, in name order: what `SonettCache.save` writes as the "checksum" and `load` verifies."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 (hex) over the model's `state_dict()`: every entry's name, dtype, shape and bytes, in name order.

    It identifies the weights a memory file was made with (the same weights in another dtype hash differently). The
    value is cached on the model, keyed by each tensor's storage address and version counter, so it is computed once
    per model and again after in-place updates (optimizer steps, `load_state_dict`); a write through `.data` does not
    bump the version counter and is not seen.
    """
    state = model.state_dict()
    names = sorted(state)
    key = tuple((n, state[n].data_ptr(), state[n]._version, state[n].dtype, tuple(state[n].shape)) for n in names)
    cached = getattr(model, "_sonett_weights_sha256", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name in names:
        _hash_tensor(digest, name, state[name])
    value = digest.hexdigest()
    model._sonett_weights_sha256 = (key, value)
    return value


def fsync_path(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to the disk."""
    flags = os.O_RDONLY
    if path.is_dir():
        if not hasattr(os, "O_DIRECTORY"):
            return  # Windows cannot open a folder; its renames are not made durable this way
        flags |= os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_field(metadata: dict[str, str], key: str, kind: type) -> object:
    """Metadata entry `key` parsed as JSON; it must be a `kind` (dict or list)."""
    if key not in metadata:
        raise _BadFileError(f"its metadata has no {key!r}")
    try:
        value = json.loads(metadata[key])
    except (TypeError, ValueError) as error:
        raise _BadFileError(f"metadata {key!r} is not valid JSON ({error})") from None
    if not isinstance(value, kind):
        raise _BadFileError(f"metadata {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _count(value: object, what: str) -> int:
    """A token count from the metadata: an int >= 0 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadFileError(f"{what} is {value!r}; token counts are whole numbers >= 0")
    return value


def _parse_windows(metadata: dict[str, str], config: SonettConfig, kinds: list[str]) -> dict[int, int | None]:
    """The per-layer windows: one entry per layer, an int in [1, sliding_window] for windowed layers."""
    raw = _json_field(metadata, "layer_windows", dict)
    if set(raw) != {str(i) for i in range(len(kinds))}:
        raise _BadFileError(
            f"layer_windows names layers {sorted(raw)}, not the {len(kinds)} layers 0..{len(kinds) - 1}"
        )
    windows = {}
    for i, kind in enumerate(kinds):
        window = raw[str(i)]
        windowed = kind in ("sliding_attention", "memory_attention")
        valid = window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 1)
        if not valid or (windowed and (window is None or window > config.sliding_window)):
            raise _BadFileError(
                f"layer {i} ({kind}) has window {window!r}; expected "
                + (f"an int from 1 to sliding_window {config.sliding_window}" if windowed else "None or an int >= 1")
            )
        windows[i] = window
    return windows


def _parse_scalars(value: object, layers: int, what: str) -> list[dict[str, object]]:
    if not isinstance(value, list) or len(value) != layers or not all(isinstance(s, dict) for s in value):
        raise _BadFileError(f"{what} must be a list of {layers} objects (one per layer), got {value!r}")
    return value


def _layer_spec(
    kind: str, config: SonettConfig, window: int | None, batch: int, seen: int
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype | None]], dict[str, int]]:
    """The state of one cache layer of `kind` that has seen `seen` tokens, at batch size `batch`:
    ({tensor name: (shape, dtype)}, {scalar name: value}); dtype None is the model's compute dtype."""
    kv, dim = config.num_key_value_heads, config.head_dim
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    if kind == "full_attention":
        if seen:
            tensors = {"keys": ((batch, kv, seen, dim), None), "values": ((batch, kv, seen, dim), None)}
        return tensors, {}
    if kind in ("sliding_attention", "memory_attention"):
        stored = len(range(seen)[-window + 1 :])  # what the layer keeps: the last window - 1 tokens
        if seen:
            tensors = {"keys": ((batch, kv, stored, dim), None), "values": ((batch, kv, stored, dim), None)}
            if kind == "memory_attention":
                tensors["memory_keys"] = ((batch, kv, stored, dim), None)
                tensors["memory"] = ((batch, kv, dim, dim), torch.float32)
                tensors["normalizer"] = ((batch, kv, dim), torch.float32)
        return tensors, {"cumulative_length": seen}
    if kind == "linear_attention":
        heads, features = config.num_attention_heads, config.linear_feature_dim
        if seen:
            d_phi = linear_feature_size(config.linear_feature_map, features)
            tensors = {"recurrent_state": ((batch, heads, d_phi, dim), torch.float32)}
            if config.linear_conv_size > 1:
                channels = 2 * heads * features + heads * dim
                tensors["conv_state"] = ((batch, channels, config.linear_conv_size - 1), None)
        return tensors, {"seq_length": seen}
    raise _BadFileError(f"layer kind {kind!r} has no known state")


def _stream_spec(
    prefix: str,
    config: SonettConfig,
    windows: dict[int, int | None],
    scalars: list[dict[str, object]],
    tensors: dict[str, torch.Tensor],
    batch: int,
    layers: range | list[int],
    seen: int | None = None,
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Expected tensors of one stream of layers (`prefix` + `layers.{i}.`): the layers in `layers` have seen
    `seen` tokens (read from their counters when None; they must agree), the others none. Checks the counters."""
    kinds = list(config.layer_types)
    if seen is None:  # the layers' counters; full_attention layers have none, so their keys' length without them
        counts = {}
        for i in layers:
            if kinds[i] != "full_attention":
                name = "seq_length" if kinds[i] == "linear_attention" else "cumulative_length"
                counts[i] = _count(scalars[i].get(name), f"{name} of layer {i}")
        for i in [] if counts else layers:
            if (keys := tensors.get(f"{prefix}layers.{i}.keys")) is not None and keys.dim() == 4:
                counts[i] = keys.shape[-2]
        if len(set(counts.values())) > 1:
            raise _BadFileError(f"its layers disagree on how many tokens they have seen ({counts}, by layer)")
        seen = next(iter(counts.values()), 0)
    spec = {}
    for i, kind in enumerate(kinds):
        own, expected = _layer_spec(kind, config, windows[i], batch, seen if i in layers else 0)
        given = scalars[i]
        if set(given) != set(expected):
            raise _BadFileError(f"{prefix}layer {i} ({kind}) has counters {sorted(given)}; expected {sorted(expected)}")
        for name, value in given.items():
            if _count(value, f"{prefix}{name} of layer {i}") != expected[name]:
                raise _BadFileError(f"{prefix}{name} of layer {i} is {value}, but its stream has seen {seen} tokens")
        spec.update({f"{prefix}layers.{i}.{name}": shape_dtype for name, shape_dtype in own.items()})
    return spec


def _state_spec(
    config: SonettConfig,
    windows: dict[int, int | None],
    scalars: list[dict[str, object]],
    cohorts: list[dict[str, object]] | None,
    tensors: dict[str, torch.Tensor],
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every tensor a memory file with these counters must hold, with its shape and dtype."""
    layers = len(config.layer_types)
    firsts = [t for n, t in sorted(tensors.items()) if not n.startswith("hourglass.cohorts.") and t.dim() > 0]
    batch = firsts[0].shape[0] if firsts else 0
    span = config.hierarchy_span()
    outside = [i for i in range(layers) if i not in span]
    spec = _stream_spec("", config, windows, scalars, tensors, batch, outside)
    if config.hierarchy_settings is not None:
        k, hidden = config.hierarchy_settings.shorten_factor, config.hidden_size
        if cohorts or "hourglass.buffer" in tensors:
            spec["hourglass.buffer"] = ((batch, k - 1, hidden), None)
            spec["hourglass.last_coarse"] = ((batch, k, hidden), None)
        taken: set[int] = set()
        for c, cohort in enumerate(cohorts or []):
            prefix = f"hourglass.cohorts.{c}."
            if not isinstance(cohort, dict) or set(cohort) != {"length", "layers"}:
                raise _BadFileError(f"hourglass cohort {c} is {cohort!r}; expected {{'length': n, 'layers': [...]}}")
            length = _count(cohort["length"], f"length of hourglass cohort {c}")
            rows, padding = tensors.get(prefix + "rows"), tensors.get(prefix + "padding")
            if rows is None or padding is None or rows.dim() != 1 or rows.dtype != torch.int64:
                raise _BadFileError(f"hourglass cohort {c} has no 1-D int64 rows and padding tensors")
            members = rows.tolist()
            if any(not 0 <= r < batch or r in taken for r in members) or len(set(members)) != len(members):
                raise _BadFileError(f"hourglass cohort {c} has rows {members}: not distinct rows of a batch of {batch}")
            taken.update(members)
            well_formed = padding.shape == rows.shape and padding.dtype == torch.int64
            if well_formed and bool(((padding < 0) | (padding > length)).any()):
                raise _BadFileError(f"hourglass cohort {c} has padding outside [0, {length}]")
            spec[prefix + "rows"] = ((len(members),), torch.int64)
            spec[prefix + "padding"] = ((len(members),), torch.int64)
            own = _parse_scalars(cohort["layers"], layers, f"the counters of hourglass cohort {c}")
            spec.update(_stream_spec(prefix, config, windows, own, tensors, len(members), span, seen=length))
    visible = tensors.get("images.visible")
    if visible is not None and visible.dim() == 2 and config.cross_attention_layers:
        images = visible.shape[1]
        spec["images.visible"] = ((batch, images), torch.bool)
        for i in config.cross_attention_layers:
            for name in ("keys", "values"):
                spec[f"images.{i}.{name}"] = ((batch, config.num_key_value_heads, images, config.head_dim), None)
    return spec


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    spec: dict[str, tuple[tuple[int, ...], torch.dtype | None]],
    dtype: torch.dtype | None,
) -> None:
    """Names, shapes, dtypes and values of the tensors against `spec`; `dtype` is the model's (None: any float dtype
    that all compute-dtype tensors share)."""
    missing, extra = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
    if missing or extra:
        raise _BadFileError(
            "its tensors do not match this model's state"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unexpected: {', '.join(extra)}" if extra else "")
        )
    for name in sorted(spec):
        shape, want = spec[name]
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise _BadFileError(f"tensor {name} has shape {tuple(tensor.shape)}; this model's state needs {shape}")
        if want is None:
            if dtype is None and tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                dtype = tensor.dtype
            if dtype is None:
                raise _BadFileError(f"tensor {name} has dtype {tensor.dtype}; this model's state needs a float dtype")
            want = dtype
        if tensor.dtype != want:
            raise _BadFileError(f"tensor {name} has dtype {tensor.dtype}; this model's state needs {want}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _BadFileError(f"tensor {name} holds NaN or infinite values")


class SonettCache(Cache):
    """Decoding state of every Sonett layer.

    Built from the config: `SonettCache(config)`. The model creates one itself when `use_cache=True` and no
    cache is passed (with windows trimmed to its learned attention spans); `generate()` then carries it from
    step to step through `outputs.cache`.

    Args:
        config: the model config.
        layer_windows: optional per-layer window lengths for windowed layers (default `config.sliding_window`).
        with_hourglass: hold a `SonettHourglassState` when the config has a hierarchy (False for the caches of the
            shortened layers inside it).
    """

    def __init__(
        self, config: SonettConfig, layer_windows: dict[int, int] | None = None, with_hourglass: bool = True
    ) -> None:
        text_config = config.get_text_config(decoder=True)
        self.layer_types = list(text_config.layer_types)
        self.fingerprint = state_fingerprint(text_config)
        windows = {i: text_config.sliding_window for i in range(len(self.layer_types))}
        windows.update(layer_windows or {})
        self.layer_windows = windows
        layers = [self._build_layer(text_config, kind, windows[i]) for i, kind in enumerate(self.layer_types)]
        super().__init__(layers=layers)
        self.hourglass = (
            SonettHourglassState(text_config, windows)
            if with_hourglass and getattr(text_config, "hierarchy_settings", None)
            else None
        )
        # Image keys/values of each cross-attention block `(batch, kv_heads, image tokens, head_dim)`, computed once
        # per image, and which image tokens are real `(batch, image tokens)` (False for padding images).
        self.image_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.image_visible: torch.Tensor | None = None

    def _build_layer(self, config: SonettConfig, kind: str, window: int | None) -> CacheLayerMixin:
        return CACHE_LAYER_CLASSES[kind](config, window)

    def check_room(self, new_tokens: int) -> None:
        """Raise a ValueError when `new_tokens` more tokens do not fit (a dynamic cache always has room)."""

    def _select_rows(self, indices: torch.Tensor) -> None:
        """Row `indices[i]` becomes row i in the hourglass and image state (the layers select their own)."""
        if self.hourglass is not None:
            self.hourglass.select_rows(indices)
        self.image_states = {
            i: (keys[indices.to(keys.device)], values[indices.to(values.device)])
            for i, (keys, values) in self.image_states.items()
        }
        if self.image_visible is not None:
            self.image_visible = self.image_visible[indices.to(self.image_visible.device)]

    def _batch_rows(self) -> torch.Tensor | None:
        for tensor in (self.image_visible, self.hourglass.buffer if self.hourglass is not None else None):
            if tensor is not None:
                return torch.arange(tensor.shape[0], device=tensor.device)
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        rows = self._batch_rows()
        if rows is not None:
            self._select_rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self._select_rows(indices)

    def reset(self) -> None:
        super().reset()
        if self.hourglass is not None:
            self.hourglass.reset()
        self.image_states, self.image_visible = {}, None

    def crop(self, tokens_to_remove: int) -> None:
        if self.hourglass is not None and tokens_to_remove != 0:
            raise ValueError(
                "A hierarchy (hourglass) state cannot be rolled back (cropped): its shortened layers have already "
                "consumed the removed tokens. Assisted decoding is not supported with a hierarchy."
            )
        super().crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return self.hourglass is None and super().is_croppable

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor, named `layers.{i}.{name}` and `hourglass.{name}`."""
        tensors = {
            f"layers.{i}.{name}": tensor
            for i, layer in enumerate(self.layers)
            for name, tensor in layer.state_tensors().items()
        }
        if self.hourglass is not None:
            tensors.update({f"hourglass.{k}": v for k, v in self.hourglass.state_tensors().items()})
        for i, (keys, values) in self.image_states.items():
            tensors[f"images.{i}.keys"], tensors[f"images.{i}.values"] = keys, values
        if self.image_visible is not None:
            tensors["images.visible"] = self.image_visible
        return tensors

    def state_scalars(self) -> list[dict[str, int]]:
        """The per-layer counters that are not tensors."""
        return [layer.state_scalars() for layer in self.layers]

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: list[dict[str, int]]) -> None:
        """Fill this (fresh) cache from `state_tensors()` / `state_scalars()` of a cache of the same config."""
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            layer.load_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, scalars[i])
        self.image_visible = tensors.get("images.visible")
        self.image_states = {
            int(name.split(".")[1]): (tensors[name], tensors[name.replace(".keys", ".values")])
            for name in tensors
            if name.startswith("images.") and name.endswith(".keys")
        }

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (every Sonett cache layer counts them, whatever its kind)."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def cached_batch_size(self) -> int | None:
        """Batch size of the stored state, or None while the cache is still empty."""
        for layer in self.layers:
            for tensor in layer.state_tensors().values():
                return tensor.shape[0]
        rows = self._batch_rows()
        return None if rows is None else len(rows)

    def nbytes(self) -> int:
        """Bytes held by all cached tensors (the shortened layers' state included)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def save(self, path: str | Path, model: torch.nn.Module | None = None) -> None:
        """Write the whole decoding state to a safetensors file (no pickle), atomically and durably.

        Args:
            path: the memory file; replaced as a whole. The state is written to a uniquely named temporary file
                beside it (mode 0600: it holds the conversation), fsynced, renamed over `path`, and the folder is
                fsynced, as checkpoints are. Two processes saving the same path never disturb each other: the
                last complete write wins.
            model: the model whose weights made this state; its `weights_sha256` goes into the file, so that `load`
                can refuse the file for other weights. Without it the file records no weights and `load(...,
                model=...)` refuses it unless `allow_other_weights=True`.

        The metadata holds the config fingerprint, per-layer windows and counters, the weights hash and a sha256
        `checksum` over all of it and every tensor (`state_checksum`).
        """
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_tensors().items()}
        metadata = {
            "format": CACHE_FILE_FORMAT,
            "version": CACHE_FILE_VERSION,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "layer_windows": json.dumps({str(i): w for i, w in self.layer_windows.items()}),
            "scalars": json.dumps(self.state_scalars()),
            "weights": weights_sha256(model) if model is not None else "",
        }
        if self.hourglass is not None:
            metadata["hourglass_scalars"] = json.dumps(self.hourglass.state_scalars())
        metadata["checksum"] = state_checksum(tensors, metadata)
        path = Path(path)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, temporary, metadata=metadata)
            fsync_path(Path(temporary))
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        fsync_path(path.parent)

    @classmethod
    def load(
        cls,
        path: str | Path,
        config: SonettConfig,
        device: torch.device | str = "cpu",
        *,
        model: torch.nn.Module | None = None,
        allow_other_weights: bool = False,
    ) -> SonettCache:
        """Read a memory file written by `save`, checking everything in it before any of it is used.

        In order: it must be a readable safetensors file of this format and version; its checksum must match its
        tensors and metadata (a damaged or edited file fails here); its config fingerprint must match `config`; with
        `model`, the weights hash must match `weights_sha256(model)` (unless `allow_other_weights`); and every tensor
        must have the name, shape and dtype this config's state needs (the model's dtype with `model`), finite
        values, and counters that agree with each other. Any failure raises a `MemoryFileError` (a ValueError) that
        names the file, the problem and the fix; a missing file raises FileNotFoundError.

        The checksum and the weights hash are not a signature: they catch damage, hand edits and mix-ups, but whoever
        edits a file on purpose can recompute both. Such a file still passes only with the names, shapes, dtypes and
        finite values above, so it cannot run code or crash the load, but its state can be anything (finite values
        so large that the next forward gives NaN): load memory files only from sources you trust with the answers.

        Args:
            path: the memory file.
            config: the model's config.
            device: where the loaded tensors go.
            model: the model that will continue from this state; without it the weights are not checked.
            allow_other_weights: accept a file made with other weights (or saved without `model=`), on purpose.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No memory file at {path}.")

        def refuse(problem: str, fix: str = START_AGAIN) -> MemoryFileError:
            return MemoryFileError(f"The memory file {path} {problem}; {fix}")

        try:
            # One open handle: safe_open would open the path again per tensor, and a save by another process that
            # replaces the file in between would mix two versions. The header is read and checked first, so that
            # another kind of file (a multi-GB model.safetensors given by mistake) is refused before its data is read.
            with open(path, "rb") as handle:
                head = handle.read(8)
                header_bytes = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < header_bytes <= MAX_MEMORY_HEADER_BYTES:
                    raise ValueError(f"a safetensors header of {header_bytes:,} bytes")
                header = handle.read(header_bytes)
                metadata = json.loads(header).get("__metadata__") or {}
                if not isinstance(metadata, dict):
                    raise ValueError("its __metadata__ is not an object")
                if metadata.get("format") != CACHE_FILE_FORMAT:
                    raise refuse(
                        f"is not a Sonett memory file (no '{CACHE_FILE_FORMAT}' header)",
                        "load a file that SonettCache.save or Conversation.save wrote, or " + START_AGAIN,
                    )
                if metadata.get("version") != CACHE_FILE_VERSION:
                    raise refuse(
                        f"has memory-file version {metadata.get('version')!r}, but this Sonett reads version "
                        f"{CACHE_FILE_VERSION} (version 1 files, from before checksums and weights hashes, cannot be "
                        "checked)",
                        "its state cannot be converted: " + START_AGAIN,
                    )
                data = head + header + handle.read()
            tensors = load_safetensors(data)  # validates the header and the data offsets
        except MemoryFileError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, AttributeError) as error:
            raise refuse(f"is truncated or corrupt ({error}), so it cannot be loaded") from error
        checksum = metadata.get("checksum")
        if not isinstance(checksum, str) or not hmac.compare_digest(checksum, state_checksum(tensors, metadata)):
            raise refuse(
                "fails its sha256 checksum: its tensors or metadata changed after it was written (damaged or "
                "edited), so its state cannot be trusted"
            )
        text_config = config.get_text_config(decoder=True)
        try:
            saved = _json_field(metadata, "fingerprint", dict)
            expected = state_fingerprint(text_config)
            differing = [name for name in STATE_FIELDS if saved.get(name) != expected.get(name)]
            if differing:
                details = "; ".join(f"{n}: file {saved.get(n)!r} vs model {expected.get(n)!r}" for n in differing)
                raise refuse(
                    f"was written by a model with another config ({details})",
                    "load it with the model that wrote it, or start a new conversation (a fresh cache) with this "
                    "model.",
                )
            keys = set(CACHE_FILE_KEYS) | (
                {"hourglass_scalars"} if getattr(text_config, "hierarchy_settings", None) else set()
            )
            if set(metadata) != keys:
                raise _BadFileError(
                    f"its metadata has keys {sorted(metadata)}; a memory file for this config has {sorted(keys)}"
                )
            weights = metadata["weights"]
            if weights and (len(weights) != 64 or set(weights) - set("0123456789abcdef")):
                raise _BadFileError(f"its weights hash {weights!r} is not a sha256 hex digest (or empty)")
            if model is not None and not allow_other_weights and weights != weights_sha256(model):
                if weights:
                    problem = (
                        f"was made with other weights (sha256 {weights[:12]}... in the file, "
                        f"{weights_sha256(model)[:12]}... for this model; the same weights in another dtype "
                        "count as other weights)"
                    )
                else:
                    problem = "records no weights hash (it was saved with cache.save(path) without model=)"
                raise refuse(
                    problem,
                    "load it with the model that made it, or start a new conversation; if you know the state fits "
                    "this model, pass allow_other_weights=True (`sonett chat --memory_from_other_model`). Save "
                    "with cache.save(path, model=model) (Conversation.save does) to record the weights.",
                )
            kinds = list(text_config.layer_types)
            windows = _parse_windows(metadata, text_config, kinds)
            scalars = _parse_scalars(_json_field(metadata, "scalars", list), len(kinds), "metadata 'scalars'")
            cohorts = _json_field(metadata, "hourglass_scalars", list) if "hourglass_scalars" in metadata else None
            spec = _state_spec(text_config, windows, scalars, cohorts, tensors)
            _check_tensors(tensors, spec, model.dtype if model is not None else None)
        except _BadFileError as error:
            raise refuse(f"is malformed: {error}") from None
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        cache = cls(config, layer_windows=windows)
        cache.load_state(tensors, scalars)
        if cache.hourglass is not None:
            own = {k[len("hourglass.") :]: v for k, v in tensors.items() if k.startswith("hourglass.")}
            cache.hourglass.load_state(own, cohorts or [])
        return cache


class SonettStaticCache(SonettCache):
    """A `SonettCache` whose every state tensor keeps its shape and address from step to step, for compiled decoding.

    `full_attention` layers preallocate `max_cache_len` positions (transformers' `StaticLayer`); windowed layers keep
    a fixed buffer of window - 1 slots; `linear_attention` and the memory of `memory_attention` layers are fixed-size
    anyway and are written in place. Tensors are allocated at the batch size on first use. Greedy decoding gives the
    same tokens as the dynamic `SonettCache`. Selected by `generate(..., cache_implementation="static")` or built with
    `model.make_cache("static", max_cache_len=...)`.

    Image keys/values (cross-attention) are computed once from the prompt and kept as they are. Not supported: a
    `hierarchy` (its shortened streams advance row by row, in groups that differ between rows); use the dynamic
    cache there. A static cache is not written to a memory file: save a dynamic cache instead.

    Args:
        config: the model config.
        max_cache_len: tokens the `full_attention` layers can hold (prompt + new tokens); only needed with such layers.
        layer_windows: per-layer window lengths of windowed layers, as in `SonettCache`.
    """

    def __init__(
        self, config: SonettConfig, max_cache_len: int | None = None, layer_windows: dict[int, int] | None = None
    ) -> None:
        text_config = config.get_text_config(decoder=True)
        if getattr(text_config, "hierarchy_settings", None):
            raise ValueError(
                "A static cache does not support a config with a hierarchy: its shortened streams change shape from "
                "step to step, row by row. Use the dynamic cache (generate without cache_implementation, or "
                "model.make_cache())."
            )
        if "full_attention" in text_config.layer_types and (max_cache_len is None or max_cache_len < 1):
            raise ValueError(
                "A static cache for a model with full_attention layers needs max_cache_len (prompt + new tokens), "
                f"got {max_cache_len!r}."
            )
        self.max_cache_len = max_cache_len
        super().__init__(config, layer_windows=layer_windows, with_hourglass=False)

    def _build_layer(self, config: SonettConfig, kind: str, window: int | None) -> CacheLayerMixin:
        return STATIC_CACHE_LAYER_CLASSES[kind](config, window, self.max_cache_len)

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor | int:
        """Tokens seen so far: a 0-d tensor once filled (read it with `int()` outside compiled code), else 0."""
        return super().get_seq_length(layer_idx)

    def check_room(self, new_tokens: int) -> None:
        """Raise a ValueError when the full_attention layers cannot take `new_tokens` more tokens."""
        if "full_attention" not in self.layer_types:
            return
        seen = int(self.get_seq_length())
        if seen + new_tokens > self.max_cache_len:
            raise ValueError(
                f"The static cache holds at most {self.max_cache_len} tokens, but {seen} are cached and {new_tokens} "
                "more were given; build it with a larger max_cache_len (generate sizes it to max_length)."
            )

    def save(self, path: str | Path, model: torch.nn.Module | None = None) -> None:
        raise ValueError(
            "A static cache (SonettStaticCache) holds preallocated buffers for compiled decoding and is not saved to a "
            "memory file; keep the conversation in a dynamic cache (model.make_cache()) to save it."
        )

    @classmethod
    def load(cls, path: str | Path, config: SonettConfig, device: torch.device | str = "cpu", **kwargs) -> SonettCache:
        raise ValueError(
            "A memory file loads into a dynamic cache: use SonettCache.load(path, config); a static cache cannot be "
            "loaded from a file."
        )


__all__ = [
    "CACHE_LAYER_CLASSES",
    "STATIC_CACHE_LAYER_CLASSES",
    "SUPPORTED_CACHE_IMPLEMENTATIONS",
    "MemoryFileError",
    "SonettCache",
    "SonettFullAttentionLayer",
    "SonettHourglassState",
    "SonettLinearAttentionLayer",
    "SonettMemoryLayer",
    "SonettSlidingWindowLayer",
    "SonettStaticCache",
    "SonettStaticFullAttentionLayer",
    "SonettStaticLinearAttentionLayer",
    "SonettStaticMemoryLayer",
    "SonettStaticSlidingWindowLayer",
    "state_checksum",
    "weights_sha256",
]

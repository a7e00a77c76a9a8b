"""Sliding-window attention plus a compressive memory for the `memory_attention` layer kind.

Infini-attention (Munkhdalai et al. 2024, "Leave No Context Behind"), exact at token granularity. Each layer
mixes, per query head, two reads with a learned gate g = sigmoid(gate) (initialised to 0, so g = 0.5):

- local: causal softmax attention over the last `sliding_window` (W) tokens, itself included, with RoPE and
  grouped KV heads, through transformers' attention interface, exactly as a `sliding_attention` layer;
- memory: a linear-attention memory per KV head, M `(batch, kv_heads, head_dim, head_dim)` and normaliser
  z `(batch, kv_heads, head_dim)` in fp32, holding every token that has left the window: the query at t reads
  the tokens j <= t - W. Keys and queries enter before RoPE, through sigma(x) = elu(x) + 1.

  - `linear` update: M += sigma(k)^T v, z += sigma(k); read sigma(q) M / (sigma(q) . z + eps).
  - `delta` update (DeltaNet): k^ = sigma(k) / |sigma(k)|, M += k^^T (v - k^ M); read q^ M with
    q^ = sigma(q) / |sigma(q)|. z is accumulated as in `linear` but not read.

"Query t reads j <= t - W" is ordinary causal (inclusive) linear attention over the key/value sequence
delayed by W positions, so training and prefill run it chunkwise (`chunked_memory_attention`), and decoding is
the same computation on a short sequence: the stored window plus the new tokens, delayed by W minus the
window length, starting from the stored memory. Left padding never enters the memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache

from .attention_sonett import SonettAttention
from .cache_sonett import SonettMemoryLayer, SonettStaticMemoryLayer
from .configuration_sonett import SonettConfig
from .layers_sonett import PackedDocuments, apply_rotary_pos_emb

# Added to the linear readout's denominator; the readout is 0 while the memory is empty.
MEMORY_EPS = 1e-6
# Floor of the norms in the delta rule's normalisation (only zero rows, i.e. padding or empty slots, reach it).
NORM_FLOOR = 1e-12


class MemoryAttentionMask(NamedTuple):
    """What `SonettMemoryAttention.build_mask` hands the model, which passes it on unopened.

    local: the mask of the local attention, exactly as a `sliding_attention` layer gets it (4-D, a BlockMask, a
        `BlockedLocalMask` for a long unpadded prefill, or None).
    padding: the 2-D padding mask `(batch, cached + new tokens)`, True for real tokens; None when the caller gave
        no 2-D mask (then every token is real).
    documents: the `PackedDocuments` of packed rows (then `local` is block-diagonal and each document's memory
        starts empty), or None.
    """

    local: torch.Tensor | None
    padding: torch.Tensor | None
    documents: PackedDocuments | None = None


def memory_feature_map(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = elu(x) + 1, elementwise and positive; any shape."""
    return F.elu(x) + 1.0


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of `(..., d)` scaled to unit L2 norm; zero rows stay zero."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def chunked_memory_attention(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    values: torch.Tensor,
    memory: torch.Tensor,
    normalizer: torch.Tensor,
    update: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal, inclusive linear attention from a starting state, in chunks; all fp32.

    Position i reads the state after folding keys 0..i (on top of `memory`). A zero key row is a no-op for both
    update rules, so padding and empty slots are zero rows.

    Args:
        query_features: sigma(q) `(batch, kv_heads, groups, n, d)`; the `groups` query heads share a KV head.
        key_features: sigma(k) `(batch, kv_heads, n, d)`, zero rows for tokens that must not enter the memory.
        values: `(batch, kv_heads, n, d_v)`.
        memory: M `(batch, kv_heads, d, d_v)` before position 0.
        normalizer: z `(batch, kv_heads, d)` before position 0.
        update: `linear` or `delta`.
        chunk_size: positions per chunk (the last chunk may be shorter).

    Returns:
        The readout `(batch, kv_heads, groups, n, d_v)` and the state (M, z) after position n - 1.
    """
    delta = update == "delta"
    if delta:
        query_features = _unit_rows(query_features)
        unit_keys = _unit_rows(key_features)
    outputs = []
    n = key_features.shape[-2]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        q = query_features[..., start:end, :]  # (b, h, g, c, d)
        k = key_features[:, :, start:end]  # (b, h, c, d)
        v = values[:, :, start:end]  # (b, h, c, d_v)
        if delta:
            k = unit_keys[:, :, start:end]
        # Intra-chunk scores, inclusive causal: (b, h, g, c, c).
        scores = (q @ k[:, :, None].transpose(-1, -2)).tril()
        if not delta:
            numerator = q @ memory[:, :, None] + scores @ v[:, :, None]
            denominator = q @ normalizer[:, :, None, :, None] + scores.sum(-1, keepdim=True)
            outputs.append(numerator / (denominator + MEMORY_EPS))
            memory = memory + k.transpose(-1, -2) @ v
        else:
            # WY form: U - W M = (I + tril(K K^T, -1))^-1 (V - K M) are the residuals each key writes.
            size = end - start
            eye = torch.eye(size, dtype=k.dtype, device=k.device)
            lower = eye + (k @ k.transpose(-1, -2)).tril(-1)
            residual = torch.linalg.solve_triangular(lower, v - k @ memory, upper=False, unitriangular=True)
            outputs.append(q @ memory[:, :, None] + scores @ residual[:, :, None])
            memory = memory + k.transpose(-1, -2) @ residual
        normalizer = normalizer + key_features[:, :, start:end].sum(-2)
    return torch.cat(outputs, dim=-2), memory, normalizer


def memory_read(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    delay: int,
    update: str,
    chunk_size: int,
    memory: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Memory readout of L new queries over an entry sequence E delayed by `delay`, and the state afterwards.

    E is the P stored window tokens followed by the L new ones (P + L entries). Query i reads the memory plus
    E[j] for j <= i - delay (delay = W - P >= 1); afterwards the memory holds E[0 .. L - delay], the entries that
    leave the window, so that the last W - 1 tokens remain in the window. Without a cache, P = 0 and delay = W.

    Args:
        queries: raw (pre-RoPE) queries `(batch, heads, L, d)`.
        keys: raw (pre-RoPE) keys of E `(batch, kv_heads, P + L, d)`.
        values: values of E `(batch, kv_heads, P + L, d_v)`.
        delay: the delay, >= 1.
        update: `linear` or `delta`.
        chunk_size: chunk length of the chunked form.
        memory / normalizer: the state `(batch, kv_heads, d, d_v)` / `(batch, kv_heads, d)` before this step;
            None for an empty memory.
        key_mask: `(batch, P + L)`, False for padding, which never enters the memory; None when all are real.

    Returns:
        The readout `(batch, heads, L, d_v)` and the new (memory, normalizer), all fp32.
    """
    if delay < 1:
        raise ValueError(f"memory_read: delay must be >= 1, got {delay}.")
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    key_features = memory_feature_map(keys.float())
    if key_mask is not None:
        key_features = key_features * key_mask[:, None, :, None].to(device=keys.device, dtype=torch.float32)
    values = values.float()
    if memory is None:
        memory = key_features.new_zeros(batch, kv_heads, dim, values.shape[-1])
        normalizer = key_features.new_zeros(batch, kv_heads, dim)

    # Delayed sequence of length L + 1: D[i] = E[i - delay] (zero rows before the start); position L carries a
    # zero query and only folds the one extra entry E[L - delay] that leaves the window.
    lead = min(delay, length + 1)

    def delayed(x: torch.Tensor) -> torch.Tensor:
        zeros = x.new_zeros(batch, kv_heads, lead, x.shape[-1])
        return torch.cat([zeros, x[:, :, : length + 1 - lead]], dim=-2)

    query_features = memory_feature_map(queries.float()).reshape(batch, kv_heads, groups, length, dim)
    query_features = torch.cat([query_features, query_features.new_zeros(batch, kv_heads, groups, 1, dim)], dim=-2)
    output, memory, normalizer = chunked_memory_attention(
        query_features, delayed(key_features), delayed(values), memory, normalizer, update, chunk_size
    )
    return output[..., :length, :].reshape(batch, heads, length, -1), memory, normalizer


class SonettMemoryAttention(SonettAttention):
    """Sliding-window softmax attention plus a compressive memory of the tokens that left the window.

    Projections `q_proj, k_proj, v_proj, o_proj` as in `SonettAttention`; `gate` `(heads,)` mixes the two reads:
    output = g * memory + (1 - g) * local per query head, g = sigmoid(gate).
    """

    def __init__(self, config: SonettConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.sliding_window = config.sliding_window
        self.memory_update = config.memory_update
        self.memory_chunk_size = config.memory_chunk_size
        self.gate = nn.Parameter(torch.zeros(config.num_attention_heads))

    @staticmethod
    def build_mask(
        kind: str, allow_blocked: bool = True, documents: PackedDocuments | None = None, **mask_kwargs
    ) -> MemoryAttentionMask:
        """The local mask of a `sliding_attention` layer and the 2-D padding mask (for the memory) of this step.

        `allow_blocked` and `documents` as in `SonettAttention.build_mask` (blocked: False when attention weights
        were requested; documents: the packed documents, which the memory keeps apart).
        """
        attention_mask = mask_kwargs.get("attention_mask")
        padding = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        local = SonettAttention.build_mask(
            "sliding_attention", allow_blocked=allow_blocked, documents=documents, **mask_kwargs
        )
        return MemoryAttentionMask(local=local, padding=padding, documents=documents)

    def _cache_layer(self, cache: Cache) -> SonettMemoryLayer:
        layer = cache.layers[self.layer_idx]
        if not isinstance(layer, (SonettMemoryLayer, SonettStaticMemoryLayer)):
            raise TypeError(
                f"memory_attention layer {self.layer_idx} needs a SonettMemoryLayer in the cache, got "
                f"{type(layer).__name__}; pass a SonettCache built from this model's config (or none)."
            )
        return layer

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: MemoryAttentionMask | torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local window attention and the memory read, gated per head.

        Args:
            hidden_states: `(batch, L, hidden_size)`, the normed residual stream.
            position_embeddings: RoPE `(cos, sin)`, each `(batch, L, head_dim)`.
            attention_mask: the `MemoryAttentionMask` from `build_mask` (a bare local mask is accepted too, and then
                every token counts as real).
            cache: a `SonettCache`; this layer's window and memory are read and updated.

        Returns:
            The output `(batch, L, hidden_size)` and the local attention probabilities (eager only, else None).
        """
        if isinstance(attention_mask, MemoryAttentionMask):
            local_mask, padding, documents = attention_mask
        else:
            local_mask, padding, documents = attention_mask, None, None
        input_shape = hidden_states.shape[:-1]
        length = input_shape[1]
        raw_query, raw_key, value = self.project(hidden_states)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(raw_query, raw_key, cos, sin)
        memory = normalizer = None
        entry_keys, entry_values = raw_key, value
        if cache is not None:
            layer = self._cache_layer(cache)
            past_keys, past_values, memory, normalizer = layer.memory_inputs()
            key_mask = layer.entry_mask(padding, length)  # before the update, which moves the window
            if past_keys is not None:
                entry_keys = torch.cat([past_keys, raw_key], dim=-2)
                entry_values = torch.cat([past_values, value], dim=-2)
            key, local_value = cache.update(key, value, self.layer_idx, raw_key_states=raw_key)
        else:
            local_value = value
            key_mask = padding[:, -length:] if padding is not None else None

        # Memory part: E = stored window + new tokens, delayed by W - P.
        stored = entry_keys.shape[-2] - length
        if documents is not None:
            if cache is not None:  # the model runs packed rows without a cache; a direct call must too
                raise ValueError("Packed sequences cannot be run with a cache (it would mix the documents).")
            memory_output = self._packed_memory_read(raw_query, raw_key, value, documents)
        else:
            memory_output, memory, normalizer = memory_read(
                raw_query,
                entry_keys,
                entry_values,
                delay=self.sliding_window - stored,
                update=self.memory_update,
                chunk_size=self.memory_chunk_size,
                memory=memory,
                normalizer=normalizer,
                key_mask=key_mask,
            )
        if cache is not None:
            layer.set_memory(memory, normalizer)

        # Local part, exactly as a sliding_attention layer.
        local_output, weights = self.attend(query, key, local_value, local_mask, **kwargs)

        # Mix per query head: (batch, L, heads, head_dim).
        gate = torch.sigmoid(self.gate).to(local_output.dtype)[:, None]
        memory_output = memory_output.transpose(1, 2).to(local_output.dtype)
        output = gate * memory_output + (1 - gate) * local_output
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights

    def _packed_memory_read(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, documents: PackedDocuments
    ) -> torch.Tensor:
        """The memory readout of packed rows: each document on its own, from an empty memory.

        queries `(batch, heads, L, d)`, keys `(batch, kv_heads, L, d)`, values `(batch, kv_heads, L, d_v)`, all raw
        (pre-RoPE). Returns `(batch, heads, L, d_v)` in fp32.
        """
        rows = []
        for row in range(queries.shape[0]):
            lengths = documents.lengths(row)
            pieces = zip(*(x[row : row + 1].split(lengths, dim=-2) for x in (queries, keys, values)))
            outputs = [
                memory_read(q, k, v, self.sliding_window, self.memory_update, self.memory_chunk_size)[0]
                for q, k, v in pieces
            ]
            rows.append(torch.cat(outputs, dim=-2))
        return torch.cat(rows, dim=0)


__all__ = [
    "MemoryAttentionMask",
    "SonettMemoryAttention",
    "chunked_memory_attention",
    "memory_feature_map",
    "memory_read",
]

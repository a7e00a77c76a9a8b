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
delayed by W positions, so training and prefill run it chunkwise, and decoding is the same computation on a short
sequence: the stored window plus the new tokens, delayed by W minus the window length, starting from the stored
memory. Left padding never enters the memory.

Two implementations of that computation:

- `memory_read` (the one the layer runs): every chunk at once. The delayed sequence is one zero-padded copy per
  tensor; intra-chunk scores, per-chunk state contributions and (for `linear`) their prefix sum over chunks are
  single batched operations, and the normaliser rides along as a ones column of the values, so numerator and
  denominator come out of the same matmul. The `delta` update keeps a loop over chunks, one fused matmul-add per
  chunk on precomputed WY terms. Without gradients it runs in blocks of `PREFILL_BLOCK` tokens, so a long prompt
  never holds per-token features or scores for more than one block.
- `reference_memory_read` / `chunked_memory_attention`: the plain chunk-by-chunk loop, kept as the oracle that the
  tests compare the fast path with (docs/design.md, invariant 2).

A one-token decode step (`memory_decode_step`) reads sigma(q) M / (sigma(q) . z + eps) straight from the stored state
and folds the one entry leaving the window into (M, z) in place: no chunk machinery, no host synchronisation.
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


def reference_memory_read(
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
    """The pure-PyTorch oracle of `memory_read` (same arguments, shapes and results), chunk by chunk over the entry
    sequence delayed by `delay` (`chunked_memory_attention`); used by the tests."""
    if delay < 1:
        raise ValueError(f"reference_memory_read: delay must be >= 1, got {delay}.")
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


# Query positions per block of a no-grad `memory_read` (a multiple of any chunk size up to 64): a long prefill holds
# the features and scores of one block at a time, never of the whole prompt.
PREFILL_BLOCK = 1024


def _chunk_rows(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`(..., n, f)` with n a multiple of `chunk_size` -> `(..., n / chunk_size, chunk_size, f)` (a view)."""
    return x.unflatten(-2, (x.shape[-2] // chunk_size, chunk_size))


def _intra_chunk_scores(queries: torch.Tensor, keys: torch.Tensor, groups: int) -> torch.Tensor:
    """Inclusive causal scores inside each chunk.

    queries `(b, h, N, groups * C, d)` (the rows of a chunk are the C positions of each query head in turn), keys
    `(b, h, N, C, d)`. Returns `(b, h, N, groups * C, C)`, zero above the diagonal of each head's C x C block.
    """
    scores = queries @ keys.transpose(-1, -2)
    return scores.unflatten(-2, (groups, keys.shape[-2])).tril().flatten(-3, -2)


def _linear_chunks(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear` update over all chunks at once (no decay, so the state before chunk c is a prefix sum).

    Args:
        queries: sigma(q) `(b, h, N, groups * C, d)`.
        keys: delayed sigma(k) `(b, h, N, C, d)`, zero rows where nothing enters.
        values: delayed values with a ones column appended `(b, h, N, C, d_v + 1)`.
        state: [M | z] `(b, h, d, d_v + 1)` before chunk 0.

    Returns:
        [numerator | denominator] `(b, h, N, groups * C, d_v + 1)` and [M | z] after the last chunk.
    """
    contributions = keys.transpose(-1, -2) @ values  # (b, h, N, d, d_v + 1)
    totals = contributions.cumsum(dim=2)
    before = torch.cat([state[:, :, None], state[:, :, None] + totals[:, :, :-1]], dim=2)
    scores = _intra_chunk_scores(queries, keys, groups)
    return queries @ before + scores @ values, state + totals[:, :, -1]


def _delta_chunks(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, memory: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta` update: the WY terms of every chunk at once, then one matmul-add per chunk for the state.

    With T = (I + tril(K K^T, -1))^-1, U = T V and W = T K, the residuals a chunk writes are U - W M, so its readout
    is A U + (Q - A W) M (A the intra-chunk scores) and the state after it M + K^T U - (K^T W) M.

    Args:
        queries: unit sigma(q) `(b, h, N, groups * C, d)`.
        keys: delayed unit sigma(k) `(b, h, N, C, d)`, zero rows where nothing enters.
        values: delayed values `(b, h, N, C, d_v)`.
        memory: M `(b, h, d, d_v)` before chunk 0.

    Returns:
        The readout `(b, h, N, groups * C, d_v)` and M after the last chunk.
    """
    size, value_dim = keys.shape[-2], values.shape[-1]
    eye = torch.eye(size, dtype=keys.dtype, device=keys.device)
    lower = eye + (keys @ keys.transpose(-1, -2)).tril(-1)
    solved = torch.linalg.solve_triangular(lower, torch.cat([values, keys], dim=-1), upper=False, unitriangular=True)
    # [U | W] in one solve; A [U | W] and K^T [U | W] in one matmul each.
    scores = _intra_chunk_scores(queries, keys, groups)
    scored = scores @ solved  # (b, h, N, groups * C, d_v + d)
    local, query_weights = scored[..., :value_dim], queries - scored[..., value_dim:]
    folded = keys.transpose(-1, -2) @ solved  # (b, h, N, d, d_v + d)
    states = []
    # unbind: one backward node for all chunks (indexing chunk by chunk would zero-fill a full gradient per chunk)
    for writes, erases in zip(folded[..., :value_dim].unbind(2), folded[..., value_dim:].unbind(2), strict=True):
        states.append(memory)
        memory = memory + writes - erases @ memory
    return local + query_weights @ torch.stack(states, dim=2), memory


def _fold_entry(
    memory: torch.Tensor, normalizer: torch.Tensor, key_features: torch.Tensor, values: torch.Tensor, update: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one entry per (batch, KV head) into the state, out of place.

    memory `(b, h, d, d_v)`, normalizer `(b, h, d)`, key_features sigma(k) `(b, h, d)` (zero for padding), values
    `(b, h, d_v)`. Returns the new (memory, normalizer).
    """
    if update == "delta":
        unit_key = _unit_rows(key_features)
        values = values - (unit_key[..., None, :] @ memory)[..., 0, :]
        key_features, normalizer = unit_key, normalizer + key_features
    else:
        normalizer = normalizer + key_features
    return memory + key_features[..., :, None] * values[..., None, :], normalizer


def _memory_read_block(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor | None,
    start: int,
    end: int,
    delay: int,
    update: str,
    chunk_size: int,
    memory: torch.Tensor,
    normalizer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The readout of query positions [start, end) of `memory_read` and the state after folding E[.. end - delay).

    Arguments as in `memory_read` (memory / normalizer not None: the state after E[.. start - delay)). Returns the
    readout `(batch, heads, end - start, d_v)` in fp32 and the new (memory, normalizer).
    """
    batch, heads, _, dim = queries.shape
    kv_heads, value_dim = keys.shape[1], values.shape[-1]
    groups = heads // kv_heads
    length = end - start
    chunks = -(-length // chunk_size)
    # Delayed grid of this block: position i reads E[i - delay]; E[first:last] are the entries that are real here.
    first, last = max(start - delay, 0), max(end - delay, 0)
    front, back = length - (last - first), chunks * chunk_size - length
    key_features = memory_feature_map(keys[:, :, first:last].float())
    if key_mask is not None:
        key_features = key_features * key_mask[:, None, first:last, None].to(key_features)
    query_features = memory_feature_map(queries[:, :, start:end].float())
    delta = update == "delta"
    if delta:
        query_features, unit_keys = _unit_rows(query_features), _unit_rows(key_features)
    # (b, H, n, d) -> (b, h, N, groups * C, d): the rows of a chunk are its C positions of each grouped head in turn.
    if back:
        query_features = F.pad(query_features, (0, 0, 0, back))
    query_features = query_features.view(batch, kv_heads, groups, chunks, chunk_size, dim)
    query_features = query_features.transpose(2, 3).reshape(batch, kv_heads, chunks, groups * chunk_size, dim)
    values = values[:, :, first:last].float()
    if delta:
        keys_grid = _chunk_rows(F.pad(unit_keys, (0, 0, front, back)), chunk_size)
        values_grid = _chunk_rows(F.pad(values, (0, 0, front, back)), chunk_size)
        output, memory = _delta_chunks(query_features, keys_grid, values_grid, memory, groups)
        normalizer = normalizer + key_features.sum(-2)
    else:
        keys_grid = _chunk_rows(F.pad(key_features, (0, 0, front, back)), chunk_size)
        # The ones column makes the normaliser part of the state: [M | z], and [numerator | denominator] comes out.
        values_grid = _chunk_rows(F.pad(values, (0, 1, front, back), value=1.0), chunk_size)
        state = torch.cat([memory, normalizer[..., None]], dim=-1)
        output, state = _linear_chunks(query_features, keys_grid, values_grid, state, groups)
        output = output[..., :value_dim] / (output[..., value_dim:] + MEMORY_EPS)
        memory, normalizer = state[..., :value_dim], state[..., value_dim]
    # (b, h, N, groups * C, d_v) -> (b, H, n, d_v)
    output = output.view(batch, kv_heads, chunks, groups, chunk_size, value_dim).transpose(2, 3)
    output = output.reshape(batch, heads, chunks * chunk_size, value_dim)[:, :, :length]
    return output, memory, normalizer


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
    Equal to `reference_memory_read` within fp32 rounding (outputs and gradients), all chunks at once; without
    gradients in blocks of `PREFILL_BLOCK` query positions.

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
    kv_heads, value_dim = keys.shape[1], values.shape[-1]
    if memory is None:
        memory = queries.new_zeros(batch, kv_heads, dim, value_dim, dtype=torch.float32)
        normalizer = queries.new_zeros(batch, kv_heads, dim, dtype=torch.float32)
    if key_mask is not None:
        key_mask = key_mask.to(keys.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (queries, keys, values, memory, normalizer)
    )
    block = max(length, 1) if needs_grad else max(PREFILL_BLOCK // chunk_size, 1) * chunk_size
    outputs = None if length <= block else queries.new_empty(batch, heads, length, value_dim, dtype=torch.float32)
    for start in range(0, length, block):
        end = min(start + block, length)
        output, memory, normalizer = _memory_read_block(
            queries, keys, values, key_mask, start, end, delay, update, chunk_size, memory, normalizer
        )
        if outputs is None:
            outputs = output
        else:
            outputs[:, :, start:end] = output
    if outputs is None:  # no new queries
        outputs = queries.new_zeros(batch, heads, 0, value_dim, dtype=torch.float32)
    # The entry E[L - delay] leaves the window with the last query: fold it too.
    leaving = length - delay
    if leaving >= 0:
        key_features = memory_feature_map(keys[:, :, leaving].float())
        if key_mask is not None:
            key_features = key_features * key_mask[:, None, leaving, None].to(key_features)
        memory, normalizer = _fold_entry(memory, normalizer, key_features, values[:, :, leaving].float(), update)
    return outputs, memory.contiguous(), normalizer.contiguous()


def memory_decode_step(
    query: torch.Tensor,
    memory: torch.Tensor,
    normalizer: torch.Tensor,
    update: str,
    leaving: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One new token per row: read the stored memory, then fold the entry that leaves the window into it.

    The same result as `memory_read` with L = 1 (its query reads only the memory; the oldest window entry leaves
    with it once the window is full), without the chunked machinery: two small matmuls and one rank-1 update.

    Args:
        query: the raw (pre-RoPE) query `(batch, heads, d)`.
        memory / normalizer: M `(batch, kv_heads, d, d_v)` and z `(batch, kv_heads, d)`, fp32.
        update: `linear` or `delta`.
        leaving: (raw key `(batch, kv_heads, d)`, value `(batch, kv_heads, d_v)`, real `(batch,)` bool or None) of the
            entry that leaves the window with this token; None when none does (the window is not full yet).
        in_place: write the fold into `memory` and `normalizer` themselves (contiguous, and no gradient needed).

    Returns:
        The readout `(batch, heads, d_v)` in fp32 and the (memory, normalizer) after the fold.
    """
    batch, heads, dim = query.shape
    kv_heads, value_dim = memory.shape[1], memory.shape[-1]
    features = memory_feature_map(query.float()).view(batch, kv_heads, heads // kv_heads, dim)
    if update == "delta":
        read = _unit_rows(features) @ memory
    else:
        read = (features @ memory) / (features @ normalizer[..., None] + MEMORY_EPS)
    if leaving is not None:
        key, value, real = leaving
        key_features = memory_feature_map(key.float())
        if real is not None:
            key_features = key_features * real[:, None, None].to(key_features)
        value = value.float()
        if not in_place:
            memory, normalizer = _fold_entry(memory, normalizer, key_features, value, update)
        else:
            written = key_features
            if update == "delta":
                written = _unit_rows(key_features)
                value = value - (written[..., None, :] @ memory)[..., 0, :]
            # M += k^T v as one rank-1 batched update; z += sigma(k) (the unnormalised features, in both updates)
            memory.view(-1, dim, value_dim).baddbmm_(written.reshape(-1, dim, 1), value.reshape(-1, 1, value_dim))
            normalizer.add_(key_features)
    return read.reshape(batch, heads, value_dim), memory, normalizer


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
        memory = normalizer = memory_output = None
        entry_keys, entry_values = raw_key, value
        if cache is not None:
            if documents is not None:  # the model runs packed rows without a cache; a direct call must too
                raise ValueError("Packed sequences cannot be run with a cache (it would mix the documents).")
            layer = self._cache_layer(cache)
            if length == 1:  # a decode step reads and folds the stored state directly (before the window moves)
                memory_output = self._decode_memory(layer, raw_query, padding)
            else:
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
        if memory_output is not None:
            pass
        elif documents is not None:
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
        output = torch.lerp(local_output, memory_output, gate)  # g * memory + (1 - g) * local, one pass
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights

    def _decode_memory(
        self, layer: SonettMemoryLayer | SonettStaticMemoryLayer, raw_query: torch.Tensor, padding: torch.Tensor | None
    ) -> torch.Tensor:
        """The memory readout of one new token per row `(batch, heads, 1, d_v)`, from the cache layer before its
        update; the entry leaving the window is folded into the layer's memory (in place without gradients)."""
        past_keys, past_values, _, _ = layer.memory_inputs()
        batch, heads, _, dim = raw_query.shape
        kv_heads = heads // self.num_key_value_groups
        # The window holds P <= W - 1 entries; once full, its oldest one leaves with this token (delay W - P = 1).
        stored = 0 if past_keys is None else past_keys.shape[-2]
        leaving = None
        if stored == self.sliding_window - 1 and stored > 0:
            leaving = (past_keys[:, :, 0], past_values[:, :, 0], layer.leaving_mask(padding))
        memory, normalizer = layer.memory_buffers(batch, kv_heads, dim, self.head_dim, raw_query.device)
        in_place = not torch.is_grad_enabled()
        output, memory, normalizer = memory_decode_step(
            raw_query[:, :, 0], memory, normalizer, self.memory_update, leaving, in_place=in_place
        )
        if not in_place:
            layer.set_memory(memory, normalizer)
        return output[:, :, None]

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
    "memory_decode_step",
    "memory_feature_map",
    "memory_read",
    "reference_memory_read",
]

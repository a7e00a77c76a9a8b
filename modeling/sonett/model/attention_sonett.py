"""Softmax attention mixer for the `full_attention` and `sliding_attention` layer kinds.

Causal multi-head attention with grouped key/value heads and RoPE, dispatched through transformers'
attention interface (`eager`, `sdpa`, `flex_attention`, or any registered kernel). The two kinds differ
only in their mask and their cache layer; a sliding layer also passes its window to the kernel.

With `config.adaptive_span`, each head of a sliding layer learns its span z (Sukhbaatar et al. 2019,
"Adaptive Attention Span in Transformers"): keys at distance d are weighted by the soft ramp
m(d) = clamp((R + z - d) / R, 0, 1), applied as log m(d) added to the scores (the same as multiplying the
unnormalised probabilities by m and renormalising). The cache then keeps only ceil(max z + R) - 1 keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache_sonett import SonettStaticSlidingWindowLayer
from .configuration_sonett import SonettConfig
from .layers_sonett import PREFILL_PIECE_TOKENS, PackedDocuments, apply_rotary_pos_emb, host_reads_allowed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`(batch, kv_heads, seq, head_dim)` -> `(batch, kv_heads * n_rep, seq, head_dim)`."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def window_is_full(layer: object, window: int) -> bool:
    """Whether a dynamic window cache layer holds exactly the `window - 1` keys before the next token (after a
    prompt of at least that length), so that a long continuation can attend blockwise (`blocked_local_attention`)."""
    keys = getattr(layer, "keys", None)
    return isinstance(layer, DynamicSlidingWindowLayer) and keys is not None and keys.shape[-2] == window - 1


class BlockedLocalMask:
    """Mask marker for a long windowed prefill with no padding and an empty cache.

    Instead of a `(seq, seq)` mask, the mixer cuts the sequence into blocks of `window` queries that each see
    their own block and the previous one (`blocked_local_attention`): O(seq * window) time and memory instead
    of O(seq^2).
    """

    def __init__(self, window: int) -> None:
        self.window = window


# Without autograd (a prefill), `blocked_local_attention` runs over this many query tokens at a time, so that its
# block copies and scores stay this size however long the prompt is. With autograd it makes one call: the
# backward pass keeps every block anyway, and one call is the fastest.
PREFILL_CHUNK_TOKENS = PREFILL_PIECE_TOKENS


def band_mask(window: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask `(groups * window, 2 * window)` of one query block against its previous block and itself.

    Query r of block i sits at i*W + r and key c at (i-1)*W + c, so the distance is W + r - c; the key is visible
    (0) when that is in [0, W), i.e. r < c <= W + r, and gets the lowest value of `dtype` otherwise. The rows repeat
    for the `groups` query heads that share a key head (they are folded into the query rows, so no key is
    repeated). Columns `[W:]` alone are the causal mask of a block against itself.
    """
    rows = torch.arange(window, device=device)[:, None]
    cols = torch.arange(2 * window, device=device)[None, :]
    visible = (cols > rows) & (cols <= window + rows)
    mask = torch.zeros(window, 2 * window, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    return mask.repeat(groups, 1)


def attend_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout: float,
    use_sdpa: bool,
) -> torch.Tensor:
    """Softmax attention of folded blocks, by sdpa or in plain PyTorch (as `eager_attention_forward`).

    query `(n, kv_heads, groups * W, head_dim)`, key/value `(n, kv_heads, K, head_dim)`, additive mask
    `(groups * W, K)` shared by every block. Returns `(n, kv_heads, groups * W, head_dim)`.
    """
    if use_sdpa:
        return nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


def blocked_local_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal sliding-window attention of `query` over `key`/`value` (same length), computed blockwise.

    query `(batch, heads, seq, head_dim)`, key/value `(batch, kv_heads, seq, head_dim)`; a query at position t
    sees keys t - window + 1 .. t. Returns `(batch, seq, heads, head_dim)`.

    Blocks of `window` queries attend to their previous block and their own under one shared `band_mask`: the
    query heads of a key head are folded into the block's rows (no `repeat_kv`), so neither the keys nor the mask
    are repeated per batch row or head; block 0 attends to itself alone under the causal half of the mask. sdpa
    runs its fused kernel on the blocks, eager the plain PyTorch form. Without autograd the query blocks go
    `PREFILL_CHUNK_TOKENS` at a time into a preallocated output, so a long prefill holds no seq-long copies.
    """
    batch, heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    use_sdpa = module.config._attn_implementation == "sdpa"
    mask = band_mask(window, groups, query.dtype, query.device)

    def padded(x: torch.Tensor, length: int) -> torch.Tensor:
        """x `(batch, heads, t, head_dim)` padded with zeros to `length` positions."""
        return x if x.shape[2] == length else nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))

    def query_blocks(start: int, stop: int) -> torch.Tensor:
        """Queries [start, stop) -> `(batch * n, kv_heads, groups * W, head_dim)`, n = ceil((stop - start) / W)."""
        n = math.ceil((stop - start) / window)
        x = padded(query[:, :, start:stop], n * window).view(batch, kv_heads, groups, n, window, head_dim)
        return x.permute(0, 3, 1, 2, 4, 5).reshape(batch * n, kv_heads, groups * window, head_dim)

    def key_pairs(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Keys [start - W, stop) -> `(batch * n, kv_heads, 2 * W, head_dim)`: each block's previous and own block."""
        n = math.ceil((stop - start) / window)
        x = padded(x[:, :, start - window : stop], (n + 1) * window).view(batch, kv_heads, n + 1, window, head_dim)
        x = x.transpose(1, 2)  # (batch, n + 1, kv_heads, W, head_dim); one copy, by `cat`, and a cheap backward
        return torch.cat([x[:, :-1], x[:, 1:]], dim=3).view(batch * n, kv_heads, 2 * window, head_dim)

    def unfolded(out: torch.Tensor, length: int) -> torch.Tensor:
        """`(batch * n, kv_heads, groups * W, head_dim)` -> `(batch, length, heads, head_dim)`."""
        n = out.shape[0] // batch
        out = out.view(batch, n, kv_heads, groups, window, head_dim).permute(0, 1, 4, 2, 3, 5)
        return out.reshape(batch, n * window, heads, head_dim)[:, :length]

    needs_grad = query.requires_grad or key.requires_grad or value.requires_grad
    step = seq_len if needs_grad else max(1, PREFILL_CHUNK_TOKENS // window) * window
    output = None if needs_grad else query.new_empty(batch, seq_len, heads, head_dim)
    pieces = []

    def emit(start: int, stop: int, out: torch.Tensor) -> None:
        if output is None:
            pieces.append(unfolded(out, stop - start))
        else:
            output[:, start:stop] = unfolded(out, stop - start)

    if key.shape[2] == seq_len + window - 1:
        # A cache holds the window's W - 1 keys before the queries: one zero key in front makes the keys the
        # queries' blocks shifted by exactly one block, so every query block pairs with the W keys before it and its
        # own (the zero key is never visible: the band hides column 0 from every row).
        key, value = (nn.functional.pad(x, (0, 0, 1, 0)) for x in (key, value))
        offset, begin = window, 0
    elif key.shape[2] == seq_len:
        # Block 0 has no block before it: it attends to itself under the causal half of the band.
        first = min(window, seq_len)
        first_mask = mask[:, window : window + first]
        keys, values = key[:, :, :first], value[:, :, :first]
        emit(0, first, attend_blocks(query_blocks(0, first), keys, values, first_mask, scaling, dropout, use_sdpa))
        offset, begin = 0, window
    else:
        raise ValueError(
            f"blocked_local_attention: {key.shape[2]} keys for {seq_len} queries; it takes as many keys as queries, "
            f"or the window's {window - 1} cached keys before them."
        )
    for start in range(begin, seq_len, step):
        stop = min(start + step, seq_len)
        pairs = [key_pairs(x, offset + start, offset + stop) for x in (key, value)]
        emit(start, stop, attend_blocks(query_blocks(start, stop), *pairs, mask, scaling, dropout, use_sdpa))
    return (torch.cat(pieces, dim=1) if output is None else output), None


def static_window_mask(
    layer: SonettStaticSlidingWindowLayer,
    config: SonettConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> torch.Tensor | None:
    """Sliding-window mask over the keys a `SonettStaticSlidingWindowLayer` returns: its slots, then the new tokens.

    In slot coordinates the new token i sits at `slots + i`; it sees the keys within `config.sliding_window` of it
    (as `create_sliding_window_causal_mask` does) that are filled and not padding. The shapes depend only on the
    window and the number of new tokens, so a decode step builds the same mask shape every step.
    Returns the format of the configured attention backend, `(batch, 1, new, slots + new)`.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "A static cache needs the 2-D attention_mask (batch, cached + new tokens); a prepared 4-D mask cannot be "
            "placed in its window slots."
        )
    batch, new_tokens = inputs_embeds.shape[:2]
    valid = layer.key_validity(attention_mask, new_tokens, batch).to(inputs_embeds.device)
    mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    return mask_interface(
        batch_size=batch,
        q_length=new_tokens,
        kv_length=layer.slots + new_tokens,
        q_offset=layer.slots,
        kv_offset=0,
        mask_function=sliding_window_causal_mask_function(config.sliding_window),
        attention_mask=valid,
        allow_is_causal_skip=False,
        dtype=inputs_embeds.dtype,
        config=config,
        use_vmap=False,
        device=inputs_embeds.device,
    )


# Backends whose custom 4-D masks are tested (flex_attention is not: see `custom_4d_mask`).
CUSTOM_MASK_BACKENDS = ("eager", "sdpa")


def custom_4d_mask(
    kind: str,
    *,
    config: SonettConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache | None,
    layer_idx: int,
    **kwargs,
) -> torch.Tensor:
    """A user's 4-D mask `(batch or 1, 1, q_len, past + q_len)` made ready for one softmax layer.

    The mask is used as given (transformers' convention): bool (True = may attend) or float, added to the scores.
    On top of it, a `sliding_attention` layer keeps its window (a key more than `sliding_window - 1` positions
    back stays invisible, as it is without a mask). The key columns are cut to what this layer's cache holds (a
    windowed cache keeps only the last keys), and a bool mask becomes additive for the backends other than sdpa.
    Returns `(batch or 1, 1, q_len, kv_len)`, bool for sdpa, else in the dtype of `inputs_embeds`. Other backends
    than eager and sdpa raise a ValueError.
    """
    if config._attn_implementation not in CUSTOM_MASK_BACKENDS:
        raise ValueError(
            f"A custom 4-D attention_mask needs attn_implementation 'eager' or 'sdpa', not "
            f"{config._attn_implementation!r} (flex_attention reads a tensor mask through a score modification that "
            "torch 2.13 cannot compile on CPU, in transformers' own models too). Call "
            "model.set_attn_implementation('sdpa'), or pass position_ids that restart at 0 at each document instead "
            "of a block-diagonal mask."
        )
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    q_len, width = inputs_embeds.shape[1], attention_mask.shape[-1]
    mask = attention_mask.to(device)
    kv_offset = 0
    if cache is not None:
        kv_length, kv_offset = cache.get_mask_sizes(q_len, layer_idx)
        mask = mask[..., kv_offset : kv_offset + kv_length]
    lowest = torch.finfo(dtype).min
    if mask.dtype != torch.bool:
        mask = mask.to(dtype).clamp_min(lowest)
    if kind == "sliding_attention":
        query = torch.arange(width - q_len, width, device=device)[:, None]
        key = torch.arange(kv_offset, kv_offset + mask.shape[-1], device=device)[None, :]
        inside = query - key < config.sliding_window
        mask = mask & inside if mask.dtype == torch.bool else mask.masked_fill(~inside, lowest)
    if mask.dtype == torch.bool and config._attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, lowest)
    return mask


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in plain PyTorch.

    query `(batch, heads, q_len, head_dim)`, key/value `(batch, kv_heads, kv_len, head_dim)`, attention_mask an
    additive float mask `(batch, 1, q_len, kv_len)` or None. Returns the output `(batch, q_len, heads, head_dim)`
    and the probabilities `(batch, heads, q_len, kv_len)`.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def initial_span_logit(config: SonettConfig) -> float:
    """The span logit every head of an adaptive-span layer starts at: sigmoid(logit) = `adaptive_span_init`."""
    return math.log(config.adaptive_span_init / (1 - config.adaptive_span_init))


class SonettAttention(nn.Module):
    """Causal grouped-query softmax attention with RoPE (`full_attention` / `sliding_attention`)."""

    def __init__(self, config: SonettConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if self.kind == "sliding_attention" else None
        self.adaptive_span = bool(config.adaptive_span) and self.kind == "sliding_attention"
        if self.adaptive_span:
            self.span_logit = nn.Parameter(torch.full((config.num_attention_heads,), initial_span_logit(config)))

        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_bias)

    def spans(self) -> torch.Tensor:
        """Learned span z in tokens per head `(heads,)`, in (0, sliding_window)."""
        return self.config.sliding_window * torch.sigmoid(self.span_logit)

    def cache_window(self) -> int | None:
        """Keys (itself included) a query can still see at inference: the window, or less under adaptive spans."""
        if not self.adaptive_span:
            return self.sliding_window
        reach = math.ceil(self.spans().max().item() + self.config.adaptive_span_ramp)
        return max(1, min(self.sliding_window, reach))

    def span_bias(self, q_len: int, kv_len: int, attention_mask, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `(batch or 1, heads, q_len, kv_len)`: log of the soft span ramp, causality and padding.

        The queries are the last `q_len` of the `kv_len` positions, so distance d = i - j + kv_len - q_len.
        """
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise ValueError(
                "adaptive_span needs attn_implementation 'eager' or 'sdpa' (flex BlockMasks are not supported)."
            )
        device = self.span_logit.device
        distance = (
            torch.arange(q_len, device=device)[:, None] - torch.arange(kv_len, device=device)[None, :] + kv_len - q_len
        )
        ramp = (
            self.config.adaptive_span_ramp + self.spans()[:, None, None] - distance
        ) / self.config.adaptive_span_ramp
        ramp = ramp.clamp(0, 1).masked_fill(distance < 0, 0)
        lowest = torch.finfo(dtype).min
        bias = torch.where(ramp > 0, ramp.clamp_min(1e-30).log(), torch.full_like(ramp, lowest)).to(dtype)[None]
        if attention_mask is not None:
            mask = attention_mask[..., :kv_len]
            mask = torch.where(mask, 0.0, lowest).to(dtype) if mask.dtype == torch.bool else mask.to(dtype)
            bias = (bias + mask).clamp_min(lowest)
        return bias

    @staticmethod
    def build_mask(
        kind: str, allow_blocked: bool = True, documents: PackedDocuments | None = None, **mask_kwargs
    ) -> torch.Tensor | BlockedLocalMask | None:
        """The mask of one layer kind, in the format the configured attention backend expects.

        A long windowed prefill (no padding, nothing cached, eager or sdpa) gets a `BlockedLocalMask` instead of
        a dense `(seq, seq)` mask, unless `allow_blocked` is False (attention weights were requested) or the rows
        are packed (`documents`: then transformers' mask builders see the restarting `position_ids`, with no 2-D
        mask and no cache, and give a block-diagonal mask). A custom 4-D `attention_mask` is used as given (see
        `custom_4d_mask`).
        """
        if mask_kwargs["attention_mask"] is not None and mask_kwargs["attention_mask"].dim() == 4:
            return custom_4d_mask(kind, **mask_kwargs)
        # transformers skips an all-True 2-D mask (sdpa's is_causal) after reading it back to the host; the steps of
        # a generate that checked its prompt build the mask instead (docs/design.md, invariant 12).
        reads = host_reads_allowed() or mask_kwargs["attention_mask"] is None
        skip = {} if reads else {"allow_is_causal_skip": False}
        if kind == "full_attention":
            return create_causal_mask(**mask_kwargs, **skip)
        config, cache = mask_kwargs["config"], mask_kwargs["cache"]
        attention_mask, seq_len = mask_kwargs["attention_mask"], mask_kwargs["inputs_embeds"].shape[1]
        layer = cache.layers[mask_kwargs["layer_idx"]] if cache is not None else None
        if isinstance(layer, SonettStaticSlidingWindowLayer):
            return static_window_mask(layer, **mask_kwargs)
        window = cache.layer_windows[mask_kwargs["layer_idx"]] if cache is not None else config.sliding_window
        if (
            seq_len == 1
            and attention_mask is None
            and isinstance(layer, DynamicSlidingWindowLayer)
            and config._attn_implementation in ("eager", "sdpa")
            and not config.adaptive_span
        ):
            return None  # one new token over a window cache, which holds only the keys it may see: nothing to mask
        # Cheap tests first: a decode step never reads the mask's values here (no host sync).
        if (
            allow_blocked
            and documents is None
            and seq_len > 2 * window
            and config._attn_implementation in ("eager", "sdpa")
            and not config.adaptive_span
            and (cache is None or cache.get_seq_length(mask_kwargs["layer_idx"]) == 0 or window_is_full(layer, window))
            and (attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all())))
        ):
            return BlockedLocalMask(window)
        return create_sliding_window_causal_mask(**mask_kwargs, **skip)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend causally over the cached past plus the new tokens.

        Args:
            hidden_states: `(batch, seq, hidden_size)`, the normed residual stream.
            position_embeddings: RoPE `(cos, sin)`, each `(batch, seq, head_dim)`.
            attention_mask: the kind's mask from `build_mask` (4-D, a BlockMask, or None for plain causal sdpa).
            cache: a `SonettCache`; this layer's keys and values are appended to it.

        Returns:
            The output `(batch, seq, hidden_size)` and the attention probabilities (eager only, else None).
        """
        input_shape = hidden_states.shape[:-1]
        query, key, value = self.project(hidden_states)
        query, key = self.rotate(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        output, weights = self.attend(query, key, value, attention_mask, **kwargs)
        del query, key, value  # not alive next to the output projection's result (a long prefill's peak)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(batch, seq, hidden)` -> query `(batch, heads, seq, head_dim)`, key and value `(batch, kv_heads, ...)`."""
        head_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(head_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)
        return query, key, value

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on query `(batch, heads, seq, head_dim)` and key `(batch, kv_heads, seq, head_dim)`.

        Without autograd, a long input is rotated `PREFILL_CHUNK_TOKENS` positions at a time into new tensors, so that
        the temporaries of `apply_rotary_pos_emb` (three or four query-sized ones in one call) stay chunk-sized. The
        projections' outputs are not written: a forward hook may hold them.
        """
        seq_len = query.shape[-2]
        if torch.is_grad_enabled() or seq_len <= PREFILL_CHUNK_TOKENS:
            return apply_rotary_pos_emb(query, key, cos, sin)
        rotated_query, rotated_key = torch.empty_like(query), torch.empty_like(key)
        for start in range(0, seq_len, PREFILL_CHUNK_TOKENS):
            part = slice(start, start + PREFILL_CHUNK_TOKENS)
            rotated_query[:, :, part], rotated_key[:, :, part] = apply_rotary_pos_emb(
                query[:, :, part], key[:, :, part], cos[:, part], sin[:, part]
            )
        return rotated_query, rotated_key

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | BlockedLocalMask | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Softmax attention through the configured backend, blockwise for a `BlockedLocalMask`.

        query `(batch, heads, q_len, head_dim)`, key/value `(batch, kv_heads, kv_len, head_dim)` (RoPE applied,
        cache already updated). Returns `(batch, q_len, heads, head_dim)` and the weights (eager only).
        """
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        common = {
            "dropout": self.attention_dropout if self.training else 0.0,
            "scaling": self.scaling,
            "sliding_window": self.sliding_window,
        }
        if isinstance(attention_mask, BlockedLocalMask):
            return blocked_local_attention(self, query, key, value, attention_mask.window, **common, **kwargs)
        if self.adaptive_span:
            if self.config._attn_implementation not in ("eager", "sdpa"):
                raise ValueError(
                    f"adaptive_span needs attn_implementation 'eager' or 'sdpa', not "
                    f"{self.config._attn_implementation!r}; call model.set_attn_implementation('sdpa')."
                )
            attention_mask = self.span_bias(query.shape[-2], key.shape[-2], attention_mask, query.dtype)
        return attention_interface(self, query, key, value, attention_mask, **common, **kwargs)


__all__ = ["SonettAttention", "custom_4d_mask", "eager_attention_forward"]

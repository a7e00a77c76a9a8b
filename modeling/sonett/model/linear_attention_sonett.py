"""Gated linear attention mixer for the `linear_attention` layer kind.

Queries and keys are projected per head to `linear_feature_dim` (d_f) and expanded by a feature map φ
(Based, Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"); a per-head, data-dependent scalar decay a_t in (0, 1) forgets old tokens (GLA, Yang et al. 2023,
"Gated Linear Attention Transformers with Hardware-Efficient Training"):

    S_t = a_t · S_{t-1} + φ(k_t)ᵀ v_t        state `(batch, heads, d_phi, head_dim)`, always fp32
    o_t = φ(q_t) · S_t

with log a_t = logsigmoid(decay_proj(x_t) + decay_bias) / 16. There is no softmax denominator: the output
goes through a per-head RMSNorm, is gated by SiLU(gate_proj(x)) and projected by `o_proj`.

Training and multi-token prefill use the chunkwise-parallel form (`chunk_linear_attention`), single-token
decoding the recurrent form (`recurrent_linear_attention`); both read and write the same constant-size state
in the layer's `SonettLinearAttentionLayer`. An optional short causal depthwise convolution (one over the
concatenated q/k/v channels, followed by SiLU) keeps its last `conv_size - 1` inputs in the cache.

With `config.linear_use_fla`, flash-linear-attention's simple-GLA kernels replace the PyTorch forms on CUDA
when the `fla` package is installed; the PyTorch path is the reference and the default elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.utils import logging

from .configuration_sonett import SonettConfig
from .layers_sonett import PackedDocuments, SonettRMSNorm

logger = logging.get_logger(__name__)

try:  # optional fused GPU kernels; remote-code import checks skip imports inside `try`
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
except Exception:  # not installed, or installed without a working triton / GPU stack
    chunk_simple_gla = fused_recurrent_simple_gla = None

# log a_t = logsigmoid(logit) / DECAY_TEMPERATURE: a large temperature keeps the decay close to 1 (GLA uses 16).
DECAY_TEMPERATURE = 16.0
# Initial memory length 1 / (1 - a) in tokens, log-spaced over the heads from the first to the second value.
INITIAL_MEMORY_RANGE = (32.0, 1024.0)
# A sequence shorter than one chunk is padded to the whole chunk only for chunk sizes up to this: it keeps the outputs
# of the usual sizes (64) bit-identical to what earlier versions computed, at a cost of at most 256 x 256 per head. A
# larger chunk size gives a short sequence a chunk of its own length (equal up to float rounding), so a 6-token input
# no longer builds chunk_size x chunk_size matrices (4.5 GB at 8192).
FULL_CHUNK_PADDING_MAX = 256


def fla_available() -> bool:
    """Whether flash-linear-attention's simple-GLA kernels could be imported."""
    return chunk_simple_gla is not None and fused_recurrent_simple_gla is not None


def linear_feature_size(feature_map: str, feature_dim: int) -> int:
    """d_phi, the width of φ(x) for a projected width `feature_dim` (1 + d + d² for `taylor`)."""
    return 1 + feature_dim + feature_dim**2 if feature_map == "taylor" else feature_dim


def apply_feature_map(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """φ(x) for `(..., d_f)` -> `(..., d_phi)`.

    `taylor`: [1, x / d^(1/4), vec(x ⊗ x) / (sqrt(2) · sqrt(d))], so that φ(q) · φ(k) = 1 + s + s² / 2 with
    s = q · k / sqrt(d), the second-order Taylor expansion of exp(s) (Based). `elu`: elu(x) + 1. `identity`: x.
    """
    if feature_map == "identity":
        return x
    if feature_map == "elu":
        return F.elu(x) + 1.0
    if feature_map != "taylor":
        raise ValueError(f"Unknown linear_feature_map {feature_map!r}; choose taylor, elu or identity.")
    dim = x.shape[-1]
    first = x / dim**0.25
    second = (x[..., :, None] * x[..., None, :]).flatten(-2) / (math.sqrt(2.0) * math.sqrt(dim))
    return torch.cat([torch.ones_like(x[..., :1]), first, second], dim=-1)


def chunk_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel gated linear attention, computed in fp32.

    Inside a chunk, token i reads token j <= i with weight (φq_i · φk_j) · exp(L_i - L_j), where L is the
    cumulative log decay within the chunk; earlier chunks reach it through the state carried from chunk to
    chunk. The length is padded to a multiple of `chunk_size` (padding has zero keys and zero log decay, so it
    changes neither the outputs nor the final state), except that a sequence shorter than a chunk larger than
    `FULL_CHUNK_PADDING_MAX` is one chunk of its own length: it costs (seq x seq), not (chunk_size x chunk_size).

    Args:
        q_feat: φ(q) `(batch, heads, seq, d_phi)`.
        k_feat: φ(k) `(batch, heads, seq, d_phi)`.
        v: values `(batch, heads, seq, head_dim)`.
        log_decay: log a_t <= 0, `(batch, heads, seq)`.
        chunk_size: tokens per chunk.
        initial_state: state before the first token `(batch, heads, d_phi, head_dim)`, or None for zeros.
        resets: `(batch, seq)` bool, True at the first token of a packed document: the state before it is
            forgotten (a decay of 0), so no document reads an earlier one. None: no resets.

    Returns:
        The output `(batch, heads, seq, head_dim)` in `v.dtype` and the final state
        `(batch, heads, d_phi, head_dim)` in fp32.
    """
    batch, heads, seq_len, d_phi = q_feat.shape
    head_dim = v.shape[-1]
    if resets is not None and not bool(resets.any()):
        resets = None
    with torch.autocast(device_type=q_feat.device.type, enabled=False):
        q, k, values, g = (t.float() for t in (q_feat, k_feat, v, log_decay))
        if chunk_size > max(seq_len, FULL_CHUNK_PADDING_MAX):
            chunk_size = max(seq_len, 1)
        pad = (-seq_len) % chunk_size
        if pad:
            q, k, values = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, values))
            g = F.pad(g, (0, pad))
        n_chunks = (seq_len + pad) // chunk_size
        q = q.view(batch, heads, n_chunks, chunk_size, d_phi)
        k = k.view(batch, heads, n_chunks, chunk_size, d_phi)
        values = values.view(batch, heads, n_chunks, chunk_size, head_dim)
        cum = g.view(batch, heads, n_chunks, chunk_size).cumsum(-1)  # L_i within each chunk

        # Intra-chunk: decay matrix exp(L_i - L_j) for j <= i, 0 above the diagonal (masked before exp).
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        # With resets, `segment` counts the resets within the chunk up to each token: tokens read only their own
        # segment, the carried state reaches only segment 0, and only the last segment writes the state.
        segment = None
        if resets is not None:
            segment = F.pad(resets.to(q.device), (0, pad)).view(batch, 1, n_chunks, chunk_size).long().cumsum(-1)
            causal = causal & (segment[..., :, None] == segment[..., None, :])
        relative = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
        scores = (q @ k.transpose(-1, -2)) * relative.exp()
        intra = scores @ values  # (batch, heads, chunks, chunk, head_dim)

        # What each chunk adds to the state at its end, and how much the state decays across it.
        to_end = (cum[..., -1:] - cum).exp()  # (batch, heads, chunks, chunk)
        chunk_decay = cum[..., -1].exp()  # (batch, heads, chunks)
        if segment is not None:
            to_end = to_end * (segment == segment[..., -1:])
            chunk_decay = chunk_decay * (segment[..., -1] == 0)
        chunk_kv = (k * to_end[..., None]).transpose(-1, -2) @ values  # (batch, heads, chunks, d_phi, head_dim)

        state = q.new_zeros(batch, heads, d_phi, head_dim) if initial_state is None else initial_state.float()
        states_before = []
        for index in range(n_chunks):
            states_before.append(state)
            state = state * chunk_decay[:, :, index, None, None] + chunk_kv[:, :, index]
        before = torch.stack(states_before, dim=2)  # (batch, heads, chunks, d_phi, head_dim)
        carried = cum.exp() if segment is None else cum.exp() * (segment == 0)
        inter = (q * carried[..., None]) @ before
        out = (intra + inter).reshape(batch, heads, n_chunks * chunk_size, head_dim)[:, :, :seq_len]
    return out.to(v.dtype), state


def recurrent_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated linear attention in fp32: S_t = a_t S_{t-1} + φk_tᵀ v_t, o_t = φq_t S_t.

    Args:
        q_feat: φ(q) `(batch, heads, seq, d_phi)`.
        k_feat: φ(k) `(batch, heads, seq, d_phi)`.
        v: values `(batch, heads, seq, head_dim)`.
        log_decay: log a_t <= 0, `(batch, heads, seq)`.
        initial_state: state before the first token `(batch, heads, d_phi, head_dim)`, or None for zeros.
        resets: `(batch, seq)` bool, True where a packed document starts (a_t = 0 there), or None.

    Returns:
        The output `(batch, heads, seq, head_dim)` in `v.dtype` and the final state
        `(batch, heads, d_phi, head_dim)` in fp32.
    """
    batch, heads, seq_len, d_phi = q_feat.shape
    with torch.autocast(device_type=q_feat.device.type, enabled=False):
        q, k, values, g = (t.float() for t in (q_feat, k_feat, v, log_decay))
        state = q.new_zeros(batch, heads, d_phi, v.shape[-1]) if initial_state is None else initial_state.float()
        decay = g.exp()
        if resets is not None:
            decay = decay * ~resets.to(decay.device)[:, None, :]
        outputs = []
        for t in range(seq_len):
            state = state * decay[:, :, t, None, None] + k[:, :, t, :, None] * values[:, :, t, None, :]
            outputs.append((q[:, :, t, None, :] @ state).squeeze(-2))
        out = torch.stack(outputs, dim=2)
    return out.to(v.dtype), state


def fla_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    recurrent: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation through flash-linear-attention's simple-GLA kernels (CUDA only).

    Same shapes as `chunk_linear_attention`; fla wants time-first `(batch, seq, heads, dim)` tensors and
    a scale, which is 1 here because the feature map already carries it. `recurrent` picks the fused
    recurrent kernel (single-token decoding) instead of the chunked one.
    """
    if not fla_available():
        raise ImportError("flash-linear-attention is not installed: `pip install flash-linear-attention`.")
    kernel = fused_recurrent_simple_gla if recurrent else chunk_simple_gla
    q, k, values = (t.to(v.dtype).transpose(1, 2).contiguous() for t in (q_feat, k_feat, v))
    out, state = kernel(
        q=q,
        k=k,
        v=values,
        g=log_decay.float().transpose(1, 2).contiguous(),
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.float().contiguous(),
        output_final_state=True,
    )
    return out.transpose(1, 2).to(v.dtype), state.float()


def initial_decay_bias(num_heads: int, temperature: float = DECAY_TEMPERATURE) -> torch.Tensor:
    """Decay bias `(heads,)` giving head h an initial memory 1 / (1 - a) log-spaced over `INITIAL_MEMORY_RANGE`.

    a = sigmoid(b)^(1 / temperature), so b = logit(a^temperature).
    """
    low, high = INITIAL_MEMORY_RANGE
    memory = torch.logspace(math.log10(low), math.log10(high), num_heads, dtype=torch.float64)
    target = (1.0 - 1.0 / memory) ** temperature
    return torch.log(target / (1.0 - target)).float()


class SonettLinearAttention(nn.Module):
    """Feature-mapped, gated linear attention (`linear_attention`) with a constant-size recurrent state.

    Projections: `q_proj` / `k_proj` to `heads * linear_feature_dim`, `v_proj` and `gate_proj` to
    `heads * head_dim`, `decay_proj` (+ `decay_bias`) to one decay logit per head, `o_proj` back to the
    hidden size. `conv1d` is the optional short depthwise convolution over the q/k/v channels.
    """

    def __init__(self, config: SonettConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.feature_map = config.linear_feature_map
        self.feature_dim = config.linear_feature_dim
        self.chunk_size = config.linear_chunk_size
        self.conv_size = config.linear_conv_size
        self.decay_temperature = DECAY_TEMPERATURE

        qk_width = self.num_heads * self.feature_dim
        v_width = self.num_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, qk_width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, qk_width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, v_width, bias=bias)
        self.gate_proj = nn.Linear(config.hidden_size, v_width, bias=False)
        self.decay_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        # Own parameter (not decay_proj.bias) so that `SonettPreTrainedModel._init_weights` sets it alone.
        self.decay_bias = nn.Parameter(initial_decay_bias(self.num_heads))
        self.conv_channels = 2 * qk_width + v_width
        if self.conv_size > 0:
            self.conv1d = nn.Conv1d(
                self.conv_channels, self.conv_channels, self.conv_size, groups=self.conv_channels, bias=False
            )
        self.norm = SonettRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(v_width, config.hidden_size, bias=bias)

    @staticmethod
    def build_mask(
        kind: str,
        *,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        documents: PackedDocuments | None = None,
        **kwargs,
    ) -> torch.Tensor | PackedDocuments | None:
        """Padding mask of the current tokens `(batch, seq)` (True = real), or None without any padding.

        Only a 2-D `attention_mask` `(batch, past + seq)` is read here: the model turns a block-diagonal 4-D mask
        into `documents` and refuses any other 4-D mask for this kind.
        Packed rows (`documents`, never padded) give the `PackedDocuments` themselves: the state resets at each
        document start.
        """
        if documents is not None:
            return documents
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        mask = attention_mask[:, -inputs_embeds.shape[1] :].bool()
        if torch.compiler.is_compiling():
            return mask  # an all-True mask changes nothing, and testing for it would read the mask back to the host
        return None if bool(mask.all()) else mask

    def short_conv(
        self, x: torch.Tensor, conv_state: torch.Tensor | None, offsets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal depthwise convolution + SiLU.

        x `(batch, seq, channels)`, conv_state the previous `(batch, channels, conv_size - 1)` inputs or None
        (zeros). `offsets` `(batch, seq)`, each token's index within its packed document, or None: a token then
        sees no input of an earlier document (as if they were the zeros before a first token). Returns the output
        `(batch, seq, channels)` and the new conv state (None for conv_size 1).
        """
        x = x.transpose(1, 2)
        tail = self.conv_size - 1
        if conv_state is None:
            conv_state = x.new_zeros(x.shape[0], x.shape[1], tail)
        full = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (batch, channels, tail + seq)
        if offsets is None:
            out = F.conv1d(full, self.conv1d.weight, groups=self.conv_channels)
        else:
            # Tap i reads the input `tail - i` tokens back; keep it only inside the token's own document.
            windows = full.unfold(-1, self.conv_size, 1)  # (batch, channels, seq, conv_size)
            lags = torch.arange(tail, -1, -1, device=x.device)
            inside = (lags <= offsets.to(x.device)[..., None])[:, None].to(x.dtype)  # (batch, 1, seq, conv_size)
            out = (windows * inside * self.conv1d.weight[:, 0, None, :].to(x.dtype)).sum(-1)
        new_state = full[..., full.shape[-1] - tail :] if tail > 0 else None
        return F.silu(out).transpose(1, 2), new_state

    def use_fla(self, tensor: torch.Tensor) -> bool:
        return bool(self.config.linear_use_fla) and fla_available() and tensor.is_cuda

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Mix the new tokens with the recurrent state of earlier ones.

        Args:
            hidden_states: `(batch, seq, hidden_size)`, the normed residual stream.
            position_embeddings: unused (linear attention is position-free apart from decay and conv).
            attention_mask: from `build_mask`: the `(batch, seq)` bool padding mask (True = real token), the
                `PackedDocuments` of packed rows (the state and the conv restart at each document), or None.
            cache: a `SonettCache`; this layer's recurrent and conv states are read and replaced.

        Returns:
            The output `(batch, seq, hidden_size)` and None (there are no attention weights).
        """
        batch, seq_len, _ = hidden_states.shape
        layer = cache.layers[self.layer_idx] if cache is not None else None
        recurrent_state, conv_state = layer.get_state() if layer is not None else (None, None)
        documents = attention_mask if isinstance(attention_mask, PackedDocuments) else None
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if mask is not None:
            mask = mask.to(device=hidden_states.device, dtype=torch.bool)

        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        new_conv_state = None
        if self.conv_size > 0:
            qkv = torch.cat([q, k, v], dim=-1)
            if mask is not None:  # padded inputs look like the zeros before the first token
                qkv = qkv * mask[..., None].to(qkv.dtype)
            offsets = documents.offsets() if documents is not None else None
            qkv, new_conv_state = self.short_conv(qkv, conv_state, offsets)
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)

        q = q.view(batch, seq_len, self.num_heads, self.feature_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.num_heads, self.feature_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        q_feat = apply_feature_map(q.float(), self.feature_map)  # (batch, heads, seq, d_phi)
        k_feat = apply_feature_map(k.float(), self.feature_map)
        logits = self.decay_proj(hidden_states).float() + self.decay_bias.float()
        log_decay = (F.logsigmoid(logits) / self.decay_temperature).transpose(1, 2)  # (batch, heads, seq)
        if mask is not None:  # padded tokens neither write nor decay the state
            keep = mask[:, None, :]
            k_feat = k_feat * keep[..., None].to(k_feat.dtype)
            log_decay = log_decay.masked_fill(~keep, 0.0)

        resets = documents.starts() if documents is not None else None
        if self.use_fla(q_feat) and resets is not None:
            # fla's simple-GLA kernels reset only between varlen sequences of a batch of one; the PyTorch form
            # honours resets in any layout.
            logger.warning_once("Packed sequences: linear_attention runs its PyTorch form instead of the fla kernels.")
        if self.use_fla(q_feat) and resets is None:
            out, new_state = fla_linear_attention(q_feat, k_feat, v, log_decay, recurrent_state, recurrent=seq_len == 1)
        elif seq_len == 1:
            out, new_state = recurrent_linear_attention(q_feat, k_feat, v, log_decay, recurrent_state)
        else:
            out, new_state = chunk_linear_attention(
                q_feat, k_feat, v, log_decay, self.chunk_size, recurrent_state, resets=resets
            )

        out = self.norm(out.float().transpose(1, 2)).to(hidden_states.dtype)  # (batch, seq, heads, head_dim)
        gate = F.silu(self.gate_proj(hidden_states)).view(batch, seq_len, self.num_heads, self.head_dim)
        output = self.o_proj((out * gate).reshape(batch, seq_len, -1))
        if layer is not None:
            layer.set_state(new_state, new_conv_state, num_new_tokens=seq_len)
        return output, None


__all__ = [
    "SonettLinearAttention",
    "apply_feature_map",
    "chunk_linear_attention",
    "fla_linear_attention",
    "linear_feature_size",
    "recurrent_linear_attention",
]

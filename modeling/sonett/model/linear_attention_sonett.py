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
from .layers_sonett import PREFILL_PIECE_TOKENS, PackedDocuments, SonettRMSNorm, host_reads_allowed

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
# Without gradients, a longer input runs the chunked form over segments of about this many tokens (whole chunks),
# so a long prefill holds the per-token intermediates of one segment at a time (docs/benchmarks.md, prefill memory).
PREFILL_SEGMENT = PREFILL_PIECE_TOKENS


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
    first = x * dim**-0.25
    scaled = x * (2.0 * dim) ** -0.25  # (x_i x_j) / (sqrt(2) sqrt(d)) from d-wide scaling, not d²-wide division
    second = (scaled[..., :, None] * scaled[..., None, :]).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), first, second], dim=-1)


def split_into_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """The fp32 inputs of the chunked forms, padded to whole chunks and cut into them.

    q, k `(batch, heads, seq, d)`, v `(batch, heads, seq, head_dim)`, log_decay `(batch, heads, seq)`. Padding has
    zero keys and values and zero log decay, so it changes neither the outputs nor the final state. A sequence shorter
    than a chunk larger than `FULL_CHUNK_PADDING_MAX` is one chunk of its own length. Returns q, k, v
    `(batch, heads, chunks, chunk, ·)`, the cumulative log decay L within each chunk `(batch, heads, chunks, chunk)`,
    the chunk size used and the padding.
    """
    seq_len = q.shape[2]
    q, k, v, g = (t.float() for t in (q, k, v, log_decay))
    if chunk_size > max(seq_len, FULL_CHUNK_PADDING_MAX):
        chunk_size = max(seq_len, 1)
    pad = (-seq_len) % chunk_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = F.pad(g, (0, pad))
    chunks = (seq_len + pad) // chunk_size
    q, k, v = (t.unflatten(2, (chunks, chunk_size)) for t in (q, k, v))
    return q, k, v, g.unflatten(2, (chunks, chunk_size)).cumsum(-1), chunk_size, pad


def chunk_visibility(
    resets: torch.Tensor | None, chunk_size: int, pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which token of a chunk reads which: `(chunk, chunk)` causal, or with packed rows' `resets` `(batch, seq)`
    `(batch, 1, chunks, chunk, chunk)`, and the segment index of each token `(batch, 1, chunks, chunk)` (None without
    resets). `segment` counts the resets within the chunk up to each token: tokens read only their own segment, the
    carried state reaches only segment 0, and only the last segment writes the state."""
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril()
    if resets is None:
        return causal, None
    segment = F.pad(resets.to(device), (0, pad)).unflatten(1, (-1, chunk_size))[:, None].long().cumsum(-1)
    return causal & (segment[..., :, None] == segment[..., None, :]), segment


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
        q, k, values, cum, chunk_size, pad = split_into_chunks(q_feat, k_feat, v, log_decay, chunk_size)
        n_chunks = q.shape[2]

        # Intra-chunk: decay matrix exp(L_i - L_j) for j <= i, 0 above the diagonal (masked before exp).
        causal, segment = chunk_visibility(resets, chunk_size, pad, q.device)
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


def feature_scores(q: torch.Tensor, k: torch.Tensor, feature_map: str) -> torch.Tensor:
    """φ(q) · φ(k) for every query/key pair: `(..., m, d_f)`, `(..., n, d_f)` -> `(..., m, n)`.

    For `taylor` this is 1 + s + s² / 2 with s = q · k / sqrt(d_f) (exact: see `apply_feature_map`), computed from
    the d_f-wide products instead of the (1 + d_f + d_f²)-wide features.
    """
    if feature_map != "taylor":
        return apply_feature_map(q, feature_map) @ apply_feature_map(k, feature_map).transpose(-1, -2)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.addcmul(s + 1.0, s, s, value=0.5)


def chunk_states(chunk_kv: torch.Tensor, chunk_log_decay: torch.Tensor, initial_state: torch.Tensor) -> torch.Tensor:
    """The state before every chunk and after the last, in one batched product instead of a loop over chunks.

    S_before[i] = exp(Λ_<i) S_0 + Σ_{j<i} exp(Λ_<i - Λ_<=j) KV_j, with Λ the cumulative chunk log decay; every
    exponent is <= 0, so no term overflows.

    Args:
        chunk_kv: what each chunk adds at its end `(batch, heads, chunks, d_phi, head_dim)`.
        chunk_log_decay: the log decay across each chunk `(batch, heads, chunks)`.
        initial_state: `(batch, heads, d_phi, head_dim)`.

    Returns:
        `(batch, heads, chunks + 1, d_phi, head_dim)`: the states before chunks 0..N-1, then the final state.
    """
    batch, heads, chunks, d_phi, head_dim = chunk_kv.shape
    through = chunk_log_decay.cumsum(-1)  # Λ_<=j
    before = F.pad(through, (1, 0))  # Λ_<i for i = 0..N (the last one is the whole sequence)
    earlier = torch.ones(chunks + 1, chunks, dtype=torch.bool, device=chunk_kv.device).tril(-1)
    weights = (before[..., :, None] - through[..., None, :]).masked_fill(~earlier, float("-inf")).exp()
    states = weights @ chunk_kv.reshape(batch, heads, chunks, d_phi * head_dim)
    states = states.view(batch, heads, chunks + 1, d_phi, head_dim)
    return states + before.exp()[..., None, None] * initial_state[:, :, None]


def fused_chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    feature_map: str,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_linear_attention` from the projected queries and keys, with the feature map applied inside.

    The same computation, arranged for speed: the intra-chunk weights φ(q_i) · φ(k_j) come from `feature_scores`
    (for `taylor` from d_f-wide products, not the d_phi-wide features), and the state before each chunk from one
    batched product (`chunk_states`) instead of a loop over chunks (the loop stays for packed rows, whose resets
    cut the chain). Equal to `chunk_linear_attention(φ(q), φ(k), ...)` up to fp32 rounding; that function is the
    reference the tests hold this one to.

    Args:
        q, k: projected queries and keys `(batch, heads, seq, d_f)`, before the feature map.
        v: values `(batch, heads, seq, head_dim)`; a zero value row writes nothing (how padding is kept out).
        log_decay: log a_t <= 0, `(batch, heads, seq)`.
        feature_map: `taylor`, `elu` or `identity`.
        chunk_size, initial_state, resets: as in `chunk_linear_attention`.

    Returns:
        The output `(batch, heads, seq, head_dim)` in `v.dtype` and the final state `(batch, heads, d_phi, head_dim)`
        in fp32.
    """
    batch, heads, seq_len, d_f = q.shape
    head_dim = v.shape[-1]
    d_phi = linear_feature_size(feature_map, d_f)
    if resets is not None and not bool(resets.any()):
        resets = None
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, values, cum, chunk_size, pad = split_into_chunks(q, k, v, log_decay, chunk_size)
        n_chunks = q.shape[2]

        causal, segment = chunk_visibility(resets, chunk_size, pad, q.device)
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        intra = (feature_scores(q, k, feature_map) * decay) @ values

        # The decay factors scale the head_dim-wide side of each product, not the d_phi-wide features.
        to_end = (cum[..., -1:] - cum).exp()
        if segment is not None:
            to_end = to_end * (segment == segment[..., -1:])
        k_feat = apply_feature_map(k, feature_map)
        chunk_kv = k_feat.transpose(-1, -2) @ (values * to_end[..., None])  # (batch, heads, chunks, d_phi, head_dim)
        state = q.new_zeros(batch, heads, d_phi, head_dim) if initial_state is None else initial_state.float()
        if segment is None:
            states = chunk_states(chunk_kv, cum[..., -1], state)
            before, state = states[:, :, :-1], states[:, :, -1].clone()
            carried = cum.exp()
        else:
            chunk_decay = cum[..., -1].exp() * (segment[..., -1] == 0)
            states_before = []
            for index in range(n_chunks):
                states_before.append(state)
                state = state * chunk_decay[:, :, index, None, None] + chunk_kv[:, :, index]
            before = torch.stack(states_before, dim=2)
            carried = cum.exp() * (segment == 0)
        inter = (apply_feature_map(q, feature_map) @ before) * carried[..., None]
        out = (intra + inter).reshape(batch, heads, n_chunks * chunk_size, head_dim)[:, :, :seq_len]
    return out.to(v.dtype), state


def writable_in_place(state: torch.Tensor) -> bool:
    """Whether a decode step may update `state` `(batch, heads, d_phi, head_dim)` where it lies: fp32, contiguous, and
    not an inference tensor outside `torch.inference_mode()` (a cache filled under inference mode and continued under
    `torch.no_grad()`, which torch refuses to write in place; the out-of-place step then returns a normal tensor)."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        return False
    return torch.compiler.is_compiling() or not state.is_inference() or torch.is_inference_mode_enabled()


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    feature_map: str,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step, S = a S + φ(k)ᵀ v and o = φ(q) S, updating `state` in place when no gradient is recorded.

    The decode-time form of `recurrent_linear_attention` (its reference): no loop, and, under `torch.no_grad()`, the
    state is scaled and accumulated where it lies (`mul_`, `baddbmm_`), so a decode step allocates no new state.

    Args:
        q, k: projected queries and keys `(batch, heads, 1, d_f)`, before the feature map.
        v: values `(batch, heads, 1, head_dim)`.
        log_decay: `(batch, heads, 1)`.
        feature_map: `taylor`, `elu` or `identity`.
        state: `(batch, heads, d_phi, head_dim)` fp32 before the token (overwritten under no_grad), or None.

    Returns:
        The output `(batch, heads, 1, head_dim)` in `v.dtype` and the state after the token (fp32).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q_feat = apply_feature_map(q.float(), feature_map)
        k_feat = apply_feature_map(k.float(), feature_map)
        values = v.float()
        batch, heads, _, d_phi = k_feat.shape
        written = k_feat.transpose(-1, -2) @ values  # (batch, heads, d_phi, head_dim)
        if state is None:
            state = written
        elif torch.is_grad_enabled() or not writable_in_place(state):
            state = state.float() * log_decay.float().exp()[..., None] + written
        else:
            flat = state.view(batch * heads, d_phi, -1)
            flat.mul_(log_decay.float().exp().view(batch * heads, 1, 1))
            flat.baddbmm_(k_feat.reshape(batch * heads, d_phi, 1), values.reshape(batch * heads, 1, -1))
        out = q_feat @ state
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
        # True runs the reference forms (feature maps materialised, `chunk_linear_attention`, `F.conv1d`, the
        # recurrent loop): the oracle the tests hold the default path to.
        self.reference_path = False

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
        if not host_reads_allowed():
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

        Three forms, chosen by measurement on CPU (docs/benchmarks.md): a decode step is one weighted sum over the
        window (the convolution call alone costs more); packed rows are `conv_size` shifted multiply-adds, each tap
        masked to the token's own document (3x faster than `reference_short_conv`'s unfolded windows); anything
        else is `F.conv1d`, which is the fastest form of a long convolution forward and backward.
        """
        seq_len = x.shape[1]
        tail = self.conv_size - 1
        if offsets is None and seq_len > 1:
            return self.reference_short_conv(x, conv_state)
        weight = self.conv1d.weight[:, 0, :].to(x.dtype)  # (channels, conv_size)
        past = x.new_zeros(x.shape[0], tail, x.shape[2]) if conv_state is None else conv_state.transpose(1, 2)
        full = torch.cat([past.to(x.dtype), x], dim=1)  # (batch, tail + seq, channels)
        # A copy, not a view: a view would keep the whole (batch, tail + seq, channels) input alive in the cache.
        new_state = full[:, full.shape[1] - tail :].transpose(1, 2).clone() if tail > 0 else None
        if offsets is None:  # a decode step: one weighted sum over the window
            return F.silu((full * weight.t()).sum(1, keepdim=True)), new_state
        out = full[:, tail : tail + seq_len] * weight[:, tail]
        for tap in range(tail):  # tap i reads the input `tail - i` tokens back, only inside the token's document
            inside = (offsets.to(x.device) >= tail - tap)[..., None].to(x.dtype)
            out = torch.addcmul(out, full[:, tap : tap + seq_len] * inside, weight[:, tap])
        return F.silu(out), new_state

    def reference_short_conv(
        self, x: torch.Tensor, conv_state: torch.Tensor | None, offsets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`short_conv` through `F.conv1d` (and, for packed rows, an unfolded window): the reference form."""
        x = x.transpose(1, 2)
        tail = self.conv_size - 1
        if conv_state is None:
            conv_state = x.new_zeros(x.shape[0], x.shape[1], tail)
        full = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (batch, channels, tail + seq)
        if offsets is None:
            out = F.conv1d(full, self.conv1d.weight, groups=self.conv_channels)
        else:
            windows = full.unfold(-1, self.conv_size, 1)  # (batch, channels, seq, conv_size)
            lags = torch.arange(tail, -1, -1, device=x.device)
            inside = (lags <= offsets.to(x.device)[..., None])[:, None].to(x.dtype)  # (batch, 1, seq, conv_size)
            out = (windows * inside * self.conv1d.weight[:, 0, None, :].to(x.dtype)).sum(-1)
        # A copy, not a view: a view would keep the whole (batch, channels, tail + seq) input alive in the cache.
        new_state = full[..., full.shape[-1] - tail :].clone() if tail > 0 else None
        return F.silu(out).transpose(1, 2), new_state

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k `(batch, seq, heads * d_f)`, v and the gate input `(batch, seq, heads * head_dim)` and the decay
        logits `(batch, seq, heads)` of `hidden_states` `(batch, seq, hidden_size)`.

        When all five projections are plain `nn.Linear` modules, they run as one matrix product over their stacked
        weights (the same numbers, one pass over the input). Wrapped modules (a PEFT adapter, a quantized layer)
        are called one by one, so their own forward runs.
        """
        projections = (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.decay_proj)
        if not all(type(module) is nn.Linear for module in projections):
            return tuple(module(hidden_states) for module in projections)
        weight = torch.cat([module.weight for module in projections])
        bias = None
        if any(module.bias is not None for module in projections):
            bias = torch.cat(
                [
                    module.bias if module.bias is not None else module.weight.new_zeros(module.out_features)
                    for module in projections
                ]
            )
        fused = F.linear(hidden_states, weight, bias)
        return fused.split([module.out_features for module in projections], dim=-1)

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
        seq_len = hidden_states.shape[1]
        layer = cache.layers[self.layer_idx] if cache is not None else None
        recurrent_state, conv_state = layer.get_state() if layer is not None else (None, None)
        documents = attention_mask if isinstance(attention_mask, PackedDocuments) else None
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if mask is not None:
            mask = mask.to(device=hidden_states.device, dtype=torch.bool)
        segment = max(PREFILL_SEGMENT // self.chunk_size, 1) * self.chunk_size
        if seq_len == 1 and self._can_decode_fast(hidden_states, recurrent_state, conv_state, documents):
            output, recurrent_state, conv_state = self._decode_step(hidden_states, mask, recurrent_state, conv_state)
        elif torch.is_grad_enabled() or seq_len <= segment or documents is not None or self.reference_path:
            output, recurrent_state, conv_state = self._mix(hidden_states, mask, documents, recurrent_state, conv_state)
        else:
            # A long input without gradients: segment by segment (whole chunks), carrying both states, so that the
            # projections, convolution, feature maps and chunk scores exist for one segment at a time.
            output = hidden_states.new_empty(hidden_states.shape)
            for start in range(0, seq_len, segment):
                piece = slice(start, start + segment)
                output[:, piece], recurrent_state, conv_state = self._mix(
                    hidden_states[:, piece], None if mask is None else mask[:, piece], None, recurrent_state, conv_state
                )
        if layer is not None:
            layer.set_state(recurrent_state, conv_state, num_new_tokens=seq_len)
        return output, None

    def _can_decode_fast(
        self,
        hidden_states: torch.Tensor,
        recurrent_state: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        documents: PackedDocuments | None,
    ) -> bool:
        """Whether `_decode_step` can run this one-token call: no gradients, a state to continue (fp32, contiguous),
        plain `nn.Linear` projections (an adapter's own forward must run), not the reference path or fla."""
        return (
            not torch.is_grad_enabled()
            and not self.reference_path
            and documents is None
            and recurrent_state is not None
            and writable_in_place(recurrent_state)
            and (self.conv_size == 0 or conv_state is not None)
            and not self.use_fla(hidden_states)
            and all(type(module) is nn.Linear for module in self._projections())
        )

    def _projections(self) -> tuple[nn.Module, ...]:
        return (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.decay_proj)

    def _decode_step(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        recurrent_state: torch.Tensor,
        conv_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`_mix` for one token with no gradients, in as few operations as the arithmetic needs (a decode step costs
        its number of operations on CPU): 2-D rows instead of (batch, heads, seq) views, the convolution as one
        weighted sum over its window, and the state updated in place (`recurrent_step`'s arithmetic).

        hidden_states `(batch, 1, hidden_size)`, mask `(batch, 1)` bool or None, recurrent_state
        `(batch, heads, d_phi, head_dim)` fp32 (written in place), conv_state `(batch, channels, conv_size - 1)` or
        None. Returns what `_mix` returns.
        """
        batch = hidden_states.shape[0]
        x = hidden_states[:, 0]  # (batch, hidden_size)
        q, k, v, gate_input, decay_logits = (F.linear(x, m.weight, m.bias) for m in self._projections())
        keep = None if mask is None else mask[:, -1:].to(x.dtype)  # (batch, 1)
        new_conv_state = None
        if self.conv_size > 0:
            qkv = torch.cat([q, k, v], dim=-1)
            if keep is not None:
                qkv = qkv * keep
            window = torch.cat([conv_state.to(qkv.dtype), qkv[..., None]], dim=-1)  # (batch, channels, conv_size)
            new_conv_state = window[..., 1:]
            qkv = F.silu((window * self.conv1d.weight[:, 0, :].to(qkv.dtype)).sum(-1))
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        heads = self.num_heads
        q_feat = apply_feature_map(q.float().view(batch, heads, 1, self.feature_dim), self.feature_map)
        k_feat = apply_feature_map(
            k.float().view(batch, heads, self.feature_dim, 1).transpose(-1, -2), self.feature_map
        )
        values = v.float().view(batch, heads, 1, self.head_dim)
        decay = (F.logsigmoid(decay_logits.float() + self.decay_bias.float()) / self.decay_temperature).exp()
        if keep is not None:  # a padded token neither writes (zero value) nor decays the state
            values = values * keep.float()[:, :, None, None]
            decay = torch.where(keep.bool(), decay, 1.0)
        d_phi = q_feat.shape[-1]
        flat = recurrent_state.view(batch * heads, d_phi, self.head_dim)
        flat.mul_(decay.view(batch * heads, 1, 1))
        flat.baddbmm_(k_feat.reshape(batch * heads, d_phi, 1), values.reshape(batch * heads, 1, self.head_dim))
        out = (q_feat @ recurrent_state).view(batch, 1, heads, self.head_dim)
        out = self.norm(out).to(hidden_states.dtype)
        gate = F.silu(gate_input).view(batch, 1, heads, self.head_dim)
        return self.o_proj((out * gate).view(batch, 1, -1)), recurrent_state, new_conv_state

    def _mix(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        documents: PackedDocuments | None,
        recurrent_state: torch.Tensor | None,
        conv_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The layer over `hidden_states` `(batch, seq, hidden_size)` from the given states: the output
        `(batch, seq, hidden_size)`, the recurrent state and the convolution state after the last token.
        `mask` `(batch, seq)` bool (True = real token) or None; `documents` the packed documents or None."""
        batch, seq_len, _ = hidden_states.shape
        reference = self.reference_path

        q, k, v, gate_input, decay_logits = self.project(hidden_states)
        new_conv_state = None
        if self.conv_size > 0:
            qkv = torch.cat([q, k, v], dim=-1)
            if mask is not None:  # padded inputs look like the zeros before the first token
                qkv = qkv * mask[..., None].to(qkv.dtype)
            offsets = documents.offsets() if documents is not None else None
            conv = self.reference_short_conv if reference else self.short_conv
            qkv, new_conv_state = conv(qkv, conv_state, offsets)
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)

        q = q.view(batch, seq_len, self.num_heads, self.feature_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.num_heads, self.feature_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        logits = decay_logits.float() + self.decay_bias.float()
        log_decay = (F.logsigmoid(logits) / self.decay_temperature).transpose(1, 2)  # (batch, heads, seq)
        if mask is not None:  # padded tokens neither write (zero value) nor decay the state
            keep = mask[:, None, :]
            v = v * keep[..., None].to(v.dtype)
            log_decay = log_decay.masked_fill(~keep, 0.0)

        resets = documents.starts() if documents is not None else None
        if self.use_fla(q) and resets is not None:
            # fla's simple-GLA kernels reset only between varlen sequences of a batch of one; the PyTorch form
            # honours resets in any layout.
            logger.warning_once("Packed sequences: linear_attention runs its PyTorch form instead of the fla kernels.")
        if self.use_fla(q) and resets is None:
            q_feat, k_feat = (apply_feature_map(x.float(), self.feature_map) for x in (q, k))
            out, new_state = fla_linear_attention(q_feat, k_feat, v, log_decay, recurrent_state, recurrent=seq_len == 1)
        elif reference:
            q_feat, k_feat = (apply_feature_map(x.float(), self.feature_map) for x in (q, k))
            if mask is not None:
                k_feat = k_feat * mask[:, None, :, None].to(k_feat.dtype)
            form = recurrent_linear_attention if seq_len == 1 else chunk_linear_attention
            extra = () if seq_len == 1 else (self.chunk_size,)
            out, new_state = form(q_feat, k_feat, v, log_decay, *extra, recurrent_state, resets=resets)
        elif seq_len == 1 and resets is None:
            out, new_state = recurrent_step(q, k, v, log_decay, self.feature_map, recurrent_state)
        else:
            out, new_state = fused_chunk_linear_attention(
                q, k, v, log_decay, self.feature_map, self.chunk_size, recurrent_state, resets=resets
            )

        out = self.norm(out.float().transpose(1, 2)).to(hidden_states.dtype)  # (batch, seq, heads, head_dim)
        gate = F.silu(gate_input).view(batch, seq_len, self.num_heads, self.head_dim)
        output = self.o_proj((out * gate).reshape(batch, seq_len, -1))
        return output, new_state, new_conv_state


__all__ = [
    "SonettLinearAttention",
    "apply_feature_map",
    "chunk_linear_attention",
    "chunk_states",
    "feature_scores",
    "fla_linear_attention",
    "fused_chunk_linear_attention",
    "linear_feature_size",
    "recurrent_linear_attention",
    "recurrent_step",
]

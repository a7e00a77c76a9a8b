"""Building blocks shared by every Sonett mixer: RMSNorm, the SwiGLU MLP and rotary position embeddings."""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_sonett import SonettConfig

# True inside `SonettForCausalLM.generate` once it has checked the whole prompt: the forward calls of that generation
# then skip the input checks that read tensor values back to the host (docs/design.md, invariant 12).
GENERATE_VALIDATED: ContextVar[bool] = ContextVar("sonett_generate_validated", default=False)


def host_reads_allowed() -> bool:
    """Whether input checks may read tensor values back to the host: not inside compiled code, and not in the
    forward calls of a `generate` that has checked its prompt already (a decode step waits for nothing)."""
    return not torch.compiler.is_compiling() and not GENERATE_VALIDATED.get()


class SonettRMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight (initialised to ones)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: `(..., hidden_size)` -> same shape and dtype."""
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused call; the same formula (x * rsqrt(mean(x²) + eps) * weight) in fp32.
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# Without autograd (a prefill), the parts of a layer whose intermediates outgrow the hidden states (the MLP, RoPE,
# windowed attention, linear attention) and a constant-state model as a whole run a long input this many tokens at a
# time, with the same result (docs/design.md, invariant 11). Each part names its own copy of it, which tests set.
PREFILL_PIECE_TOKENS = 2048
# `SonettMLP`'s piece: its `(tokens, intermediate_size)` activations are never all alive at once.
MLP_CHUNK_TOKENS = PREFILL_PIECE_TOKENS


class SonettMLP(nn.Module):
    """SwiGLU feed-forward block: `down(act(gate(x)) * up(x))`.

    With autograd it runs in one call (the backward pass keeps every activation anyway); without, a long input
    runs `MLP_CHUNK_TOKENS` tokens at a time into one output tensor, with the same result (each token's row is
    computed alone either way).
    """

    def __init__(self, config: SonettConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: `(batch, seq, hidden_size)` -> same shape."""
        tokens = hidden_states.shape[:-1].numel()
        if torch.is_grad_enabled() or tokens <= MLP_CHUNK_TOKENS:
            return self.swiglu(hidden_states)
        rows = hidden_states.reshape(tokens, hidden_states.shape[-1])
        output = rows.new_empty(tokens, self.down_proj.out_features)
        for start in range(0, tokens, MLP_CHUNK_TOKENS):
            output[start : start + MLP_CHUNK_TOKENS] = self.swiglu(rows[start : start + MLP_CHUNK_TOKENS])
        return output.view(*hidden_states.shape[:-1], -1)

    def swiglu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., hidden_size)` -> `(..., hidden_size)` in one call."""
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class SonettRotaryEmbedding(nn.Module):
    """Cos/sin tables for RoPE, one set of inverse frequencies per RoPE layer kind.

    Each kind reads its own entry of `config.rope_parameters` (its own base, as in Gemma 3), or the flat dict that
    applies to every kind. Scaled RoPE types (`linear`, `dynamic`, `yarn`, `llama3`) use transformers' initialisers
    (`ROPE_INIT_FUNCTIONS`), so the frequencies are exactly transformers'. A `dynamic` kind is recomputed in each
    call from the call's longest position, as transformers' `dynamic_rope_update` does (unchanged up to
    `max_position_embeddings`); unlike transformers it keeps no state between calls, so a call after a longer one
    gets the frequencies of its own length (transformers keeps the longer call's until a call ends below
    `max_position_embeddings`). Like transformers, the keys cached before a rescale keep their old rotation.
    """

    def __init__(self, config: SonettConfig, kinds: list[str], device: torch.device | None = None) -> None:
        super().__init__()
        config.check_rope_parameters()  # also catches edits made to config.rope_parameters after construction
        self.config = config
        self.kinds = sorted(set(kinds))
        self.rope_type = {kind: config.rope_parameters_for(kind).get("rope_type", "default") for kind in self.kinds}
        self.attention_scaling: dict[str, float] = {}
        for kind in self.kinds:
            inv_freq, self.attention_scaling[kind] = self.compute_inv_freq(kind, device)
            self.register_buffer(f"{kind}_inv_freq", inv_freq, persistent=False)
            self.register_buffer(f"{kind}_original_inv_freq", inv_freq.clone(), persistent=False)

    def compute_inv_freq(
        self, kind: str, device: torch.device | None = None, seq_len: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """Inverse frequencies `(head_dim / 2,)` and the attention scaling of one layer kind.

        `seq_len` (a 0-d tensor) is the sequence length a `dynamic` kind rescales to; None gives the frequencies
        at init (those up to `max_position_embeddings`).
        """
        params = self.config.rope_parameters_for(kind)
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            nested = isinstance((self.config.rope_parameters or {}).get(kind), dict)
            layer_type = kind if nested else None
            return ROPE_INIT_FUNCTIONS[rope_type](self.config, device, seq_len=seq_len, layer_type=layer_type)
        dim = self.config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0

    @torch.no_grad()
    def forward(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, kind: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: `(batch, seq)` -> `(cos, sin)`, each `(batch, seq, head_dim)` in `hidden_states.dtype`."""
        if self.rope_type[kind] == "dynamic":
            # As transformers' `dynamic_rope_update`: rescale for the longest position (a tensor: no host sync).
            inv_freq, _ = self.compute_inv_freq(kind, hidden_states.device, seq_len=position_ids.max() + 1)
        else:
            inv_freq = getattr(self, f"{kind}_inv_freq")
        freqs = position_ids[..., None].float() * inv_freq.to(device=hidden_states.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = self.attention_scaling[kind]
        return (emb.cos() * scaling).to(hidden_states.dtype), (emb.sin() * scaling).to(hidden_states.dtype)


class PackedDocuments:
    """The documents of packed rows: several sequences back to back in one row, `position_ids` restarting at each.

    ids: `(batch, seq)` long, the document of each token within its row (0, 0, 1, 1, 1, 2, ...), counted as
    transformers' `find_packed_sequence_indices` counts them (a new document wherever the position does not grow
    by 1). Softmax layers get a block-diagonal mask from transformers; the recurrent kinds read this to reset
    their state at each document start.
    """

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def starts(self) -> torch.Tensor:
        """`(batch, seq)` bool, True at the first token of every document (index 0 included)."""
        return torch.nn.functional.pad(self.ids[:, 1:] != self.ids[:, :-1], (1, 0), value=True)

    def offsets(self) -> torch.Tensor:
        """`(batch, seq)` long, each token's index within its own document."""
        index = torch.arange(self.ids.shape[1], device=self.ids.device).expand_as(self.ids)
        first = torch.where(self.starts(), index, 0).cummax(dim=1).values
        return index - first

    def lengths(self, row: int) -> list[int]:
        """The lengths of the documents of one row, in order."""
        return self.ids[row].unique_consecutive(return_counts=True)[1].tolist()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Swap and negate the two halves of the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `(batch, heads, seq, head_dim)` and k `(batch, kv_heads, seq, head_dim)` by `(batch, seq, head_dim)`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


__all__ = [
    "GENERATE_VALIDATED",
    "PREFILL_PIECE_TOKENS",
    "PackedDocuments",
    "SonettMLP",
    "SonettRMSNorm",
    "SonettRotaryEmbedding",
    "apply_rotary_pos_emb",
    "host_reads_allowed",
]

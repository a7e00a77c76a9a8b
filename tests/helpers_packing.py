"""Packed documents and custom 4-D attention masks shared by the packing and input-hardening tests."""

import torch
from helpers_model import random_ids, tiny_model

CHUNK = 4  # linear and memory chunk size: every document spans several chunks and cuts through them
PACKING_MIXES = {
    "full": ["full_attention", "full_attention"],
    "sliding": ["sliding_attention", "sliding_attention"],
    "linear": ["linear_attention", "linear_attention"],
    "memory": ["memory_attention", "memory_attention"],
    "mixed": ["sliding_attention", "linear_attention", "memory_attention", "full_attention"],
}
LENGTHS = (9, 13, 6)  # two documents longer than the window (4), 2 * window and the chunk size


def packing_model(mix, attn="sdpa", seed=0, **overrides):
    """A tiny model of one of PACKING_MIXES whose linear and memory chunks are CHUNK tokens."""
    layer_types = PACKING_MIXES[mix]
    settings = {
        "layer_types": list(layer_types),
        "num_hidden_layers": len(layer_types),
        "linear_chunk_size": CHUNK,
        "linear_feature_dim": 4,
        "memory_chunk_size": CHUNK,
        **overrides,
    }
    return tiny_model("full", seed=seed, attn_implementation=attn, **settings)


def documents(lengths=LENGTHS, seed=5):
    """One 1-D tensor of random token ids per length."""
    return [random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]


def pack(docs):
    """One row: the documents back to back, positions restarting at 0 (as DataCollatorWithFlattening packs)."""
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(doc)) for doc in docs])[None]
    return input_ids, position_ids


def causal_4d(length, as_bool, window=None, dtype=torch.float32):
    """A (1, 1, length, length) causal mask (optionally windowed): bool (True = visible) or additive float."""
    rows, cols = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = cols <= rows
    if window is not None:
        visible &= rows - cols < window
    if as_bool:
        return visible[None, None]
    return torch.zeros(1, 1, length, length, dtype=dtype).masked_fill(~visible[None, None], torch.finfo(dtype).min)


def block_diagonal_4d(lengths, as_bool):
    """A (1, 1, n, n) causal mask that keeps documents of the given lengths apart: bool or additive float."""
    document = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    visible = (document[:, None] == document[None, :]) & torch.ones(len(document), len(document)).tril().bool()
    if as_bool:
        return visible[None, None]
    return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]

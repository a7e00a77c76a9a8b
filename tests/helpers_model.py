"""Tiny Sonett configs and models shared by the model, generation, input and remote-code tests."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sonett import SonettConfig, SonettForCausalLM

VOCAB = 97
WINDOW = 4
PAD, BOS, EOS = 0, 1, 2

LAYER_MIXES = {
    "full": ["full_attention", "full_attention"],
    "sliding": ["sliding_attention", "sliding_attention"],
    "mixed": ["sliding_attention", "full_attention", "sliding_attention"],
}
MIX_NAMES = list(LAYER_MIXES)
mixes = pytest.mark.parametrize("mix", MIX_NAMES)


def tiny_config(mix="mixed", **overrides):
    layer_types = LAYER_MIXES[mix]
    kwargs = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": len(layer_types),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "layer_types": list(layer_types),
        "sliding_window": WINDOW,
        "initializer_range": 0.2,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": None,
        "max_position_embeddings": 256,
    }
    kwargs.update(overrides)
    return SonettConfig(**kwargs)


def tiny_model(mix="mixed", seed=0, attn_implementation=None, **overrides):
    """A seeded, eval-mode fp32 SonettForCausalLM."""
    torch.manual_seed(seed)
    model = SonettForCausalLM(tiny_config(mix, **overrides))
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def random_ids(batch, length, seed=1, low=3, high=VOCAB):
    """Token ids that avoid the special tokens (pad/bos/eos)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, length), generator=generator)


def left_pad(rows, pad_id=PAD):
    """Left-pad a list of 1-D id tensors into (input_ids, attention_mask)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_decoding_reads_the_cache(model, ids):
    """One decode step with `cache=` equals the full forward; without the cache it does not."""
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).cache
        with_cache = model(ids[:, -1:], cache=cache).logits[:, -1]
        without_cache = model(ids[:, -1:]).logits[:, -1]
        full = model(ids).logits[:, -1]
    assert max_diff(with_cache, full) <= 1e-4
    assert max_diff(without_cache, full) > 1e-2


def assert_padded_batch_matches_rows_alone(model, rows, input_ids, attention_mask, atol=1e-5):
    """Prefill a left-padded batch, decode two tokens through the cache: every row as if it ran alone."""
    nxt = random_ids(len(rows), 2, seed=30)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, use_cache=True)
        cache, steps = out.cache, []
        for j in range(2):
            attention_mask = torch.cat([attention_mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            steps.append(model(nxt[:, j : j + 1], attention_mask=attention_mask, cache=cache).logits[:, -1])
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, nxt[i]])[None]).logits[0]
            assert max_diff(out.logits[i, -len(row) :], alone[: len(row)]) <= atol, i
            assert max_diff(torch.stack([steps[0][i], steps[1][i]]), alone[-2:]) <= atol, i

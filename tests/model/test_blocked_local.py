"""Long windowed prefill runs blockwise (O(seq * window)); it must equal the dense-mask path exactly."""

import pytest
import torch
from helpers_model import random_ids, tiny_model

from sonett.model.attention_sonett import BlockedLocalMask, SonettAttention


@pytest.mark.parametrize("length", [9, 12, 23])  # > 2 * window (4): blocked; 12 is a multiple of the window
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blocked_prefill_equals_dense_mask(attn, length):
    model = tiny_model("mixed", attn_implementation=attn)
    ids = random_ids(2, length)
    with torch.no_grad():
        blocked = model(ids).logits
        dense = model(ids, output_attentions=True).logits  # attention weights force the dense path
    assert (blocked - dense).abs().max() <= 1e-5


def test_blocked_prefill_fills_the_cache_like_decoding():
    model = tiny_model("sliding")
    ids = random_ids(1, 20)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(random_ids(1, 1, seed=9), cache=out.cache).logits
        reference = model(torch.cat([ids, random_ids(1, 1, seed=9)], 1), output_attentions=True).logits
    assert (step[:, -1] - reference[:, -1]).abs().max() <= 1e-4


def test_blocked_path_is_chosen_only_when_it_is_exact():
    model = tiny_model("sliding")
    config = model.config
    embeds = torch.zeros(1, 20, config.hidden_size)
    common = {"config": config, "inputs_embeds": embeds, "cache": None, "position_ids": None, "layer_idx": 0}
    build = SonettAttention.build_mask
    assert isinstance(build("sliding_attention", attention_mask=None, **common), BlockedLocalMask)
    padded = torch.ones(1, 20, dtype=torch.long)
    padded[0, 0] = 0
    assert not isinstance(build("sliding_attention", attention_mask=padded, **common), BlockedLocalMask)
    assert not isinstance(
        build("sliding_attention", allow_blocked=False, attention_mask=None, **common), BlockedLocalMask
    )
    short = {**common, "inputs_embeds": embeds[:, :8]}
    assert not isinstance(build("sliding_attention", attention_mask=None, **short), BlockedLocalMask)
    assert not isinstance(build("full_attention", attention_mask=None, **common), BlockedLocalMask)

"""`generate` with a static cache the caller built too small refuses before the first step, naming the cache's size
and the fix. Its decode steps skip the per-step room check (they read nothing back to the host, docs/design.md,
invariant 12), so without this check the step that overflows fails inside `index_copy_` (a device-side assert on a
GPU) after the earlier tokens were computed."""

import pytest
import torch
from helpers_model import random_ids, tiny_model


def test_generate_refuses_a_static_cache_too_small_for_max_length():
    model = tiny_model("mixed")
    cache = model.make_cache("static", max_cache_len=12)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"holds at most 12 tokens.*max_cache_len=18.*max_new_tokens to 5"),
    ):
        model.generate(random_ids(1, 8), cache=cache, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert int(cache.get_seq_length()) == 0  # refused before any token was fed


def test_generate_fills_a_static_cache_that_holds_the_generation_exactly():
    model = tiny_model("mixed")
    cache = model.make_cache("static", max_cache_len=12)  # 8 + 5 tokens: the last generated one is never fed
    with torch.no_grad():
        out = model.generate(random_ids(1, 8), cache=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13) and int(cache.get_seq_length()) == 12

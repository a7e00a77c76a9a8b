"""A cache filled under `torch.inference_mode()` continues under `torch.no_grad()` (as `generate` runs): the in-place
decode steps of the linear and memory layers must not write an inference tensor outside inference mode, which torch
refuses ("Inplace update to inference tensor outside InferenceMode")."""

import pytest
import torch
from helpers_model import max_diff, random_ids, tiny_model


@pytest.mark.parametrize("kind", ["linear_attention", "memory_attention", "sliding_attention"])
def test_a_cache_filled_in_inference_mode_decodes_under_no_grad(kind):
    model = tiny_model(
        "full", layer_types=[kind], num_hidden_layers=1, linear_feature_dim=4, linear_chunk_size=4, memory_chunk_size=4
    )
    prompt, steps = random_ids(1, 12, seed=3), random_ids(1, 6, seed=4)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache
        want = [model(steps[:, i : i + 1], cache=cache).logits for i in range(steps.shape[1])]
    with torch.inference_mode():
        cache = model(prompt, use_cache=True).cache
    with torch.no_grad():
        got = [model(steps[:, i : i + 1], cache=cache).logits for i in range(steps.shape[1])]
    assert max_diff(torch.cat(got, 1), torch.cat(want, 1)) <= 1e-6

"""After a long prefill, a windowed cache layer holds only its window: not a slice of the prompt's keys and values
that keeps all of them alive as long as the cache."""

import pytest
import torch
from helpers_model import WINDOW, random_ids, tiny_model


def owned_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the storage behind `tensor` (a slice keeps its whole base alive)."""
    return tensor.untyped_storage().nbytes()


@pytest.mark.parametrize("mix", ["sliding", "mixed"])
def test_prefill_keeps_only_the_window(mix):
    model = tiny_model(mix)
    with torch.no_grad():
        cache = model(random_ids(2, 40), use_cache=True).cache
    for i, kind in enumerate(model.config.layer_types):
        if kind != "sliding_attention":
            continue
        layer = cache.layers[i]
        assert layer.keys.shape[-2] == WINDOW - 1 and layer.cumulative_length == 40
        for tensor in (layer.keys, layer.values):
            assert owned_bytes(tensor) == tensor.numel() * tensor.element_size()


def test_memory_layer_window_keeps_only_the_window():
    model = tiny_model("sliding", layer_types=["memory_attention", "sliding_attention"])
    with torch.no_grad():
        cache = model(random_ids(1, 40), use_cache=True).cache
    layer = cache.layers[0]
    for tensor in (layer.keys, layer.values):
        assert owned_bytes(tensor) == tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("mix", ["sliding", "mixed"])
def test_chunked_prefill_then_decode_equals_one_pass(mix):
    """Updates on an empty and on a filled layer, long and single-token, give what one pass over all tokens gives."""
    model = tiny_model(mix)
    ids = random_ids(2, 30)
    with torch.no_grad():
        reference = model(ids).logits
        cache = model.make_cache()
        pieces = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 13), (13, 29), (29, 30))]
    torch.testing.assert_close(torch.cat(pieces, 1), reference, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 30

"""`sonett.evaluation.flops`: FLOPs per token from the config, against a count by hand and against what
`torch.utils.flop_counter.FlopCounterMode` sees in a real forward."""

from collections import Counter

import pytest
import torch
from helpers_model import random_ids, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from sonett.evaluation.baselines import llama_config_like
from sonett.evaluation.flops import causal_keys, forward_flops
from sonett.model.modeling_sonett import SonettForCausalLM

HOURGLASS = {"shorten_factor": 2, "start_layer": 1, "end_layer": 3}


def hand_config(layer_types, **overrides):
    settings = dict(vocab_size=16, hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1)
    settings.update(
        layer_types=layer_types,
        num_hidden_layers=len(layer_types),
        linear_feature_dim=2,
        linear_chunk_size=4,
        linear_conv_size=2,
    )
    return tiny_config("mixed", **{**settings, **overrides})


def test_a_linear_and_a_full_layer_counted_by_hand():
    # hidden 8, MLP 12, 2 heads of 4, 1 KV head, vocab 16; Taylor width 2 -> d_phi = 1 + 2 + 4 = 7; chunk 4; conv 2.
    count = forward_flops(hand_config(["linear_attention", "full_attention"]), context=8)
    # linear layer MACs: q, k 8x4 each (64) + v, gate 8x8 each (128) + decay 8x2 (16) + o 8x8 (64) = 272
    # full layer MACs: q 8x8 (64) + k, v 8x4 each (64) + o 8x8 (64) = 192; each layer's MLP 3 x 8 x 12 = 288
    assert count.weights == 2 * (272 + 288 + 192 + 288) == 2080
    assert count.lm_head == 2 * 8 * 16 == 256
    # full attention over 8 tokens: a query sees (8 + 1) / 2 = 4.5 keys on average; 4 x 4.5 x head_dim 4 x 2 heads
    assert count.attention == 144
    # 2 chunks of 4, 2 heads, per chunk 4*4*2 (scores from the 2-wide products) + 4*4*4 + 2*4*7*4 = 320 MACs, plus
    # the chunk states (2 + 1) * 2 * 7 * 4 = 168 per head: (2 * 320 + 168) * 2 heads = 1616 MACs / 8 tokens = 202 MACs
    assert count.chunked == 404
    # depthwise conv over q, k, v channels (4 + 4 + 8 = 16), kernel 2: 32 MACs
    assert count.conv == 64
    assert count.forward == 2948 and count.training == 3 * 2948
    assert count.prefill == 2948 - 256 + 256 / 8  # logits of the last position only


def test_a_memory_layer_counted_by_hand():
    count = forward_flops(hand_config(["memory_attention"], sliding_window=4, memory_chunk_size=4), context=8)
    # window 4: queries 0..3 see 1..4 keys (10), queries 4..7 four each (16): 26 / 8 = 3.25 keys
    assert count.attention == 4 * 3.25 * 4 * 2 == 104
    # memory read, 8 query positions in 2 chunks of 4 (d = d_v = 4, 2 heads, 1 KV head), per chunk:
    # KV head 4*4*(4+1) = 80 (k^T [v|1]); heads 2 * (16*4 + 4*4*5 + 16*5) = 448 -> 2 * 528 = 1056 MACs / 8 = 132 MACs
    assert count.chunked == 264


def test_causal_keys():
    assert causal_keys(8) == 4.5 and causal_keys(8, window=100) == 4.5
    assert causal_keys(1000, window=10) == pytest.approx((55 + 990 * 10) / 1000)


@pytest.mark.parametrize("hierarchy", [None, HOURGLASS], ids=["flat", "hourglass"])
@pytest.mark.parametrize("context", [64, 100])
def test_the_count_matches_what_flop_counter_mode_sees_in_a_forward(hierarchy, context):
    layer_types = ["linear_attention", "memory_attention", "sliding_attention", "full_attention"]
    settings = dict(linear_feature_dim=4, linear_chunk_size=16, memory_chunk_size=16, hierarchy=hierarchy)
    config = tiny_config("mixed", layer_types=layer_types, num_hidden_layers=4, **settings)
    torch.manual_seed(0)
    model = SonettForCausalLM(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(random_ids(1, context), use_cache=False)
    seen = Counter({str(op): flops / context for op, flops in counter.get_flop_counts()["Global"].items()})
    count = forward_flops(config, context)
    # weight matrices (lm_head included) run as mm / addmm, the chunked forms as bmm, the short convolutions as conv
    assert seen["aten.mm"] + seen["aten.addmm"] == pytest.approx(count.weights + count.lm_head, rel=0.02)
    assert seen["aten.bmm"] == pytest.approx(count.chunked, rel=0.03)
    assert seen["aten.convolution"] == pytest.approx(count.conv, rel=0.02)


def test_llama_is_counted_as_a_stack_of_full_attention_layers():
    config = tiny_config("mixed", layer_types=["full_attention"] * 3, num_hidden_layers=3)
    assert forward_flops(llama_config_like(config), 256) == forward_flops(config, 256)
    assert forward_flops(config, 256).chunked == forward_flops(config, 256).conv == 0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="context must be a positive number of tokens"):
        forward_flops(tiny_config(), 0)
    config = tiny_config()
    config.cross_attention_layers = [1]
    with pytest.raises(ValueError, match="cross_attention_layers=None"):
        forward_flops(config, 16)

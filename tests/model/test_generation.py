"""generate(): the cache gives the same tokens as recomputing everything, for every layer mix."""

import pytest
import torch
from helpers_model import PAD, VOCAB, WINDOW, left_pad, mixes, random_ids, tiny_model

from sonett import SonettCache

NEW_TOKENS = 8
PROMPT_LEN = 6
assert PROMPT_LEN + NEW_TOKENS > WINDOW + 4  # the sliding layers trim during prefill and during decoding

STRATEGIES = {
    "greedy": {"do_sample": False},
    "sample-top_k-0": {"do_sample": True, "top_k": 0},
    "sample-top_k-20": {"do_sample": True, "top_k": 20, "temperature": 0.8},
    "beam-3": {"do_sample": False, "num_beams": 3},
}


def prompts():
    """Two left-padded prompts of different lengths."""
    rows = [random_ids(1, PROMPT_LEN, seed=41)[0], random_ids(1, PROMPT_LEN - 2, seed=42)[0]]
    return left_pad(rows)


def generate(model, seed=0, **kwargs):
    input_ids, attention_mask = prompts()
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=PAD,
            **kwargs,
        )


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@mixes
def test_cache_and_no_cache_give_the_same_tokens(mix, strategy):
    model = tiny_model(mix)
    kwargs = STRATEGIES[strategy]
    with_cache = generate(model, **kwargs)
    without_cache = generate(model, use_cache=False, **kwargs)
    assert with_cache.shape == (2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(with_cache, without_cache)
    input_ids, _ = prompts()
    assert torch.equal(with_cache[:, :PROMPT_LEN], input_ids)


@mixes
def test_sampling_depends_on_the_seed(mix):
    model = tiny_model(mix)
    a = generate(model, seed=0, do_sample=True, top_k=0)
    b = generate(model, seed=0, do_sample=True, top_k=0)
    c = generate(model, seed=1, do_sample=True, top_k=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@mixes
def test_greedy_generate_follows_the_full_forward_argmax(mix):
    model = tiny_model(mix)
    ids = random_ids(1, PROMPT_LEN, seed=43)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
        logits = model(out).logits
    predicted = logits[0, PROMPT_LEN - 1 : -1].argmax(-1)
    assert torch.equal(out[0, PROMPT_LEN:], predicted)


@pytest.mark.parametrize("strategy", ["greedy", "beam-3"])
@mixes
def test_user_built_cache_equals_default(mix, strategy):
    model = tiny_model(mix)
    kwargs = STRATEGIES[strategy]
    batch = 2 * kwargs.get("num_beams", 1)
    cache = SonettCache(model.config)
    default = generate(model, **kwargs)
    user = generate(model, cache=cache, **kwargs)
    assert torch.equal(default, user)
    # The user's cache object was filled: every token but the last generated one was fed through the model.
    assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1
    for kind, layer in zip(model.config.layer_types, cache.layers):
        expected = WINDOW - 1 if kind == "sliding_attention" else PROMPT_LEN + NEW_TOKENS - 1
        assert layer.keys.shape[0] == batch
        assert layer.keys.shape[-2] == expected


@mixes
def test_return_dict_in_generate_with_scores(mix):
    model = tiny_model(mix)
    plain = generate(model)
    out = generate(model, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == NEW_TOKENS
    assert len(out.logits) == NEW_TOKENS
    for step, scores in enumerate(out.scores):
        assert scores.shape == (2, VOCAB)
        assert torch.equal(scores.argmax(-1), out.sequences[:, PROMPT_LEN + step])
    assert isinstance(out.cache, SonettCache)
    assert out.cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1


def test_beam_search_returns_several_sequences():
    model = tiny_model("mixed")
    input_ids, attention_mask = prompts()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            num_beams=3,
            num_return_sequences=3,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_scores=True,
        )
        no_cache = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            num_beams=3,
            num_return_sequences=3,
            pad_token_id=PAD,
            use_cache=False,
        )
    assert out.sequences.shape == (6, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(out.sequences, no_cache)
    assert out.sequences_scores.shape == (6,)
    best, second = out.sequences_scores[0::3], out.sequences_scores[1::3]
    assert bool((best >= second).all())


def test_deprecated_past_key_values_kwarg_still_reaches_the_cache():
    model = tiny_model("mixed")
    ids = random_ids(1, 9)
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
        full = model(ids).logits[:, -1]
    assert (step - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_chunked_prefill_in_generate_matches_one_pass(padded):
    layer_types = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
    model = tiny_model("full", layer_types=layer_types, num_hidden_layers=len(layer_types))
    if padded:
        ids, mask = left_pad([random_ids(1, 13)[0], random_ids(1, 7, seed=3)[0]])
    else:
        ids, mask = random_ids(2, 23), None
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        one_pass = model.generate(ids, **kwargs)
        chunked = model.generate(ids, prefill_chunk_size=4, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(chunked, one_pass)
    assert torch.equal(one_pass, uncached)

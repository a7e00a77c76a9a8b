"""The bad-input matrix, model inputs: token ids, attention masks, lengths past max_position_embeddings and
pixel values, each refused through `forward` and `generate` with the exception type and a message that
names the problem and the fix (docs/design.md, invariant 10). No case may end in a crash deep inside
torch, a silent truncation or a wrong answer.

The matrix is split by the module each case exercises: tests/model/test_bad_input_{model,processing,config,folders,
cache}.py, tests/data/test_bad_input_data.py, tests/training/test_bad_input_checkpoints.py and
tests/hub/test_bad_input_untrusted.py. Other test files hold more detailed checks of single entry points
(test_inputs, test_image_processing, test_processing, test_config, test_data, test_cache_file, test_training)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers_model import PAD, VOCAB, random_ids, tiny_model
from helpers_vision import IMAGE, VISION

from sonett import SonettForConditionalGeneration


def generate(model, ids, max_new_tokens=2, **kwargs):
    return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, **kwargs)


# Each model entry point the token matrix goes through: forward and generate.
ENTRIES = {
    "forward": lambda model, ids, **kwargs: model(ids, **kwargs),
    "generate": lambda model, ids, **kwargs: generate(model, ids, **kwargs),
}
entries = pytest.mark.parametrize("entry", sorted(ENTRIES))


@pytest.fixture(scope="module")
def model():
    """Sliding and full attention, max_position_embeddings 256."""
    return tiny_model("mixed")


# ---------------------------------------------------------------------------------------------------------------
# Tokens and masks
# ---------------------------------------------------------------------------------------------------------------


@entries
@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000, -1])
def test_token_ids_outside_the_vocabulary(model, entry, bad_id):
    ids = torch.tensor([[5, 6, bad_id, 7]])
    message = rf"Token id {bad_id} is out of range for vocab_size {VOCAB}.*encode the text with the tokenizer saved"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ENTRIES[entry](model, ids)


@entries
@pytest.mark.parametrize("mask_shape", [(1, 3), (1, 7), (2, 5)])
def test_attention_mask_of_another_shape(model, entry, mask_shape):
    mask = torch.ones(mask_shape, dtype=torch.long)
    message = rf"`attention_mask` has shape {re.escape(str(mask_shape))} but the .* needs \(1, 5\).*tokenizer returned"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ENTRIES[entry](model, random_ids(1, 5), attention_mask=mask)


@entries
@pytest.mark.parametrize("shape", [(1, 0), (0, 4)])
def test_empty_input(model, entry, shape):
    message = rf"Empty input: got batch shape {re.escape(str(shape))}; pass at least one token per sequence"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ENTRIES[entry](model, torch.zeros(shape, dtype=torch.long))


LIMIT_FIX = r"Shorten the input.*without full_attention layers.*sonett-tiny-constant.*rope_type 'yarn' or 'linear'"


def test_forward_longer_than_max_position_embeddings_is_refused_not_extrapolated():
    model = tiny_model("mixed", max_position_embeddings=16)
    with torch.no_grad():
        assert model(random_ids(1, 16)).logits.shape == (1, 16, VOCAB)  # exactly the limit runs
        message = (
            r"reaches position 16 \(a sequence of 17 tokens\).*at most 16 positions \(max_position_embeddings=16\)"
        )
        with pytest.raises(ValueError, match=message + ".*" + LIMIT_FIX):
            model(random_ids(1, 17))
        cache = model(random_ids(1, 16), use_cache=True).cache  # decoding past the limit through the cache
        with pytest.raises(ValueError, match="reaches position 16.*max_position_embeddings=16"):
            model(random_ids(1, 1), cache=cache)


def test_left_padding_counts_only_real_tokens_towards_the_limit():
    model = tiny_model("mixed", max_position_embeddings=16)
    ids = random_ids(2, 18)
    mask = torch.ones(2, 18, dtype=torch.long)
    mask[:, :2] = 0  # 16 real tokens per row
    with torch.no_grad():
        assert model(ids, attention_mask=mask).logits.shape == (2, 18, VOCAB)


def test_generate_past_max_position_embeddings_is_refused_before_the_first_step():
    model = tiny_model("mixed", max_position_embeddings=16)
    calls = []
    hook = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        message = r"grow the sequences to 17 tokens \(prompt 12 \+ up to 5 new\).*" + LIMIT_FIX
        with pytest.raises(ValueError, match=message + r".*lower max_new_tokens to 4 or less"):
            generate(model, random_ids(1, 12), max_new_tokens=5)
        assert calls == []  # refused up front, no compute wasted
        assert generate(model, random_ids(1, 12), max_new_tokens=4).shape == (1, 16)
    finally:
        hook.remove()


def test_layers_without_a_length_limit_accept_any_length():
    layer_types = ["sliding_attention", "linear_attention", "memory_attention"]
    model = tiny_model("full", layer_types=layer_types, num_hidden_layers=3, max_position_embeddings=16)
    with torch.no_grad():
        assert model(random_ids(1, 40)).logits.shape == (1, 40, VOCAB)
    assert generate(model, random_ids(1, 12), max_new_tokens=10).shape == (1, 22)


def test_full_attention_inside_the_hourglass_span_sees_shortened_positions():
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    hierarchy = {"shorten_factor": 2, "start_layer": 1, "end_layer": 2}
    model = tiny_model(
        "full", layer_types=layer_types, num_hidden_layers=3, hierarchy=hierarchy, max_position_embeddings=8
    )
    with torch.no_grad():
        assert model(random_ids(1, 16)).logits.shape == (1, 16, VOCAB)  # shortened positions 0..7
        with pytest.raises(
            ValueError, match=r"at most 16 positions \(max_position_embeddings=8, times shorten_factor 2"
        ):
            model(random_ids(1, 17))


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_model(model):
    return SonettForConditionalGeneration.from_text_model(
        model, cross_attention_layers=[0, 2], vision_config=VISION, image_token_id=IMAGE
    ).eval()


def marked_ids(batch=2, markers=1):
    ids = random_ids(batch, 8, low=6)
    ids[:, 2 : 2 + markers] = IMAGE
    return ids


PREPARE = "prepare images with SonettImageProcessor"
BAD_PIXELS = {
    "rank-3": (
        lambda: torch.randn(2, 16, 16),
        r"must have shape \(batch, images, channels, height, width\).*" + PREPARE,
    ),
    "rank-6": (lambda: torch.randn(2, 1, 1, 3, 16, 16), r"got \(2, 1, 1, 3, 16, 16\).*" + PREPARE),
    "wrong-size": (lambda: torch.randn(2, 1, 3, 8, 8), r"must have shape \(images, 3, 16, 16\), got \(2, 3, 8, 8\)"),
    "one-channel": (lambda: torch.randn(2, 1, 1, 16, 16), r"must have shape \(images, 3, 16, 16\).*" + PREPARE),
    "four-channels": (lambda: torch.randn(2, 1, 4, 16, 16), r"must have shape \(images, 3, 16, 16\).*" + PREPARE),
    "raw-uint8": (lambda: torch.zeros(2, 1, 3, 16, 16, dtype=torch.uint8), r"normalised floats, got dtype torch.uint8"),
    "nan": (lambda: torch.full((2, 1, 3, 16, 16), float("nan")), r"NaN or infinite values; " + PREPARE),
    "other-batch": (
        lambda: torch.randn(3, 1, 3, 16, 16),
        r"images for 3 samples but the text has batch size 2; pass one",
    ),
}


@entries
@pytest.mark.parametrize("kind", sorted(BAD_PIXELS))
def test_bad_pixel_values(vision_model, entry, kind):
    make, message = BAD_PIXELS[kind]
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ENTRIES[entry](vision_model, marked_ids(), pixel_values=make())


@entries
@pytest.mark.parametrize(("markers", "images"), [(2, 1), (1, 2)])
def test_image_markers_and_images_that_do_not_pair_up_in_the_model(vision_model, entry, markers, images):
    message = rf"Row 0 has {markers} image markers \({IMAGE}\) in the text but {images} images; give one image per"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        ENTRIES[entry](vision_model, marked_ids(markers=markers), pixel_values=torch.randn(2, images, 3, 16, 16))


def test_a_text_model_refuses_images_instead_of_ignoring_them(model):
    with pytest.raises(
        ValueError, match="reads text only and would ignore pixel_values; .*AutoModelForImageTextToText"
    ):
        model(marked_ids(), pixel_values=torch.randn(2, 1, 3, 16, 16))

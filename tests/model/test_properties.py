"""Property-based tests (hypothesis): the tokenizer, the image processor and the processor on arbitrary inputs.

Each test states a property that must hold for every input hypothesis draws: the tokenizer round-trips any unicode
text; the image processor either returns `pixel_values` of the documented shape with finite values in [-1, 1] or
raises one of its documented errors (TypeError, ValueError) with a message, never an exception from inside PIL,
numpy or torch; the processor's outputs agree with the image markers in the text, or it raises its documented
ValueError that gives both counts.

The `sonett-ci` profile (the default) is reproducible: the examples derive from each test's source
(`derandomize=True`) and nothing is stored between runs. For a longer local hunt, set
`HYPOTHESIS_PROFILE=sonett-fuzz` (many more, random examples).
"""

from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from sonett import SonettImageProcessor, SonettProcessor
from sonett.data.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, train_bpe_tokenizer
from sonett.model.image_processing_sonett import ALLOWED_IMAGE_FORMATS

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "sonett-ci", max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=_SLOW_OK
)
settings.register_profile("sonett-fuzz", max_examples=2000, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sonett-ci"))

# The image processor's documented errors (see `SonettImageProcessor.load_rgb_image`).
IMAGE_ERRORS = (TypeError, ValueError)
TARGET = 32  # the processor's default output side
PARTICULARS = re.compile(r"\d+|'[^']*'|\([^)]*\)")  # numbers, quoted values, parentheses: dropped from event names
CORPUS = [
    "def read_config(path):\n    return json.loads(open(path).read())\n",
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🌍🚀👩‍👩‍👧 🇩🇪, שלום مرحبا",
    "a picture of a cat <|image|> and a dog <|image|>",
] * 8


@pytest.fixture(scope="module")
def tokenizer():
    # min_frequency=1 so merges span multi-byte characters too (merged byte pairs inside UTF-8 sequences)
    return train_bpe_tokenizer(CORPUS, vocab_size=420, min_frequency=1)


@pytest.fixture(scope="module")
def image_processor():
    return SonettImageProcessor()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SonettProcessor(image_processor=SonettImageProcessor(size={"height": 8, "width": 8}), tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ tokenizer
# Text of every category except surrogates (which `str` can hold but UTF-8 cannot encode), with the awkward cases
# made likely: NUL and other controls, combining marks, emoji sequences, whitespace runs, special-token strings.
_AWKWARD = st.sampled_from(
    [
        "\x00",
        "\n",
        "\r\n",
        "\t",
        "   ",
        "\u00a0",
        "\u2028",
        "\u200b",
        "\u200d",
        "\ufeff",
        "\u0301",
        "e\u0301",
        "\u1100\u1161",
        "ﬁ",
        "Å",
        "Å",
        "👩‍👩‍👧",
        "🇩🇪",
        "\U0010ffff",
        "\ufffd",
        " 's",
        " ,",
        *SPECIAL_TOKENS,
    ]
)
_ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
UNICODE_TEXT = st.lists(st.one_of(_ANY_TEXT, _AWKWARD), max_size=8).map("".join)


@given(text=UNICODE_TEXT)
def test_tokenizer_round_trips_any_unicode_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


@given(text=UNICODE_TEXT)
def test_tokenizer_round_trips_special_token_strings_as_plain_text(tokenizer, text):
    """With `split_special_tokens=True` (how untrusted text should be encoded) no control token is made from text."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tokenizer.decode(ids) == text


@given(texts=st.lists(UNICODE_TEXT, min_size=1, max_size=4))
def test_padded_batch_decodes_back_to_each_text(tokenizer, texts):
    batch = tokenizer(texts, add_special_tokens=False, padding=True, split_special_tokens=True)
    for text, ids, mask in zip(texts, batch["input_ids"], batch["attention_mask"]):
        kept = [token for token, keep in zip(ids, mask) if keep]
        assert tokenizer.decode(kept) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------------------- image processor
PIL_MODES = [
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
    "I", "I;16", "I;16L", "I;16B", "F",
]  # fmt: skip
# Modes whose every pixel value is valid input: the processor must succeed on them.
ALWAYS_VALID_MODES = {
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I;16", "I;16L", "I;16B",
}  # fmt: skip
NUMPY_DTYPES = [
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
    "bool", "complex64", "datetime64[s]", "U2", "object",
]  # fmt: skip
ENCODINGS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO"]
SIDES = st.one_of(st.integers(1, 12), st.integers(1, 300))


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@st.composite
def pil_images(draw, modes: list[str] = PIL_MODES):
    """(image, must_succeed): a PIL image of any mode and size, random pixel data (and sometimes transparency)."""
    mode = draw(st.sampled_from(modes))
    size = (draw(SIDES), draw(SIDES))
    rng = _rng(draw(st.integers(0, 2**32 - 1)))
    in_range = draw(st.booleans())
    if mode in ("I", "F") and in_range:  # values the processor accepts: 16-bit range for I, [0, 1] for F
        values = rng.integers(0, 65536, size[::-1]) if mode == "I" else rng.random(size[::-1])
        image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    else:
        length = len(Image.new(mode, size).tobytes())
        image = Image.frombytes(mode, size, rng.integers(0, 256, length, dtype=np.uint8).tobytes())
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    if mode in ("L", "P", "RGB") and draw(st.booleans()):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) if mode == "RGB" else int(rng.integers(0, 256))
        image.info["transparency"] = colour
    must_succeed = mode in ALWAYS_VALID_MODES or (mode in ("I", "F") and in_range)
    return image, must_succeed


@st.composite
def numpy_arrays(draw, dtypes: list[str] = NUMPY_DTYPES):
    """(array, must_succeed): any dtype and 0-5 dims, channel-like sides made likely, valid or arbitrary values."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    side = st.one_of(st.sampled_from([1, 3, 4]), st.integers(0, 40))
    shape = tuple(draw(st.lists(side, min_size=0, max_size=5)))
    rng = _rng(draw(st.integers(0, 2**32 - 1)))
    count = int(np.prod(shape))
    kind = draw(st.sampled_from(["valid", "arbitrary"]))
    if dtype.kind == "O":
        array = np.empty(shape, dtype=object)  # python ints
        array.flat[:] = rng.integers(0, 256, count).tolist()
    elif dtype.kind == "U":
        array = np.full(shape, "ab", dtype=dtype)
    elif dtype.kind == "M":
        array = np.zeros(shape, dtype=dtype)
    elif kind == "arbitrary":  # any bit pattern: NaN, infinities, negatives, values far out of range
        array = np.frombuffer(rng.bytes(count * dtype.itemsize), dtype=dtype).reshape(shape).copy()
    elif dtype.kind == "f":
        array = rng.random(shape).astype(dtype)
    elif dtype.kind == "b":
        array = np.asarray(rng.random(shape) > 0.5)
    elif dtype.kind == "c":
        array = rng.random(shape).astype(dtype)
    else:
        high = 65536 if dtype == np.uint16 else 256
        high = min(high, np.iinfo(dtype).max + 1)
        array = rng.integers(0, high, shape).astype(dtype)
    must_succeed = kind == "valid" and dtype.kind in "uifb" and _valid_layout(shape)
    return array, must_succeed


def _valid_layout(shape: tuple[int, ...]) -> bool:
    """A single image layout the processor documents: (H, W), (H, W, C) or (C, H, W), C in {1, 3, 4}, no empty side."""
    if len(shape) == 2:
        return min(shape) > 0
    if len(shape) == 3:
        return min(shape) > 0 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4))
    return False


@st.composite
def tensors(draw):
    """(tensor, must_succeed): a numpy case as a tensor, sometimes bfloat16, non-contiguous or requiring grad."""
    array, must_succeed = draw(numpy_arrays([name for name in NUMPY_DTYPES if np.dtype(name).kind in "uifbc"]))
    tensor = torch.from_numpy(array)
    change = draw(st.sampled_from(["none", "bfloat16", "transpose", "grad"]))
    if change == "bfloat16" and tensor.is_floating_point():
        tensor = tensor.to(torch.bfloat16)
        must_succeed = must_succeed and bool(((tensor >= 0) & (tensor <= 1)).all())
    elif change == "transpose" and tensor.ndim >= 2:
        tensor = tensor.transpose(-1, -2)
        must_succeed = must_succeed and _valid_layout(tuple(tensor.shape))
    elif change == "grad" and tensor.is_floating_point():
        tensor = tensor.clone().requires_grad_(True)
    return tensor, must_succeed


@st.composite
def encoded_images(draw, formats: list[str] = ENCODINGS):
    """(bytes / BytesIO / data URI, must_succeed): a random image in a common format, sometimes damaged.

    Only undamaged images in one of `ALLOWED_IMAGE_FORMATS` must succeed (the others are refused: see
    tests/model/test_hardening_images.py)."""
    fmt = draw(st.sampled_from(formats))
    mode = "RGB" if fmt in ("JPEG", "PPM", "BMP") else draw(st.sampled_from(["RGB", "RGBA", "L", "P"]))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    rng = _rng(draw(st.integers(0, 2**32 - 1)))
    length = len(Image.new(mode, size).tobytes())
    buffer = io.BytesIO()
    Image.frombytes(mode, size, rng.integers(0, 256, length, dtype=np.uint8).tobytes()).save(buffer, fmt)
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "truncate", "flip", "junk", "random"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif damage == "flip":
        positions = draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8))
        mutable = bytearray(data)
        for position in positions:
            mutable[position] ^= draw(st.integers(1, 255))
        data = bytes(mutable)
    elif damage == "junk":
        data = draw(st.binary(min_size=1, max_size=16)) + data
    elif damage == "random":
        data = draw(st.binary(max_size=200))
    wrapper = draw(st.sampled_from(["bytes", "bytearray", "file", "data-uri"]))
    if wrapper == "bytearray":
        data = bytearray(data)
    elif wrapper == "file":
        data = io.BytesIO(data)
    elif wrapper == "data-uri":
        data = "data:image/png;base64," + base64.b64encode(data).decode()
    return data, damage == "none" and fmt in ALLOWED_IMAGE_FORMATS  # PPM, TGA and ICO are refused


NOT_IMAGES = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.text(max_size=20).filter(lambda text: not os.path.exists(text)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(object()),
).map(lambda value: (value, False))

ANY_IMAGE = st.one_of(pil_images(), numpy_arrays(), tensors(), encoded_images(), NOT_IMAGES)


def _check_pixels(pixel_values: torch.Tensor, count: int, height: int = TARGET, width: int = TARGET) -> None:
    assert isinstance(pixel_values, torch.Tensor)
    assert pixel_values.shape == (count, 3, height, width)
    assert pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0


def _images_in(image) -> int:
    """How many images one input holds: a 4-d array or tensor is a batch along its first axis."""
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return image.shape[0]
    return 1


def _process_or_documented_error(image_processor, image, must_succeed: bool) -> None:
    """The property every single input must hold (see the module docstring)."""
    try:
        out = image_processor(image, return_tensors="pt")
    except IMAGE_ERRORS as error:
        event(f"{type(error).__name__}: {re.sub(PARTICULARS, '#', str(error))[:70]}")  # --hypothesis-show-statistics
        assert str(error).strip(), "a documented error needs a message that names the problem"
        assert not must_succeed, f"a valid input was refused: {error}"
        return
    event("processed")
    _check_pixels(out["pixel_values"], _images_in(image))


@given(case=ANY_IMAGE)
def test_image_processor_gives_pixels_or_a_documented_error(image_processor, case):
    _process_or_documented_error(image_processor, *case)


# One test per PIL mode, array dtype and file format, so that every one of them is drawn in every run.
PER_CASE_EXAMPLES = max(8, settings.default.max_examples // 8)


@pytest.mark.parametrize("mode", PIL_MODES)
@settings(max_examples=PER_CASE_EXAMPLES)
@given(data=st.data())
def test_every_pil_mode(image_processor, mode, data):
    _process_or_documented_error(image_processor, *data.draw(pil_images([mode])))


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@settings(max_examples=PER_CASE_EXAMPLES)
@given(data=st.data())
def test_every_array_dtype(image_processor, dtype, data):
    _process_or_documented_error(image_processor, *data.draw(numpy_arrays([dtype])))


@pytest.mark.parametrize("fmt", ENCODINGS)
@settings(max_examples=PER_CASE_EXAMPLES)
@given(data=st.data())
def test_every_file_format(image_processor, fmt, data):
    _process_or_documented_error(image_processor, *data.draw(encoded_images([fmt])))


@given(cases=st.lists(st.one_of(pil_images(), numpy_arrays(), encoded_images()), min_size=1, max_size=4))
def test_a_list_of_images_fails_as_a_whole_or_gives_one_row_each(image_processor, cases):
    images = [image for image, _ in cases]
    try:
        out = image_processor(images, return_tensors="pt")
    except IMAGE_ERRORS as error:
        assert str(error).strip()
        assert not all(ok for _, ok in cases), f"valid inputs were refused: {error}"
        assert "image " in str(error) or "images" in str(error)  # the message names the image (by index)
        return
    _check_pixels(out["pixel_values"], sum(_images_in(image) for image in images))


@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    out_height=st.integers(1, 48),
    out_width=st.integers(1, 48),
)
def test_every_input_kind_of_the_same_pixels_gives_the_same_output(height, width, seed, out_height, out_width):
    """An RGB PIL image, its uint8 HWC array, its CHW tensor, its [0, 1] float array and its PNG bytes agree."""
    processor = SonettImageProcessor(size={"height": out_height, "width": out_width})
    pixels = _rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    kinds = [
        image,
        pixels,
        torch.from_numpy(pixels).permute(2, 0, 1),
        pixels.astype(np.float64) / 255.0,
        buffer.getvalue(),
    ]
    layout = {"input_data_format": "channels_last"} if height in (1, 3, 4) or width in (1, 3, 4) else {}
    reference = processor(image, return_tensors="pt")["pixel_values"]
    _check_pixels(reference, 1, out_height, out_width)
    for kind in kinds[1:]:
        kwargs = layout if isinstance(kind, np.ndarray) else {}
        if isinstance(kind, torch.Tensor) and layout:
            kwargs = {"input_data_format": "channels_first"}
        torch.testing.assert_close(processor(kind, return_tensors="pt", **kwargs)["pixel_values"], reference)


# ------------------------------------------------------------------------------------------------- processor
@st.composite
def prompts_and_images(draw):
    """(text, images, expected marker counts per sample): random text with markers; a matching or wrong image list."""
    batch = draw(st.integers(1, 3))
    pieces = st.one_of(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12), st.just(IMAGE_TOKEN))
    texts = [draw(st.lists(pieces, max_size=6).map("".join)) for _ in range(batch)]
    single = batch == 1 and draw(st.booleans())
    rng = _rng(draw(st.integers(0, 2**32 - 1)))

    def image():
        return Image.fromarray(rng.integers(0, 256, (int(rng.integers(1, 20)), int(rng.integers(1, 20)), 3), np.uint8))

    counts = [text.count(IMAGE_TOKEN) for text in texts]
    per_sample = [count + draw(st.sampled_from([0, 0, 0, -1, 1])) for count in counts]
    per_sample = [max(count, 0) for count in per_sample]
    layout = draw(st.sampled_from(["flat", "nested", "none"]))
    if layout == "none":
        images = None
    elif layout == "nested" and not single:
        images = [[image() for _ in range(count)] for count in per_sample]
    else:
        images = [image() for _ in range(sum(per_sample))]
    return (texts[0] if single else texts), images, layout


@given(case=prompts_and_images(), padding_side=st.sampled_from(["left", "right"]))
def test_processor_matches_markers_and_images_or_says_why(processor, tokenizer, case, padding_side):
    text, images, layout = case
    texts = [text] if isinstance(text, str) else text
    # count the markers as the tokenizer sees them (text may form the marker string by concatenation)
    marker_counts = [tokenizer(t)["input_ids"].count(tokenizer.image_token_id) for t in texts]
    if images is None:
        given_counts = [0] * len(texts)
    elif layout == "nested" and not isinstance(text, str):
        given_counts = [len(sample) for sample in images]
    else:
        given_counts = None  # a flat list: only the total must match
    total_given = sum(given_counts) if given_counts is not None else len(images)
    matches = marker_counts == given_counts if given_counts is not None else sum(marker_counts) == total_given
    try:
        out = processor(text, images=images, padding_side=padding_side)
    except ValueError as error:
        message = str(error)
        assert not matches, f"matching markers and images were refused: {message}"
        assert "marker" in message and "image" in message, message
        assert str(sum(marker_counts)) in message or str(marker_counts) in message or "Sample" in message
        return
    assert matches, f"markers {marker_counts} and images {given_counts or total_given} differ but no error was raised"
    input_ids, attention_mask = out["input_ids"], out["attention_mask"]
    batch, length = input_ids.shape
    assert batch == len(texts) and attention_mask.shape == (batch, length)
    assert input_ids.dtype == attention_mask.dtype == torch.long  # also for empty prompts: (B, 0) int64
    assert ((input_ids >= 0) & (input_ids < len(tokenizer))).all()
    assert set(attention_mask.unique().tolist()) <= {0, 1}
    if sum(marker_counts) == 0:
        assert "pixel_values" not in out and "cross_attention_mask" not in out
        return
    most = max(marker_counts)
    assert out["pixel_values"].shape == (batch, most, 3, 8, 8)
    assert torch.isfinite(out["pixel_values"]).all()
    assert out["image_mask"].tolist() == [[1] * count + [0] * (most - count) for count in marker_counts]
    mask = out["cross_attention_mask"]
    assert mask.shape == (batch, length, most)
    # position t sees image n exactly when t is a real token at or after the n-th marker of its sample
    for b in range(batch):
        markers = (input_ids[b] == tokenizer.image_token_id).nonzero().flatten().tolist()
        assert len(markers) == marker_counts[b]
        for n in range(most):
            expected = [int(n < len(markers) and t >= markers[n] and bool(attention_mask[b, t])) for t in range(length)]
            assert mask[b, :, n].tolist() == expected

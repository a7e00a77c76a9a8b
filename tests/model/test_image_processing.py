"""SonettImageProcessor: every accepted input kind and PIL mode, exact values, clear errors, save/load round trip."""

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from sonett import SonettImageProcessor

COLOUR = (20, 40, 200)
SIZE = 32


def normalised(colour):
    """The exact output value of an 8-bit channel value: rescale by 1/255, then (x - 0.5) / 0.5."""
    return ((np.asarray(colour, dtype=np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)


def assert_solid(pixel_values, colours):
    """pixel_values (N, 3, 32, 32) holds image n filled with colours[n] (RGB, 8-bit)."""
    assert pixel_values.shape == (len(colours), 3, SIZE, SIZE)
    assert pixel_values.dtype == torch.float32
    for image, colour in zip(pixel_values, colours):
        expected = torch.from_numpy(normalised(colour))[:, None, None].expand(3, SIZE, SIZE)
        torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)


def png_bytes(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def processor():
    return SonettImageProcessor()


def palette_image():
    image = Image.new("P", (9, 5), 0)
    image.putpalette(list(COLOUR) * 256)
    return image


# (input, expected RGB colour): every PIL mode, numpy layout/dtype and torch layout/dtype, at odd sizes.
SOLID_INPUTS = {
    "pil-rgb": (lambda: Image.new("RGB", (50, 17), COLOUR), COLOUR),
    "pil-l": (lambda: Image.new("L", (7, 40), 100), (100, 100, 100)),
    "pil-1": (lambda: Image.new("1", (33, 3), 1), (255, 255, 255)),
    "pil-p": (palette_image, COLOUR),
    "pil-rgba-opaque": (lambda: Image.new("RGBA", (12, 12), (*COLOUR, 255)), COLOUR),
    "pil-rgba-transparent": (lambda: Image.new("RGBA", (12, 12), (*COLOUR, 0)), (255, 255, 255)),
    "pil-la": (lambda: Image.new("LA", (5, 6), (100, 255)), (100, 100, 100)),
    "pil-i16": (lambda: Image.new("I;16", (8, 8), 65535), (255, 255, 255)),
    "pil-i": (lambda: Image.new("I", (8, 8), 0), (0, 0, 0)),
    "pil-f": (lambda: Image.new("F", (8, 8), 0.2), (51, 51, 51)),
    "pil-cmyk": (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
    "np-hwc-uint8": (lambda: np.full((40, 24, 3), COLOUR, dtype=np.uint8), COLOUR),
    "np-chw-uint8": (lambda: np.full((40, 24, 3), COLOUR, dtype=np.uint8).transpose(2, 0, 1), COLOUR),
    "np-hw-uint8": (lambda: np.full((9, 70), 100, dtype=np.uint8), (100, 100, 100)),
    "np-hw1-uint8": (lambda: np.full((9, 70, 1), 100, dtype=np.uint8), (100, 100, 100)),
    "np-hwc-float": (lambda: np.full((16, 16, 3), 0.2, dtype=np.float32), (51, 51, 51)),
    "np-rgba-opaque": (lambda: np.full((6, 6, 4), (*COLOUR, 255), dtype=np.uint8), COLOUR),
    "np-int64": (lambda: np.full((6, 6, 3), COLOUR, dtype=np.int64), COLOUR),
    "np-uint16": (lambda: np.full((6, 6), 65535, dtype=np.uint16), (255, 255, 255)),
    "np-bool": (lambda: np.ones((6, 6), dtype=bool), (255, 255, 255)),
    "torch-chw-uint8": (lambda: torch.tensor(COLOUR, dtype=torch.uint8)[:, None, None].repeat(1, 10, 20), COLOUR),
    "torch-chw-float": (lambda: torch.full((3, 10, 20), 0.2), (51, 51, 51)),
    "torch-hwc-uint8": (lambda: torch.tensor(COLOUR, dtype=torch.uint8).repeat(10, 20, 1), COLOUR),
    "torch-hw-bfloat16": (lambda: torch.full((10, 20), 0.2, dtype=torch.bfloat16), (51, 51, 51)),
    "png-bytes": (lambda: png_bytes(Image.new("RGB", (64, 48), COLOUR)), COLOUR),
    "bytesio": (lambda: io.BytesIO(png_bytes(Image.new("RGB", (64, 48), COLOUR))), COLOUR),
    "data-uri": (
        lambda: "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("L", (5, 5), 100))).decode(),
        (100, 100, 100),
    ),
}


@pytest.mark.parametrize("kind", sorted(SOLID_INPUTS))
def test_every_input_kind_gives_exact_normalised_values(processor, kind):
    make, colour = SOLID_INPUTS[kind]
    assert_solid(processor(make(), return_tensors="pt")["pixel_values"], [colour])


def test_batches_lists_paths_and_mixed_kinds(processor, tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (30, 60), COLOUR).save(path)
    batch = np.full((2, 8, 8, 3), 100, dtype=np.uint8)  # a 4-d array is a batch of two
    images = [Image.new("L", (3, 3), 0), str(path), path, batch, [torch.full((3, 4, 4), 1.0)]]
    out = processor(images, return_tensors="pt")["pixel_values"]
    assert_solid(out, [(0, 0, 0), COLOUR, COLOUR, (100, 100, 100), (100, 100, 100), (255, 255, 255)])
    torch_batch = torch.zeros(3, 3, 5, 5, dtype=torch.uint8)  # (N, C, H, W)
    assert_solid(processor(torch_batch, return_tensors="pt")["pixel_values"], [(0, 0, 0)] * 3)
    listed = processor([Image.new("RGB", (4, 4))])["pixel_values"]  # no return_tensors: a list of arrays
    assert isinstance(listed, list) and listed[0].shape == (3, SIZE, SIZE) and listed[0].dtype == np.float32


def test_known_image_at_target_size_matches_hand_computation(processor):
    pixels = np.random.default_rng(0).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    expected = torch.from_numpy(normalised(pixels).transpose(2, 0, 1))
    out = processor(pixels, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # The same pixels as PIL, as bytes and as a float tensor give the same output.
    for same in (Image.fromarray(pixels), png_bytes(Image.fromarray(pixels)), torch.from_numpy(pixels / 255.0)):
        torch.testing.assert_close(processor(same, return_tensors="pt")["pixel_values"][0], out, atol=1e-6, rtol=0)


def test_resize_is_bilinear_to_the_configured_size():
    processor = SonettImageProcessor(size={"height": 8, "width": 12})
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    out = processor(image, return_tensors="pt")["pixel_values"]
    resized = np.asarray(image.resize((12, 8), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert out.shape == (1, 3, 8, 12)
    torch.testing.assert_close(out[0], torch.from_numpy(normalised(resized)), atol=1e-6, rtol=0)


def truncated_png():
    noisy = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noisy))
    return data[: len(data) // 2]


BAD_INPUTS = {
    "int": (lambda: 5, TypeError, "image 0 is of type int, which is not an image; pass a PIL.Image"),
    "none": (lambda: None, TypeError, "not an image"),
    "dict": (lambda: {"pixels": 1}, TypeError, "not an image"),
    "missing-file": (lambda: "no/such/file.png", ValueError, "not an existing image file; pass"),
    "url": (lambda: "https://example.com/cat.png", ValueError, "does not download"),
    "corrupt-bytes": (lambda: b"definitely not an image", ValueError, "could not be read as an image"),
    "truncated-png": (truncated_png, ValueError, "could not be decoded: the file is truncated or corrupt"),
    "empty-array": (lambda: np.zeros((0, 5, 3), dtype=np.uint8), ValueError, r"is empty \(5x0 pixels\)"),
    "empty-pil": (lambda: Image.new("RGB", (0, 4)), ValueError, r"is empty \(0x4 pixels\)"),
    "two-channels": (lambda: np.zeros((8, 8, 2), dtype=np.uint8), ValueError, "has 2 channels"),
    "five-channels": (lambda: np.zeros((5, 8, 8), dtype=np.uint8), ValueError, "has 5 channels"),
    "two-channel-tensor": (lambda: torch.zeros(2, 8, 8), ValueError, "has 2 channels"),
    "five-dims": (lambda: np.zeros((1, 1, 3, 4, 4)), ValueError, "5 dims"),
    "float-range": (lambda: np.full((4, 4, 3), 2.0), ValueError, r"float values in \[2, 2\]; pass floats in \[0, 1\]"),
    "nan": (lambda: np.full((4, 4), np.nan), ValueError, "NaN"),
    "int-range": (lambda: np.full((4, 4), 300, dtype=np.int32), ValueError, r"integer values in \[300, 300\]"),
    "empty-list": (lambda: [], ValueError, "No images were given"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(processor, kind):
    make, error, message = BAD_INPUTS[kind]
    with pytest.raises(error, match=message):
        processor(make())


def test_bad_image_is_named_by_its_index(processor):
    images = [Image.new("RGB", (4, 4)), np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 5), np.uint8)]
    expected = "image 2 has 5 channels (shape (8, 8, 5)); pass 1 (grey), 3 (RGB) or 4 (RGBA) channels"
    with pytest.raises(ValueError, match=re.escape(expected)):
        processor(images)


def test_bomb_is_refused_from_the_header_before_decoding():
    header_only = truncated_png()  # 64x64 = 4096 pixels; decoding it would fail as truncated
    small = SonettImageProcessor(max_image_pixels=1000)
    with pytest.raises(ValueError, match=r"64x64 = 4096 pixels, over max_image_pixels=1000"):
        small(header_only)
    with pytest.raises(ValueError, match="over max_image_pixels=1000"):  # the limit can be set per call too
        SonettImageProcessor()(Image.new("RGB", (64, 64)), max_image_pixels=1000)
    with pytest.raises(ValueError, match="over max_image_pixels=1000"):  # and covers decoded arrays
        small(np.zeros((64, 64, 3), np.uint8))
    assert small(np.zeros((10, 10, 3), np.uint8), return_tensors="pt")["pixel_values"].shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("limit", [0, -5, 1.5])
def test_invalid_limit_is_refused(limit):
    with pytest.raises(ValueError, match="max_image_pixels must be a positive int"):
        SonettImageProcessor(max_image_pixels=limit)


def test_do_convert_rgb_false_refuses_non_rgb(processor):
    with pytest.raises(ValueError, match="do_convert_rgb=False; pass do_convert_rgb=True"):
        processor(Image.new("L", (4, 4)), do_convert_rgb=False)
    out = processor(Image.new("RGB", (4, 4), COLOUR), do_convert_rgb=False, return_tensors="pt")["pixel_values"]
    assert_solid(out, [COLOUR])


def test_save_and_auto_load_round_trip(tmp_path):
    processor = SonettImageProcessor(max_image_pixels=123_456)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_sonett.SonettImageProcessor"
    assert saved["image_processor_type"] == "SonettImageProcessor"
    assert saved["max_image_pixels"] == 123_456
    assert (tmp_path / "image_processing_sonett.py").is_file()

    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "SonettImageProcessor"
    assert loaded.max_image_pixels == 123_456
    assert dict(loaded.size) == {"height": SIZE, "width": SIZE}
    images = [np.random.default_rng(3).integers(0, 256, (50, 20, 3), dtype=np.uint8), Image.new("LA", (9, 9))]
    assert torch.equal(
        loaded(images, return_tensors="pt")["pixel_values"], processor(images, return_tensors="pt")["pixel_values"]
    )


def test_ambiguous_layouts_prefer_three_channels_then_the_convention(processor):
    chw = np.stack([np.full((4, 4), value, np.uint8) for value in COLOUR])  # (3, 4, 4): the 3 is the channel axis
    assert_solid(processor(chw, return_tensors="pt")["pixel_values"], [COLOUR])
    hwc = np.full((3, 5, 3), COLOUR, np.uint8)  # 3 at both ends: numpy is read channels-last
    assert_solid(processor(hwc, return_tensors="pt")["pixel_values"], [COLOUR])
    rgba_last = np.full((4, 5, 4), (*COLOUR, 255), np.uint8)  # 4 at both ends
    assert_solid(processor(rgba_last, return_tensors="pt")["pixel_values"], [COLOUR])
    as_tensor = torch.from_numpy(rgba_last)  # torch is read channels-first unless told otherwise
    default = processor(as_tensor, return_tensors="pt")["pixel_values"]
    assert not torch.allclose(default[0, :, 0, 0], torch.from_numpy(normalised(COLOUR)))
    told = processor(as_tensor, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    assert_solid(told, [COLOUR])

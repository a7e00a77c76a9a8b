"""The bad-input matrix, images through SonettProcessor and SonettImageProcessor: corrupt, truncated, empty
and missing files, decompression bombs (refused from the header, before decoding), and image markers that
do not pair up with the images (docs/design.md, invariant 10)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers_bad_input import bad_input_tokenizer
from PIL import Image, ImageFile

from sonett import SonettImageProcessor, SonettProcessor


@pytest.fixture(scope="module")
def tokenizer():
    return bad_input_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SonettProcessor(image_processor=SonettImageProcessor(), tokenizer=tokenizer)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noisy_png() -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A 100-byte PNG whose header claims 100000 x 100000 pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def image_file(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "image.png"
    path.write_bytes(data)
    return str(path)


BAD_IMAGES = {
    "corrupt-bytes": (lambda tmp: b"GIF89a but not really", r"image 0 could not be read as an image.*re-encode it"),
    "corrupt-file": (lambda tmp: image_file(tmp, b"\x89PNG garbage"), r"could not be read as an image.*valid PNG"),
    "truncated-png": (
        lambda tmp: noisy_png()[:700],
        r"could not be decoded: the file is truncated or corrupt.*re-download",
    ),
    "zero-byte-file": (lambda tmp: image_file(tmp, b""), r"could not be read as an image"),
    "zero-size-array": (lambda tmp: np.zeros((0, 8, 3), np.uint8), r"is empty \(8x0 pixels\); pass an image at least"),
    "zero-size-pil": (lambda tmp: Image.new("RGB", (0, 5)), r"is empty \(0x5 pixels\); pass an image at least"),
    "decompression-bomb": (
        lambda tmp: bomb_png(),
        r"(100000x100000 = 10000000000 pixels, over max_image_pixels|too large to decode safely).*downscale the image",
    ),
    "missing-file": (lambda tmp: str(tmp / "no-such.png"), r"not an existing image file; pass"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
@pytest.mark.parametrize("entry", ["processor", "image_processor"])
def test_bad_images(processor, tmp_path, entry, kind):
    make, message = BAD_IMAGES[kind]
    with pytest.raises(ValueError, match=message):
        if entry == "processor":
            processor(text="a<|image|>", images=[make(tmp_path)])
        else:
            processor.image_processor(make(tmp_path))


def test_the_bomb_is_refused_from_its_header_before_any_decoding(processor, monkeypatch):
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(ValueError, match="downscale the image"):
        processor(text="a<|image|>", images=[bomb_png()])
    assert decoded == []


MARKER_CASES = {
    "more-markers": (
        "a<|image|>b<|image|>",
        [Image.new("RGB", (4, 4))],
        r"2 <\|image\|> markers in total .* but 1 image",
    ),
    "fewer-markers": ("a<|image|>", [Image.new("RGB", (4, 4))] * 2, r"1 <\|image\|> marker in total .* but 2 images"),
    "markers-no-images": ("a<|image|>", None, r"1 <\|image\|> marker .* but no images were given; pass one image per"),
    "images-no-markers": ("a picture", [Image.new("RGB", (4, 4))], r"0 <\|image\|> markers in total .* but 1 image"),
    "per-sample": (
        ["a<|image|>", "b"],
        [[], [Image.new("RGB", (4, 4))]],
        r"Sample 0 has 1 <\|image\|> marker in its text but 0 images given for it; each <\|image\|> stands for",
    ),
}


@pytest.mark.parametrize("case", sorted(MARKER_CASES))
def test_image_markers_and_images_that_do_not_pair_up_in_the_processor(processor, case):
    text, images, message = MARKER_CASES[case]
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images)

"""Untrusted images (issue 15, item 2) and the bounded output `size` (item 9).

* Encoded images are opened with an allow-list of raster formats (PNG, JPEG, GIF, BMP, TIFF, WebP), decided from
  the header; EPS (which PIL decodes by running Ghostscript) and every other format are refused without starting
  a subprocess.
* A file path is read lazily: a tiny image followed by hundreds of MB of junk costs what the decoder needs.
* EXIF orientation is applied to encoded images; multi-frame images give their first frame.
* `size` is bounded (1..MAX_IMAGE_SIDE per side, a fixed height x width) in the constructor, from a saved folder
  and per call.
"""

import base64
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image
from transformers import AutoImageProcessor

from sonett import SonettImageProcessor, SonettProcessor
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.model.image_processing_sonett import ALLOWED_IMAGE_FORMATS, MAX_IMAGE_SIDE

ALLOWED_LIST = "PNG, JPEG, GIF, BMP, TIFF or WebP"


def refused(fmt: str) -> str:
    """The refusal of a format outside the allow-list: it names the format and the allowed ones."""
    return rf"image 0 (looks like|is) an image in the {fmt} format.*only {ALLOWED_LIST} images are decoded"


# A tiny, valid Encapsulated PostScript file (a filled 4x4 square), written by hand.
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n%%EndComments\n"
    b"0 0 moveto 4 0 lineto 4 4 lineto 0 4 lineto closepath fill\nshowpage\n%%EOF\n"
)
RED, BLUE = (200, 10, 10), (10, 10, 200)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> the processor's output (3, H, W): rescale by 1/255, then (x - 0.5) / 0.5."""
    return torch.from_numpy(((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy())


@pytest.fixture(scope="module")
def processor():
    return SonettImageProcessor()


# ------------------------------------------------------------------------------------------ format allow-list
@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that records every start in a marker file; PIL looks it up afresh."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "ghostscript-started"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 0\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # forget any earlier "no Ghostscript here" lookup
    return marker


EPS_INPUTS = {
    "path": lambda tmp: str(tmp / "image.eps"),
    "bytes": lambda tmp: EPS,
    "file-object": lambda tmp: io.BytesIO(EPS),
    "data-uri": lambda tmp: "data:image/png;base64," + base64.b64encode(EPS).decode(),
    "lazy-pil-image": lambda tmp: Image.open(tmp / "image.eps"),  # opened by the caller, not decoded yet
}


@pytest.mark.parametrize("kind", sorted(EPS_INPUTS))
def test_eps_is_refused_without_starting_ghostscript(processor, fake_ghostscript, tmp_path, kind):
    (tmp_path / "image.eps").write_bytes(EPS)
    with pytest.raises(ValueError) as caught:
        processor(EPS_INPUTS[kind](tmp_path))
    assert not fake_ghostscript.exists(), f"Ghostscript was started: {fake_ghostscript.read_text()!r}"
    assert re.search(refused("EPS"), str(caught.value)), caught.value


@pytest.mark.parametrize("route", ["call", "chat-template-path", "chat-template-url"])
def test_eps_is_refused_through_the_processor_too(fake_ghostscript, tmp_path, route):
    """`processor(...)` and `apply_chat_template` (what `transformers serve` does with an `image_url`)."""
    tokenizer = train_bpe_tokenizer(["a picture <|image|> of a square"] * 4, vocab_size=280, min_frequency=1)
    processor = SonettProcessor(image_processor=SonettImageProcessor(), tokenizer=tokenizer)
    (tmp_path / "image.eps").write_bytes(EPS)
    blocks = {
        "chat-template-path": {"type": "image", "path": str(tmp_path / "image.eps")},
        "chat-template-url": {"type": "image", "url": "data:image/png;base64," + base64.b64encode(EPS).decode()},
    }
    with pytest.raises(ValueError) as caught:
        if route == "call":
            processor(text="a picture <|image|>", images=[EPS])
        else:
            messages = [{"role": "user", "content": [blocks[route], {"type": "text", "text": "what is it?"}]}]
            processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert not fake_ghostscript.exists(), f"Ghostscript was started: {fake_ghostscript.read_text()!r}"
    assert re.search(refused("EPS"), str(caught.value)), caught.value


@pytest.mark.parametrize(
    ("fmt", "params"), [("PPM", {}), ("ICO", {}), ("PCX", {}), ("SGI", {}), ("QOI", {}), ("JPEG2000", {})]
)
def test_other_formats_are_refused_by_name(processor, fmt, params):
    data = encode(Image.new("RGB", (16, 16), RED), fmt, **params)
    with pytest.raises(ValueError, match=refused(fmt)):
        processor(data)


def test_a_format_without_magic_bytes_is_refused_too(processor):
    data = encode(Image.new("RGB", (4, 4), RED), "TGA")  # TGA has no magic bytes, so it cannot be named reliably
    with pytest.raises(ValueError, match=rf"image 0 .*{ALLOWED_LIST}"):
        processor(data)


@pytest.mark.parametrize("fmt", ALLOWED_IMAGE_FORMATS)
def test_every_allowed_format_is_decoded(processor, fmt):
    data = encode(Image.new("RGB", (4, 4), RED), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    pixels = processor(data, do_resize=False, return_tensors="pt")["pixel_values"][0]
    expected = normalised(np.full((4, 4, 3), RED, np.uint8))
    torch.testing.assert_close(pixels, expected, atol=0.05 if fmt == "JPEG" else 1e-6, rtol=0)


def test_a_webp_canvas_is_checked_from_its_header_before_the_decoder_allocates_it(processor):
    """A 30-byte VP8X header declaring a 16384 x 16384 canvas is refused by max_image_pixels, before PIL (whose
    WebP decoder allocates the canvas when it opens the file) sees it."""
    side = (16384 - 1).to_bytes(3, "little")
    header = b"RIFF" + (22).to_bytes(4, "little") + b"WEBP" + b"VP8X" + (10).to_bytes(4, "little") + bytes(4)
    with pytest.raises(ValueError, match=r"16384x16384 = 268435456 pixels, over max_image_pixels=64000000"):
        processor(header + side + side)


@pytest.mark.parametrize(("chunk", "params"), [("VP8L", {"lossless": True}), ("VP8 ", {"quality": 80}), ("VP8X", {})])
def test_the_webp_canvas_size_read_from_the_header_is_exact(processor, chunk, params):
    """Lossless (VP8L), lossy (VP8) and extended (VP8X) files: the limit is exactly width * height."""
    if chunk == "VP8X":  # metadata makes the extended format
        exif = Image.Exif()
        exif[0x010F] = "maker"
        params = {"exif": exif.tobytes()}
    data = encode(Image.new("RGB", (7, 5), RED), "WEBP", **params)
    assert data[12:16] == chunk.encode()
    assert processor(data, max_image_pixels=35, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"7x5 = 35 pixels, over max_image_pixels=34"):
        processor(data, max_image_pixels=34)


def test_a_text_stream_gets_a_clear_error(processor, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    with (
        open(path, encoding="latin-1") as text,
        pytest.raises(ValueError, match=r"image 0 is a text stream; open the file in binary mode"),
    ):
        processor(text)


# ------------------------------------------------------------------------------------------ bounded reads
MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys
    from sonett import SonettImageProcessor, SonettProcessor

    processor = SonettImageProcessor()
    processor(sys.argv[3], return_tensors="np")  # warm up: plugins and code paths loaded
    for kind, source in (("png-path", sys.argv[1]), ("webp-file-object", open(sys.argv[2], "rb"))):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        shape = processor(source, return_tensors="np")["pixel_values"].shape
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(kind, shape, before, after, (after - before) // 1024, flush=True)
    """
)
JUNK_BYTES = 600 * 2**20


def sparse_file(path, image_bytes: bytes):
    """`image_bytes` followed by zeros up to 600 MB; the zeros are a hole (no disk, no time)."""
    with open(path, "wb") as handle:
        handle.write(image_bytes)
        handle.truncate(JUNK_BYTES)
    return str(path)


def test_a_small_image_in_a_huge_file_costs_what_the_decoder_needs(tmp_path):
    """A 4x4 PNG (by path) and a 4x4 WebP (file object) each followed by 600 MB of junk: peak RSS grows < 100 MB."""
    image = Image.new("RGB", (4, 4), RED)
    png = sparse_file(tmp_path / "big.png", encode(image, "PNG"))
    webp = sparse_file(tmp_path / "big.webp", encode(image, "WEBP", lossless=True))
    small = tmp_path / "small.png"
    small.write_bytes(encode(image, "PNG"))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, png, webp, str(small)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    growth = {line.split()[0]: int(line.split()[-1]) for line in lines if line}
    assert set(growth) == {"png-path", "webp-file-object"}, result.stdout
    assert all(mb < 100 for mb in growth.values()), f"peak RSS growth in MB: {growth}"


# ------------------------------------------------------------------------------------------ EXIF orientation
# EXIF orientation -> what the viewer must do to the stored pixels (H, W, 3), as an independent numpy reference.
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, k=-1),  # rotated 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
    8: lambda a: np.rot90(a, k=1),  # rotated 90 counter-clockwise
}


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_to_png(processor, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)  # 5 wide, 3 high
    data = with_orientation(Image.fromarray(stored), "PNG", orientation)
    out = processor(data, do_resize=False, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, normalised(ORIENTATIONS[orientation](stored)), atol=1e-6, rtol=0)


def test_exif_orientation_is_applied_to_a_jpeg_path(processor, tmp_path):
    stored = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    path.write_bytes(with_orientation(Image.fromarray(stored), "JPEG", 6))
    decoded = np.asarray(Image.open(path).convert("RGB"))  # the same decoder, without the rotation
    out = processor(str(path), do_resize=False, return_tensors="pt")["pixel_values"][0]
    assert out.shape == (3, 24, 16)
    torch.testing.assert_close(out, normalised(np.rot90(decoded, k=-1)), atol=1e-6, rtol=0)


def test_a_pil_image_is_used_as_given(processor):
    """A PIL image is pixels the caller already holds: the same pixels as its array, orientation tag or not."""
    stored = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(with_orientation(Image.fromarray(stored), "PNG", 6)))
    out = processor(image, do_resize=False, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, normalised(stored), atol=1e-6, rtol=0)


def test_corrupt_exif_metadata_is_refused(processor):
    """An orientation that cannot be read is not guessed: the image is refused with a clear error."""
    data = encode(Image.new("RGB", (4, 4), RED), "PNG", exif=b"Exif\x00\x00XX garbage, not a TIFF header")
    with pytest.raises(ValueError, match="image 0 has corrupt EXIF metadata.*re-encode the image or strip"):
        processor(data)


# ------------------------------------------------------------------------------------------ multi-frame images
def two_frames(fmt: str) -> bytes:
    first, second = Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), BLUE)
    params = {"lossless": True} if fmt == "WEBP" else {}
    return encode(first, fmt, save_all=True, append_images=[second], **params)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_a_multi_frame_image_gives_its_first_frame(processor, fmt):
    data = two_frames(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = processor(data, do_resize=False, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, normalised(np.full((4, 6, 3), RED, np.uint8)), atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------------ bounded `size`
BAD_SIZES = {
    "too-high": (
        {"height": MAX_IMAGE_SIDE + 1, "width": 32},
        rf"height={MAX_IMAGE_SIDE + 1}.*at most {MAX_IMAGE_SIDE}",
    ),
    "huge": ({"height": 100_000, "width": 100_000}, rf"at most {MAX_IMAGE_SIDE}"),
    "zero": (0, r"height=0.*between 1 and"),
    "negative": ({"height": 32, "width": -3}, r"width=-3.*between 1 and"),
    "float": ({"height": 32.5, "width": 32}, r"height=32.5.*an int"),
    "bool": (True, r"height=True.*an int"),
    "aspect-ratio": ({"shortest_edge": 32}, r"fixed output size.*\{'height': H, 'width': W\}"),
}


@pytest.mark.parametrize("case", sorted(BAD_SIZES))
def test_size_out_of_bounds_is_refused_by_the_constructor(case):
    size, message = BAD_SIZES[case]
    with pytest.raises(ValueError, match=message):
        SonettImageProcessor(size=size)


@pytest.mark.parametrize("name", ["crop_size", "pad_size"])
def test_crop_and_pad_sizes_are_bounded_too(name):
    with pytest.raises(ValueError, match=rf"{name} height=100000.*at most {MAX_IMAGE_SIDE}"):
        SonettImageProcessor(**{name: {"height": 100_000, "width": 100_000}})
    with pytest.raises(ValueError, match=rf"{name} width=50000.*at most {MAX_IMAGE_SIDE}"):
        SonettImageProcessor()(Image.new("RGB", (4, 4)), **{name: {"height": 8, "width": 50_000}})


def test_the_largest_size_is_accepted():
    assert dict(SonettImageProcessor(size=MAX_IMAGE_SIDE).size) == {"height": MAX_IMAGE_SIDE, "width": MAX_IMAGE_SIDE}


@pytest.mark.parametrize("loader", ["class", "auto"])
def test_size_out_of_bounds_is_refused_from_a_saved_folder(tmp_path, loader):
    SonettImageProcessor().save_pretrained(tmp_path)
    config_path = tmp_path / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["size"] = {"height": 100_000, "width": 100_000}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"size height=100000.*at most {MAX_IMAGE_SIDE}"):
        if loader == "class":
            SonettImageProcessor.from_pretrained(tmp_path)
        else:
            AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)


def test_size_out_of_bounds_is_refused_per_call(processor):
    with pytest.raises(ValueError, match=rf"width=50000.*at most {MAX_IMAGE_SIDE}"):
        processor(Image.new("RGB", (4, 4)), size={"height": 32, "width": 50_000})

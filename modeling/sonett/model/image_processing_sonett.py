"""Sonett's image processor: any image in, `pixel_values` (num_images, 3, H, W) float32 out.

It runs on the PIL backend (no torchvision). Every input is first decoded into an 8-bit RGB image, with strict
checks that name the bad image and the fix:

- PIL images of any mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I, F ...). Transparency is composited onto
  white; 16-bit modes are scaled from [0, 65535] to [0, 255].
- numpy arrays and torch tensors shaped (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}, or 4-d batches of them.
  uint8 values are used as they are, floats must lie in [0, 1], uint16 is 16-bit, other integers must lie in
  [0, 255]. When both end axes could hold the channels (a side of 1, 3 or 4 pixels), the one holding 3 wins, then
  numpy arrays are read channels-last and torch tensors channels-first; pass `input_data_format` to say which.
- encoded images: bytes, file paths (str or os.PathLike), binary file objects and `data:image/...;base64,` URIs
  (URLs are refused: nothing is downloaded). They are untrusted data, so only the raster formats in
  `ALLOWED_IMAGE_FORMATS` (PNG, JPEG, GIF, BMP, TIFF, WebP) are decoded, decided from the header: EPS and
  PostScript (which PIL decodes by running Ghostscript), ICO, PPM, PSD and every other format are refused, naming
  the format when its magic bytes tell it. An image with more than `max_image_pixels` pixels is refused *before*
  it is decoded. A file path is read lazily, so a small image followed by a lot of data costs what the decoder
  reads, not the file size. A corrupt or truncated file raises instead of giving a partly grey image (as long as
  the process-wide `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` stays False, its default). The EXIF orientation is applied
  (as `transformers.image_utils.load_image` does; corrupt EXIF metadata is refused), and a multi-frame image
  (animated GIF/PNG/WebP, multi-page TIFF) gives its first frame; the other frames are never decoded.

PIL images are used as given (their EXIF orientation is not applied: the caller holds the pixels, and a PIL image
gives the same output as its numpy array); one that is still lazy (opened, not yet decoded) must be of an allowed
format, since decoding it here would run its decoder.

The output `size` is a fixed {"height", "width"} of 1 to `MAX_IMAGE_SIDE` pixels each, checked in the
constructor (so also in `from_pretrained`) and per call.

Then the PIL backend resizes (bilinear), rescales by 1/255 and normalises (mean = std = 0.5, so pixels land in
[-1, 1]).
"""

import base64
import binascii
import io
import logging
import os
import struct
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# The raster formats decoded from untrusted bytes (PIL format names); everything else is refused from the header.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
_ALLOWED_NAMES = "PNG, JPEG, GIF, BMP, TIFF or WebP"
_DECODED_FORMATS = frozenset(ALLOWED_IMAGE_FORMATS) | {"MPO"}  # PIL opens multi-picture JPEGs as MPO
# The largest output side (`size`): 4096 x 4096 is 192 MiB of float32 pixel values per image.
MAX_IMAGE_SIDE = 4096
_SIZE_KEYS = ("height", "width")
_HEADER_BYTES = 30  # enough for PIL's magic-byte checks (16) and the WebP canvas size (30)
ACCEPTED_CHANNELS = (1, 3, 4)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ACCEPTED_KINDS = (
    "a PIL.Image, a numpy array or torch tensor shaped (H, W), (H, W, C) or (C, H, W), encoded image bytes, "
    "a file path or a list of these"
)


class SonettImagesKwargs(ImagesKwargs, total=False):
    """Call-time keyword arguments of `SonettImageProcessor`: the standard image kwargs plus the bomb limit."""

    max_image_pixels: int | None


def is_image_batch(value: Any) -> bool:
    """True for a 4-d numpy array or torch tensor: a stack of images along its first axis."""
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4


def flatten_images(images: Any) -> list[Any]:
    """Flatten nested lists/tuples and 4-d array/tensor batches into a flat list of single images, in order.

    Args:
        images: one image, a 4-d batch (N, ...) or a (nested) list of these.

    Returns:
        A flat list with one entry per image; the entries are not decoded or checked yet.
    """
    if isinstance(images, (list, tuple)):
        flat: list[Any] = []
        for item in images:
            flat.extend(flatten_images(item))
        return flat
    if is_image_batch(images):
        return list(images)
    return [images]


def _channel_error(label: str, shape: tuple[int, ...], channels: int) -> ValueError:
    return ValueError(
        f"{label} has {channels} channels (shape {shape}); pass 1 (grey), 3 (RGB) or 4 (RGBA) channels, "
        "laid out as (H, W), (H, W, C) or (C, H, W)"
    )


class SonettImageProcessor(PilBackend):
    r"""Image processor of Sonett (PIL backend): converts to RGB, resizes, rescales and normalises.

    Args:
        max_image_pixels: the largest width * height accepted. Encoded images over it are refused before they are
            decoded (a decompression bomb guard, independent of PIL's own global `Image.MAX_IMAGE_PIXELS`); decoded
            arrays and PIL images over it are refused too. Saved with the processor.
        **kwargs: the standard image-processor options (`size`, `resample`, `do_resize`, `do_rescale`,
            `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, `do_convert_rgb`).

    Calling it on images returns a `BatchFeature` with `pixel_values`: float32 (num_images, 3, H, W) with
    `return_tensors="pt"` (or "np"), or a list of (3, H, W) float32 arrays without `return_tensors`.
    """

    valid_kwargs = SonettImagesKwargs
    model_input_names = ["pixel_values"]

    size = {"height": 32, "width": 32}
    resample = PILImageResampling.BILINEAR
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_convert_rgb = True
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(self, **kwargs: Unpack[SonettImagesKwargs]) -> None:
        super().__init__(**kwargs)
        self._check_limit(self.max_image_pixels)
        self._check_output_sizes(size=self.size, crop_size=self.crop_size, pad_size=self.pad_size)

    @staticmethod
    def _check_output_sizes(**sizes: Any) -> None:
        """`size` (and `crop_size` / `pad_size` when set) must be a fixed {"height", "width"} of ints, each in
        [1, MAX_IMAGE_SIDE]: the output of every image is then bounded, whatever its input size."""
        for name, size in sizes.items():
            if size is None and name != "size":
                continue
            given = {key: value for key, value in dict(size or {}).items() if value is not None}
            if set(given) != set(_SIZE_KEYS):
                raise ValueError(
                    f"{name}={given} is not a fixed output size: Sonett resizes every image to one height x width; "
                    f"pass {name}={{'height': H, 'width': W}} (or one int for a square)."
                )
            for key in _SIZE_KEYS:
                value = given[key]
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise ValueError(f"{name} {key}={value!r} must be an int number of pixels, e.g. {key}=32.")
                if not 1 <= value <= MAX_IMAGE_SIDE:
                    raise ValueError(
                        f"{name} {key}={value} must be between 1 and {MAX_IMAGE_SIDE} pixels (at most "
                        f"{MAX_IMAGE_SIDE}: one {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} image is 192 MiB of float32 pixel "
                        "values); pass the side the vision encoder reads (its image_size, e.g. 32)."
                    )

    def _validate_preprocess_kwargs(self, **kwargs: Any) -> None:
        """The standard checks, plus the bounds of a per-call `size`, `crop_size` and `pad_size`."""
        super()._validate_preprocess_kwargs(**kwargs)
        self._check_output_sizes(
            size=kwargs.get("size"), crop_size=kwargs.get("crop_size"), pad_size=kwargs.get("pad_size")
        )

    @staticmethod
    def _check_limit(limit: Any) -> int:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"max_image_pixels must be a positive int (width * height), got {limit!r}")
        return limit

    # ----------------------------------------------------------------------------------------------- decoding
    def _prepare_image_like_inputs(
        self,
        images: Any,
        *args: Any,
        expected_ndims: int = 3,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """Decode and check every image. Returns one uint8 (3, H, W) array per image, in input order."""
        flat = flatten_images(images)
        if not flat:
            raise ValueError(f"No images were given; pass {_ACCEPTED_KINDS}.")
        logger.debug("processing %d images", len(flat))
        limit = self._check_limit(kwargs.get("max_image_pixels") or self.max_image_pixels)
        do_convert_rgb = kwargs.get("do_convert_rgb")
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        input_data_format = kwargs.get("input_data_format")
        return [
            np.moveaxis(
                self.load_rgb_image(
                    image,
                    label=f"image {index}",
                    max_image_pixels=limit,
                    do_convert_rgb=do_convert_rgb,
                    input_data_format=input_data_format,
                ),
                -1,
                0,
            )
            for index, image in enumerate(flat)
        ]

    def process_image(self, image: Any, do_convert_rgb: bool | None = None, **kwargs: Any) -> np.ndarray:
        """Decode and check one image; returns uint8 (3, H, W)."""
        rgb = self.load_rgb_image(
            image,
            max_image_pixels=self._check_limit(kwargs.get("max_image_pixels") or self.max_image_pixels),
            do_convert_rgb=self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb,
            input_data_format=kwargs.get("input_data_format"),
        )
        return np.moveaxis(rgb, -1, 0)

    def load_rgb_image(
        self,
        image: Any,
        label: str = "image 0",
        max_image_pixels: int | None = None,
        do_convert_rgb: bool = True,
        input_data_format: str | ChannelDimension | None = None,
    ) -> np.ndarray:
        """Turn one input of any accepted kind into an RGB uint8 array (H, W, 3).

        Raises:
            TypeError: `image` is not an image kind at all.
            ValueError: the image is corrupt, truncated, empty, too large, or has an unusable layout or values.
        """
        limit = self.max_image_pixels if max_image_pixels is None else max_image_pixels
        if isinstance(image, Image.Image):
            self._check_decodable(image, label)
            pil = image
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            pil = self._array_to_pil(image, label, limit, do_convert_rgb, input_data_format)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            return self._decode(io.BytesIO(bytes(image)), label, limit, do_convert_rgb)
        elif isinstance(image, (str, os.PathLike)):
            return self._decode_location(image, label, limit, do_convert_rgb)
        elif hasattr(image, "read"):
            return self._decode(image, label, limit, do_convert_rgb)
        else:
            raise TypeError(
                f"{label} is of type {type(image).__name__}, which is not an image; pass {_ACCEPTED_KINDS}."
            )
        return self._pil_to_rgb(pil, label, limit, do_convert_rgb)

    @staticmethod
    def _check_size(width: int, height: int, label: str, limit: int) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(
                f"{label} is empty ({width}x{height} pixels); pass an image at least 1 pixel wide and high."
            )
        if width * height > limit:
            raise ValueError(
                f"{label} has {width}x{height} = {width * height} pixels, over max_image_pixels={limit} "
                "(a guard against decompression bombs); downscale the image or raise max_image_pixels."
            )

    @staticmethod
    def _check_decodable(pil: Image.Image, label: str) -> None:
        """A PIL image that is still lazy (opened, not decoded) would be decoded here: only allowed formats are."""
        if getattr(pil, "tile", None) and pil.format not in _DECODED_FORMATS:
            raise ValueError(
                f"{label} is an image in the {pil.format} format, not decoded yet; only {_ALLOWED_NAMES} images are "
                "decoded here (other decoders can run external programs, e.g. Ghostscript for EPS). Convert it to "
                "PNG with a tool you trust, or decode it yourself first (image.load()) if you trust its source."
            )

    def _decode_location(self, location: str | os.PathLike, label: str, limit: int, do_convert_rgb: bool) -> np.ndarray:
        """A data URI or a file path -> RGB uint8 (H, W, 3). A file is read lazily, never all at once."""
        text = os.fspath(location)
        if isinstance(text, bytes):
            text = text.decode()
        if text.startswith("data:"):
            header, _, payload = text.partition(",")
            if ";base64" not in header:
                raise ValueError(f"{label} is a data URI without base64 data; pass 'data:image/...;base64,...'.")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"{label} is a data URI whose base64 data is invalid ({error}).") from error
            return self._decode(io.BytesIO(data), label, limit, do_convert_rgb)
        if text.startswith(("http://", "https://")):
            raise ValueError(
                f"{label} is a URL ({text[:80]}); this processor does not download: fetch the file and pass its "
                "bytes, its path or a PIL image."
            )
        if not os.path.isfile(text):
            raise ValueError(
                f"{label} is the string {text[:80]!r}, which is not an existing image file; pass {_ACCEPTED_KINDS}."
            )
        with open(text, "rb") as handle:  # decoded while open: the decoder reads what it needs
            return self._decode(handle, label, limit, do_convert_rgb)

    def _decode(self, stream: IO[bytes], label: str, limit: int, do_convert_rgb: bool) -> np.ndarray:
        """Encoded image -> RGB uint8 (H, W, 3): header checks, decoding of the first frame, EXIF orientation."""
        pil = self._open_encoded(stream, label, limit)
        self._load(pil, label)
        try:
            ImageOps.exif_transpose(pil, in_place=True)
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error) as error:
            raise ValueError(
                f"{label} has corrupt EXIF metadata ({type(error).__name__}: {error}), so its orientation is "
                "unknown; re-encode the image or strip its metadata."
            ) from error
        return self._pil_to_rgb(pil, label, limit, do_convert_rgb)

    def _open_encoded(self, stream: IO[bytes], label: str, limit: int) -> Image.Image:
        """Read the header and decide from it: an allowed format within `limit` pixels, or a clear error.

        Nothing is decoded here; WebP (whose decoder takes its whole input at once) gets only its RIFF payload.
        """
        try:
            stream.seek(0)  # PIL reads from the start of a stream
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both: an unseekable stream
            stream = io.BytesIO(stream.read())
        header = stream.read(_HEADER_BYTES)
        if not isinstance(header, bytes):
            raise ValueError(f"{label} is a text stream; open the file in binary mode ('rb') or pass its path.")
        stream.seek(0)
        if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
            stream = self._webp_payload(stream, header, label, limit)
        try:
            pil = Image.open(stream, formats=ALLOWED_IMAGE_FORMATS)
        except Image.DecompressionBombError as error:
            raise ValueError(
                f"{label} is too large to decode safely ({error}); downscale the image before passing it."
            ) from error
        except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
            refused = _sniff_refused_format(header)
            if refused:
                raise ValueError(
                    f"{label} looks like an image in the {refused} format (from its header); only {_ALLOWED_NAMES} "
                    "images are decoded (other decoders can run external programs, e.g. Ghostscript for EPS). "
                    "Convert it to PNG with a tool you trust."
                ) from error
            raise ValueError(
                f"{label} could not be read as an image ({error}); pass a valid {_ALLOWED_NAMES} file, or re-encode it."
            ) from error
        self._check_size(pil.width, pil.height, label, limit)
        return pil

    def _webp_payload(self, stream: IO[bytes], header: bytes, label: str, limit: int) -> io.BytesIO:
        """WebP's decoder reads all its input and allocates the canvas at open: check the canvas size from the
        header first, then read only the RIFF payload the header declares (not what follows it)."""
        size = _webp_canvas_size(header)
        if size is not None:
            self._check_size(*size, label, limit)
        riff_end = 8 + int.from_bytes(header[4:8], "little")
        payload = io.BytesIO()
        while payload.tell() < riff_end and (chunk := stream.read(min(riff_end - payload.tell(), 1 << 20))):
            payload.write(chunk)
        payload.seek(0)
        return payload

    def _array_to_pil(
        self,
        array: np.ndarray | torch.Tensor,
        label: str,
        limit: int,
        do_convert_rgb: bool,
        input_data_format: str | ChannelDimension | None,
    ) -> Image.Image:
        """(H, W), (H, W, C) or (C, H, W) array/tensor -> PIL image of mode L, RGB or RGBA (8 bits per channel)."""
        channels_first_default = isinstance(array, torch.Tensor)
        if isinstance(array, torch.Tensor):
            tensor = array.detach().cpu()
            if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
                tensor = tensor.float()
            try:
                array = tensor.numpy()
            except TypeError as error:  # dtypes numpy lacks (e.g. unsigned 32-bit on old torch)
                raise ValueError(f"{label} is a tensor of dtype {tensor.dtype}; pass uint8 or float values.") from error
        shape = tuple(array.shape)
        if array.ndim == 2:
            array = array[:, :, None]
        elif array.ndim == 3:
            array = self._to_channels_last(array, label, shape, channels_first_default, input_data_format)
        else:
            raise ValueError(
                f"{label} has shape {shape} ({array.ndim} dims); pass (H, W), (H, W, C) or (C, H, W), or a 4-d batch."
            )
        height, width, channels = array.shape
        self._check_size(width, height, label, limit)
        if channels not in ACCEPTED_CHANNELS:
            raise _channel_error(label, shape, channels)
        pixels = np.ascontiguousarray(self._to_uint8(array, label))
        return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)  # mode L, RGB or RGBA

    @staticmethod
    def _to_channels_last(
        array: np.ndarray,
        label: str,
        shape: tuple[int, ...],
        channels_first_default: bool,
        input_data_format: str | ChannelDimension | None,
    ) -> np.ndarray:
        if input_data_format is not None:
            first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
        else:
            first_fits, last_fits = shape[0] in ACCEPTED_CHANNELS, shape[-1] in ACCEPTED_CHANNELS
            if first_fits and last_fits:  # ambiguous: prefer the axis that holds 3 (RGB), then the convention
                first = shape[0] == 3 if (shape[0] == 3) != (shape[-1] == 3) else channels_first_default
            elif first_fits or last_fits:
                first = first_fits
            else:  # no axis can be the channel axis: report the smaller end axis as the channel count
                raise _channel_error(label, shape, min(shape[0], shape[-1]))
        return np.moveaxis(array, 0, -1) if first else array

    @staticmethod
    def _to_uint8(array: np.ndarray, label: str) -> np.ndarray:
        """Values -> uint8: uint8 as is, bool -> {0, 255}, uint16 scaled, other ints in [0, 255], floats in [0, 1]."""
        dtype = array.dtype
        if dtype == np.uint8:
            return array
        if dtype == np.bool_:
            return array.astype(np.uint8) * 255
        if dtype == np.uint16:
            return np.round(array.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
        if np.issubdtype(dtype, np.integer):
            low, high = int(array.min()), int(array.max())
            if low < 0 or high > 255:
                raise ValueError(
                    f"{label} has integer values in [{low}, {high}]; pass uint8 values in [0, 255] "
                    "(or uint16 for 16-bit images, or floats in [0, 1])."
                )
            return array.astype(np.uint8)
        if np.issubdtype(dtype, np.floating):
            if not np.isfinite(array).all():
                raise ValueError(f"{label} contains NaN or infinite values; pass finite floats in [0, 1].")
            low, high = float(array.min()), float(array.max())
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"{label} has float values in [{low:g}, {high:g}]; pass floats in [0, 1] "
                    "or uint8 values in [0, 255]."
                )
            return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
        raise ValueError(f"{label} has dtype {dtype}; pass uint8 values in [0, 255] or floats in [0, 1].")

    def _pil_to_rgb(self, pil: Image.Image, label: str, limit: int, do_convert_rgb: bool) -> np.ndarray:
        """Decode (if still lazy) and convert a PIL image to an RGB uint8 array (H, W, 3)."""
        self._check_size(pil.width, pil.height, label, limit)
        self._load(pil, label)
        if pil.mode == "RGB" and "transparency" not in pil.info:
            return np.asarray(pil, dtype=np.uint8)
        if not do_convert_rgb:
            raise ValueError(
                f"{label} has PIL mode {pil.mode!r}, not RGB, and do_convert_rgb=False; pass do_convert_rgb=True "
                "or RGB images."
            )
        if pil.mode in _SIXTEEN_BIT_MODES or pil.mode in ("I", "F"):
            pil = Image.fromarray(self._high_depth_to_uint8(pil, label))  # mode L
        if pil.mode == "La":  # premultiplied grey + alpha: PIL converts it to RGBA only through LA
            pil = pil.convert("LA")
        has_alpha = "A" in pil.getbands() or "transparency" in pil.info
        try:
            if has_alpha:
                rgba = pil.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                rgb = pil.convert("RGB")
        except (ValueError, OSError) as error:
            raise ValueError(
                f"{label} has PIL mode {pil.mode!r}, which cannot be converted to RGB ({error}); convert it to "
                "RGB first."
            ) from error
        return np.asarray(rgb, dtype=np.uint8)

    @staticmethod
    def _load(pil: Image.Image, label: str) -> None:
        """Decode a lazy PIL image (its current frame) in place; errors name the image."""
        try:
            pil.load()
        except Image.DecompressionBombError as error:
            raise ValueError(
                f"{label} is too large to decode safely ({error}); downscale the image before passing it."
            ) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ValueError(
                f"{label} could not be decoded: the file is truncated or corrupt ({error}); re-download or "
                "re-encode it."
            ) from error

    @staticmethod
    def _high_depth_to_uint8(pil: Image.Image, label: str) -> np.ndarray:
        """16-bit and 32-bit integer modes are read as 16-bit ([0, 65535]); float mode 'F' must lie in [0, 1]."""
        values = np.asarray(pil)
        if pil.mode == "F":
            return SonettImageProcessor._to_uint8(values.astype(np.float32), label)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"{label} has PIL mode {pil.mode!r} with values in [{low}, {high}]; pass 8-bit or 16-bit images."
            )
        return np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)

    def _preprocess(self, images: list[np.ndarray], **kwargs: Any) -> BatchFeature:
        """uint8 (3, h, w) arrays -> BatchFeature(pixel_values float32 (N, 3, H, W)), via the PIL backend."""
        return_tensors = kwargs.pop("return_tensors", None)
        features = super()._preprocess(images, return_tensors=None, **kwargs)
        pixel_values = [np.asarray(image, dtype=np.float32) for image in features["pixel_values"]]
        if return_tensors is None:
            return BatchFeature(data={"pixel_values": pixel_values})
        return BatchFeature(data={"pixel_values": np.stack(pixel_values)}, tensor_type=return_tensors)


def _sniff_refused_format(header: bytes) -> str | None:
    """The PIL format name that `header` (a file's first bytes) looks like, when it is not an allowed format.

    Only PIL's cheap magic-byte checks run (no format parser); None when an allowed format claims the header or no
    format recognises it.
    """
    Image.init()
    prefix = header[:16]  # what PIL's own checks see
    for name in (*ALLOWED_IMAGE_FORMATS, *Image.OPEN):
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        try:
            claimed = accept is not None and accept(prefix)
        except Exception:  # a format's check that cannot read this prefix simply does not claim it
            continue
        if claimed and not isinstance(claimed, str):  # a string is PIL's "support not installed" note
            return None if name in ALLOWED_IMAGE_FORMATS else name
    return None


def _webp_canvas_size(header: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP file's first 30 bytes (VP8, VP8L or VP8X chunk), without decoding."""
    chunk = header[12:16]
    if chunk == b"VP8 " and len(header) >= 30 and header[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(header[26:28], "little") & 0x3FFF, int.from_bytes(header[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(header) >= 25 and header[20] == 0x2F:
        bits = int.from_bytes(header[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(header) >= 30:
        return int.from_bytes(header[24:27], "little") + 1, int.from_bytes(header[27:30], "little") + 1
    return None


SonettImageProcessor.register_for_auto_class()

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "SonettImageProcessor",
    "flatten_images",
    "is_image_batch",
]

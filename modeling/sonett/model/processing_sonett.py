"""Sonett's processor: the tokenizer and the image processor together, for prompts that interleave text and images.

Each image token (`<|image|>`) in the text stands for exactly one image and stays one token: Sonett reads the
images through cross-attention (as mllama does), so the text is never expanded. The processor returns, besides the
token ids, the images of each sample stacked along an image axis and a `cross_attention_mask` that says which
images each text position may see: image n of a sample becomes visible at its marker token and stays visible for
the rest of that sample.
"""

import json
import logging
from typing import Any

import numpy as np
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import CONFIG_NAME, cached_file

from .image_processing_sonett import SonettImageProcessor, flatten_images

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_TOKEN = "<|image|>"
_IGNORED_TEXT_KWARGS = ("return_text_replacement_offsets",)
# Files that hold a saved image processor; a folder without any of them is text-only.
IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _config_has_vision(name_or_path: Any, lookup: dict) -> bool:
    """Whether the folder's or repository's config.json describes a vision model (False when it has none).

    A connection error is not caught: whether images are expected must come from the config, not from which files
    happen to be reachable.
    """
    config_file = cached_file(name_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **lookup)
    if config_file is None:
        return False
    with open(config_file, encoding="utf-8") as handle:
        values = json.load(handle)
    return isinstance(values, dict) and values.get("vision_config") is not None


class SonettProcessor(ProcessorMixin):
    r"""Tokenizer plus image processor for Sonett.

    Args:
        image_processor: a `SonettImageProcessor` (a default one when None).
        tokenizer: Sonett's tokenizer; it must know the image token (`tokenizer.image_token`, else `<|image|>`).
        chat_template: a Jinja chat template; defaults to the tokenizer's, which renders `{"type": "image"}`
            content parts as the image token.

    Calling it returns a `BatchFeature` with
        - `input_ids`, `attention_mask`: (B, T), padded on `tokenizer.padding_side`;
        - only when images are given: `pixel_values` float32 (B, N, 3, H, W), N the most images of any sample,
          zero-filled where a sample has fewer; `image_mask` long (B, N), 1 for a real image; and
          `cross_attention_mask` long (B, T, N), 1 where position t may see image n of its sample (the image
          exists and its marker sits at a position <= t), 0 elsewhere, padding positions included.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError("SonettProcessor needs a tokenizer.")
        if image_processor is None:
            image_processor = SonettImageProcessor()
        self.image_token = getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if not isinstance(self.image_token_id, int) or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {self.image_token} token; train it with Sonett's special tokens or add it "
                "with `tokenizer.add_special_tokens`."
            )
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """Load the processor of a multimodal folder; a text-only folder (no image processor saved) gives its
        tokenizer, as `AutoProcessor` does for every text-only model.

        Importing `sonett` registers this class with `AutoProcessor` for the `sonett` model type, which text-only
        folders share; without this fallback `AutoProcessor.from_pretrained(text_folder)` would fail looking for
        an image processor.
        """
        lookup = {key: kwargs[key] for key in ("subfolder", "revision", "cache_dir", "token") if key in kwargs}
        lookup.update({key: kwargs[key] for key in ("local_files_only", "force_download", "proxies") if key in kwargs})
        if _config_has_vision(pretrained_model_name_or_path, lookup):
            # A multimodal model: its processor files must load (an unreachable one raises naming it), never a
            # tokenizer that would silently drop the images.
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        has_images = any(
            cached_file(
                pretrained_model_name_or_path,
                name,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **lookup,
            )
            for name in IMAGE_PROCESSOR_FILES
        )
        if not has_images:
            return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        """Everything the model's forward reads from this processor's output."""
        return ["input_ids", "attention_mask", "pixel_values", "image_mask", "cross_attention_mask"]

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        videos: Any = None,
        audio: Any = None,
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        r"""Tokenize `text` and process the images its `<|image|>` markers stand for.

        Args:
            text: one prompt or a batch of prompts (B of them). Each image marker stands for exactly one image.
            images: None; one image; a flat list of images in marker order across the batch; or a list of lists,
                one list per sample. Any kind `SonettImageProcessor` accepts (a 4-d array counts as a list).
            videos, audio: must be None (Sonett reads neither).
            padding: passed to the tokenizer; padding follows `tokenizer.padding_side`.
            return_tensors: "pt" (default), "np" or None (lists; `pixel_values` stays a numpy array).
            **kwargs: tokenizer kwargs (`truncation`, `max_length`, `add_special_tokens`, ...), image-processor
                kwargs (`size`, `max_image_pixels`, ...), or `text_kwargs` / `images_kwargs` dicts.

        Returns:
            `BatchFeature` with `input_ids` (B, T), `attention_mask` (B, T) and, when images are given,
            `pixel_values` (B, N, 3, H, W) float32, `image_mask` (B, N) and `cross_attention_mask` (B, T, N).
            A text-only call returns exactly what the tokenizer returns.

        Raises:
            ValueError: the number of markers differs from the number of images (both counts are given, per
                sample when images are given per sample), or an image is invalid.
        """
        if videos is not None or audio is not None:
            raise ValueError("Sonett reads text and images only; pass videos=None and audio=None.")
        if text is None:
            raise ValueError(
                f"Pass `text` with one {self.image_token} per image; SonettProcessor does not process images alone "
                "(use its image_processor for that)."
            )
        if not (isinstance(text, str) or (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text))):
            raise ValueError("`text` must be a string or a list of strings.")

        merged = self._merge_kwargs(
            tokenizer_init_kwargs=self.tokenizer.init_kwargs, padding=padding, return_tensors=return_tensors, **kwargs
        )
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        for key in _IGNORED_TEXT_KWARGS:  # markers are never expanded, so there are no replacement offsets
            text_kwargs.pop(key, None)
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", False)

        single = isinstance(text, str)
        encoding = self.tokenizer(text if single else list(text), **text_kwargs)  # lists; tensors come at the end
        data: dict[str, Any] = {key: [value] if single else value for key, value in encoding.items()}
        masks = self._masks(data)
        markers = [self._marker_positions(ids, mask) for ids, mask in zip(data["input_ids"], masks)]
        per_sample = self._images_per_sample(images, [len(m) for m in markers], bool(text_kwargs.get("truncation")))
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])

        if not any(per_sample):  # text only: exactly what the tokenizer gives
            if single and return_tensors is None:  # the tokenizer gives flat lists for one string
                data = {key: value[0] for key, value in data.items()}
            elif return_tensors is not None:  # int64 even for empty prompts (an empty list would become float)
                data = {
                    key: np.asarray(value, dtype=np.int64) if len({len(row) for row in value}) == 1 else value
                    for key, value in data.items()
                }
            return BatchFeature(data, tensor_type=return_tensors)

        lengths = {len(ids) for ids in data["input_ids"]}
        if len(lengths) > 1:
            raise ValueError(
                "The prompts tokenize to different lengths and padding is off; pass padding=True (the default) so "
                "that images and their cross-attention mask can be batched."
            )
        logger.debug("images per sample: %s", [len(sample) for sample in per_sample])
        data.update(self._image_inputs(per_sample, markers, masks, images_kwargs))
        if return_tensors is None:
            data["image_mask"] = data["image_mask"].tolist()
            data["cross_attention_mask"] = data["cross_attention_mask"].tolist()
        return BatchFeature(data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _masks(data: dict[str, Any]) -> list[list[int]]:
        if "attention_mask" in data:
            return data["attention_mask"]
        return [[1] * len(ids) for ids in data["input_ids"]]

    def _marker_positions(self, ids: list[int], mask: list[int]) -> list[int]:
        """Positions of this sample's image tokens (padding excluded), in order."""
        return [t for t, (token, keep) in enumerate(zip(ids, mask)) if keep and token == self.image_token_id]

    def _images_per_sample(self, images: Any, marker_counts: list[int], truncation: bool = False) -> list[list[Any]]:
        """Split `images` into one list per sample and check them against the marker counts.

        `images` is None, one image, a flat list in marker order across the batch, or a list of per-sample lists.
        """
        batch, total = len(marker_counts), sum(marker_counts)
        token = self.image_token
        hint = f"each {token} stands for exactly one image" + (
            " (truncation may have cut markers off)" if truncation else ""
        )
        if images is None:
            if total:
                raise ValueError(
                    f"The text has {_count(total, token + ' marker')} (per sample: {marker_counts}) but no images "
                    f"were given; pass one image per {token}, or remove the markers."
                )
            return [[] for _ in range(batch)]
        nested = isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)
        if nested:
            if not all(isinstance(item, (list, tuple)) for item in images):
                raise ValueError(
                    "`images` mixes lists and single images; pass either a flat list (in marker order across the "
                    "batch) or one list of images per sample."
                )
            if len(images) != batch:
                raise ValueError(
                    f"`images` holds {len(images)} per-sample lists but the text has {batch} samples; pass one list "
                    "per sample (an empty list for a sample without images)."
                )
            per_sample = [flatten_images(list(item)) for item in images]
            for index, (count, sample_images) in enumerate(zip(marker_counts, per_sample)):
                if count != len(sample_images):
                    raise ValueError(
                        f"Sample {index} has {_count(count, token + ' marker')} in its text but "
                        f"{_count(len(sample_images), 'image')} given for it; {hint}."
                    )
            return per_sample
        flat = flatten_images(images)
        if len(flat) != total:
            raise ValueError(
                f"The text has {_count(total, token + ' marker')} in total (per sample: {marker_counts}) but "
                f"{_count(len(flat), 'image')} given; {hint}."
            )
        per_sample, start = [], 0
        for count in marker_counts:
            per_sample.append(flat[start : start + count])
            start += count
        return per_sample

    def _image_inputs(
        self,
        per_sample: list[list[Any]],
        markers: list[list[int]],
        attention_mask: list[list[int]],
        images_kwargs: dict[str, Any],
    ) -> dict[str, np.ndarray]:
        """pixel_values (B, N, 3, H, W) float32, image_mask (B, N) int64, cross_attention_mask (B, T, N) int64."""
        flat = [image for sample in per_sample for image in sample]
        pixels = self.image_processor(flat, return_tensors="np", **images_kwargs)["pixel_values"]
        batch, most = len(per_sample), max(len(sample) for sample in per_sample)
        length = len(attention_mask[0])
        pixel_values = np.zeros((batch, most, *pixels.shape[1:]), dtype=np.float32)
        image_mask = np.zeros((batch, most), dtype=np.int64)
        cross_attention_mask = np.zeros((batch, length, most), dtype=np.int64)
        positions = np.arange(length)
        start = 0
        for b, sample in enumerate(per_sample):
            count = len(sample)
            pixel_values[b, :count] = pixels[start : start + count]
            image_mask[b, :count] = 1
            start += count
            if count:
                visible = positions[:, None] >= np.asarray(markers[b])[None, :]  # (T, count)
                visible &= np.asarray(attention_mask[b], dtype=bool)[:, None]
                cross_attention_mask[b, :, :count] = visible
        return {"pixel_values": pixel_values, "image_mask": image_mask, "cross_attention_mask": cross_attention_mask}


SonettProcessor.register_for_auto_class()

__all__ = ["SonettProcessor"]

"""The bad-input matrix: every kind of bad input Sonett meets, refused through its public entry points with the
exception type and a message that names the problem and the fix (docs/design.md, invariant 10). No case may end in
a crash deep inside torch, a silent truncation or a wrong answer.

Sections: tokens and masks · images · configs · training data · files (model folders, checkpoints, memory files) ·
untrusted files (no pickle anywhere, no `torch.load` without `weights_only=True`).

Other test files hold more detailed checks of single entry points (test_inputs, test_image_processing,
test_processing, test_config, test_data, test_cache_file, test_training); this file lists the whole matrix in one place.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_model import PAD, VOCAB, random_ids, tiny_config, tiny_model
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file
from test_remote_code import NO_PACKAGE_PREAMBLE, fresh_process_env
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sonett import (
    SonettCache,
    SonettConfig,
    SonettForCausalLM,
    SonettForConditionalGeneration,
    SonettImageProcessor,
    SonettProcessor,
)
from sonett.data.corpus import check_data_files, load_corpus
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.evaluation.scoring import EvaluationArguments, load_evaluation_text
from sonett.hub.saving import write_model_folder
from sonett.inference.conversation import Conversation
from sonett.training.pretraining import PretrainArguments, pretrain, read_checkpoint, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IMAGE = 3  # the image marker id of the multimodal test model
VISION = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
CORPUS = ["a picture of a cat", "what is in this image?", "def add(a, b):\n    return a + b\n"] * 4


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


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


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


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

INVALID_FIELDS = {
    "zero-vocab": ({"vocab_size": 0}, r"vocab_size must be a positive integer, got 0"),
    "quoted-number": ({"hidden_size": "32"}, r"hidden_size must be an integer, got '32'; write it as a number"),
    "float-layers": ({"num_hidden_layers": 3.0}, r"num_hidden_layers must be an integer, got 3.0"),
    "heads": ({"num_attention_heads": 5}, r"num_attention_heads \(5\) must divide hidden_size \(32\)"),
    "kv-heads": ({"num_key_value_heads": 3}, r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    "layer-count": ({"layer_types": ["full_attention"]}, r"1 entries but num_hidden_layers is 3; give exactly one"),
    "layer-kind": (
        {"layer_types": ["full_attention", "convolution", "full_attention"]},
        r"layer_types\[1\] = 'convolution' is not a known layer kind; choose from",
    ),
    "window": ({"sliding_window": 1}, r"sliding_window must be >= 2"),
    "pad-id": ({"pad_token_id": VOCAB}, rf"pad_token_id = {VOCAB} lies outside the vocabulary.*set it to a token id"),
    "rope-type": (
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0}},
        r"rope_type 'longrope' .* is not supported; use one of",
    ),
    "feature-map": ({"linear_feature_map": "relu"}, r"linear_feature_map = 'relu'; choose from"),
    "hierarchy": (
        {"hierarchy": {"shorten_factor": 2, "start_layer": 0, "end_layer": 2}},
        r"shortened span must lie strictly inside",
    ),
    "cross-attention": ({"cross_attention_layers": [1]}, r"vision_config is None; give a vision_config"),
    "vision": (
        {"vision_config": {"image_size": 30, "patch_size": 4}},
        r"image_size \(30\) must be a multiple of patch",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_FIELDS))
@pytest.mark.parametrize("entry", ["SonettConfig", "SonettConfig.from_pretrained", "SonettForCausalLM.from_pretrained"])
def test_invalid_configs(saved, tmp_path, entry, case):
    overrides, message = INVALID_FIELDS[case]
    folder = shutil.copytree(saved / "complete", tmp_path / "folder")  # a complete folder whose config.json is edited
    values = json.loads((folder / "config.json").read_text())
    values.update(overrides)
    (folder / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        if entry == "SonettConfig":
            tiny_config("mixed", **overrides)
        elif entry == "SonettConfig.from_pretrained":
            SonettConfig.from_pretrained(folder)
        else:
            SonettForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("loader", [SonettConfig, SonettForCausalLM, SonettForConditionalGeneration])
def test_a_config_of_another_model_type_is_refused_not_half_loaded(llama_folder, loader):
    message = r"holds a config of model_type 'llama', not a Sonett config.*Load it with its own classes"
    with pytest.raises(ValueError, match=message):
        loader.from_pretrained(llama_folder)


def test_a_config_json_that_is_not_json(saved, tmp_path):
    folder = shutil.copytree(saved / "complete", tmp_path / "folder")
    (folder / "config.json").write_text("{not json")
    for loader in (SonettConfig, SonettForCausalLM):
        with pytest.raises(OSError, match="config.json' is not a valid JSON file"):
            loader.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------------------------

BAD_DATA = {
    "missing-column": (
        "rows.jsonl",
        b'{"body": "def f(): pass"}\n',
        ValueError,
        r"no column 'text' \(columns: \['body'\]\); pass --text_column",
    ),
    "empty-file": ("empty.txt", b"", ValueError, r"empty\.txt is empty; give a file with at least one document"),
    "blank-documents": ("blank.txt", b"\n   \n\n", ValueError, r"no non-empty documents in column 'text'; put text"),
    "latin1-text": (
        "latin1.txt",
        "caf\xe9 au lait\n".encode("latin-1"),
        ValueError,
        r"line 1 is not valid UTF-8 \(byte 0xe9 at column 4\); re-encode",
    ),
    "latin1-jsonl": (
        "latin1.jsonl",
        '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"),
        ValueError,
        r"line 2 is not valid UTF-8.*re-encode",
    ),
    "broken-json": (
        "broken.jsonl",
        b'{"text": "ok"}\n{"text": \n',
        ValueError,
        r"line 2 is not valid JSON.*one JSON object per line",
    ),
    "not-an-object": (
        "list.jsonl",
        b'["a", "b"]\n',
        ValueError,
        r"line 1 is not a JSON object; write one object per line",
    ),
    "unsupported-suffix": (
        "rows.csv",
        b"text\nhello\n",
        ValueError,
        r"Unsupported or mixed data files \['\.csv'\]; use one of",
    ),
    "missing-file": (None, None, FileNotFoundError, r"Data files not found.*check the --data_files paths"),
}
# Problems of the rows rather than the file: `check_data_files` passes them, the loaders refuse them.
ROW_PROBLEMS = {"missing-column", "blank-documents"}


def data_file(tmp_path: Path, case: str) -> str:
    name, content, _, _ = BAD_DATA[case]
    if name is None:
        return str(tmp_path / "nowhere.txt")
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


@pytest.mark.parametrize("case", sorted(set(BAD_DATA) - ROW_PROBLEMS))
def test_bad_data_files_through_check_data_files(tmp_path, case):
    _, _, error, message = BAD_DATA[case]
    with pytest.raises(error, match=message):
        check_data_files([data_file(tmp_path, case)])


@pytest.mark.parametrize("case", sorted(BAD_DATA))
@pytest.mark.parametrize("entry", ["load_corpus", "evaluation", "pretrain"])
def test_bad_data_files_through_the_entry_points(tmp_path, entry, case):
    _, _, error, message = BAD_DATA[case]
    path = data_file(tmp_path, case)
    with pytest.raises(error, match=message):
        if entry == "load_corpus":
            load_corpus([path])
        elif entry == "evaluation":  # what scripts/evaluate.py scores
            load_evaluation_text(EvaluationArguments(model=str(tmp_path), data_files=[path]))
        else:  # scripts/train.py
            pretrain(PretrainArguments(data_files=[path], output_dir=str(tmp_path / "run"), report_to="none", cpu=True))
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# Files: model folders, training checkpoints, memory files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """A complete saved folder of the `model` fixture, and one of the same kinds with hidden_size 64."""
    root = tmp_path_factory.mktemp("saved")
    model.save_pretrained(root / "complete")
    tiny_model("mixed", hidden_size=64, intermediate_size=64).save_pretrained(root / "wider")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def break_no_weights(folder: Path, saved: Path) -> None:
    (folder / "model.safetensors").unlink()


def break_missing_tensor(folder: Path, saved: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def break_other_shapes(folder: Path, saved: Path) -> None:
    shutil.copy(saved / "wider" / "model.safetensors", folder / "model.safetensors")


def break_truncated(folder: Path, saved: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def break_missing_shard(folder: Path, saved: Path) -> None:
    (folder / "model.safetensors").unlink()
    for path in (saved / "sharded").iterdir():
        if path.name.startswith("model") and path.name != "model-00002-of-00008.safetensors":
            shutil.copy(path, folder / path.name)


def break_no_config(folder: Path, saved: Path) -> None:
    (folder / "config.json").unlink()


def break_pickle_only(folder: Path, saved: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save(load_file(saved / "complete" / "model.safetensors"), folder / "pytorch_model.bin")


BROKEN_FOLDERS = {
    "no-weights": (
        break_no_weights,
        OSError,
        r"has a config.json but no weights \(no model.safetensors\).*save_pretrained",
    ),
    "missing-tensor": (
        break_missing_tensor,
        ValueError,
        r"lacks 1 weights the model needs: model.layers.1.mlp.up_proj.weight.*allow_missing_weights=True",
    ),
    "other-shapes": (
        break_other_shapes,
        ValueError,
        r"does not fit this config: \d+ tensors have other shapes \(model.embed_tokens.weight \(97, 64\) in the "
        r"checkpoint vs \(97, 32\) in the model.*another hidden_size.*ignore_mismatched_sizes=True",
    ),
    "truncated": (break_truncated, OSError, r"truncated or corrupt.*force_download=True"),
    "missing-shard": (
        break_missing_shard,
        OSError,
        r"lacks 1 of the \d+ weight shards.*model-00002-of-.*save_pretrained",
    ),
    "no-config": (break_no_config, OSError, r"has weights but no config.json.*save the model again"),
    "pickle-only": (break_pickle_only, OSError, r"only pickle weights \(pytorch_model.bin\).*use_safetensors=False"),
}
# Without a config.json no Sonett code runs under the Auto classes: transformers' own error, which names the file.
AUTO_EXPECTED = {
    "no-config": (ValueError, r"Unrecognized model in .*Should have a `model_type` key in its config.json")
}
LOADERS = {
    "SonettForCausalLM": lambda folder, **kw: SonettForCausalLM.from_pretrained(folder, **kw),
    "AutoModelForCausalLM": lambda folder, **kw: AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, **kw
    ),
}


def broken_copy(saved: Path, tmp_path: Path, case: str) -> Path:
    folder = shutil.copytree(saved / "complete", tmp_path / case)
    BROKEN_FOLDERS[case][0](folder, saved)
    return folder


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_broken_model_folders_are_refused(saved, tmp_path, loader, case):
    folder = broken_copy(saved, tmp_path, case)
    _, error, message = BROKEN_FOLDERS[case]
    if loader == "AutoModelForCausalLM":
        error, message = AUTO_EXPECTED.get(case, (error, message))
    with pytest.raises(error, match=message):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_complete_folder_still_loads_identically(saved, model, loader):
    loaded = LOADERS[loader](saved / "complete")
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_opt_outs_load_and_report(saved, tmp_path, loader):
    folder = broken_copy(saved, tmp_path, "missing-tensor")
    loaded, info = LOADERS[loader](folder, allow_missing_weights=True, output_loading_info=True)
    assert info["missing_keys"] == {"model.layers.1.mlp.up_proj.weight"}
    assert loaded.model.layers[1].mlp.up_proj.weight.shape == (64, 32)
    folder = broken_copy(saved, tmp_path, "other-shapes")
    loaded, info = LOADERS[loader](folder, ignore_mismatched_sizes=True, output_loading_info=True)
    assert "model.embed_tokens.weight" in {name for name, _, _ in info["mismatched_keys"]}


# A fresh interpreter where `sonett` cannot be imported: the remote-code copy in each folder refuses the same way.
REMOTE_REFUSALS = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import json

    from transformers import AutoModelForCausalLM

    outcome = {}
    for folder in sys.argv[2:]:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            outcome[folder] = ["loaded", type(model).__module__]
        except Exception as error:  # the test compares type and message
            outcome[folder] = [type(error).__name__, str(error)]
    with open(sys.argv[1], "w") as handle:
        json.dump(outcome, handle)
    """
)


def test_the_remote_code_copy_refuses_broken_folders_too(saved, tmp_path):
    folders = {case: broken_copy(saved, tmp_path, case) for case in BROKEN_FOLDERS}
    script, out = tmp_path / "remote.py", tmp_path / "outcome.json"
    script.write_text(REMOTE_REFUSALS)
    paths = [str(saved / "complete"), *(str(f) for f in folders.values())]
    result = subprocess.run(
        [sys.executable, str(script), str(out), *paths],
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(out.read_text())
    kind, module = outcome[str(saved / "complete")]
    assert kind == "loaded" and module.startswith("transformers_modules"), outcome[str(saved / "complete")]
    for case, folder in folders.items():
        error, message = AUTO_EXPECTED.get(case, BROKEN_FOLDERS[case][1:])
        kind, text = outcome[str(folder)]
        assert kind == error.__name__ and re.search(message, text), (case, kind, text)


def fake_checkpoint(root: Path, name: str, files: dict[str, bytes], listed: dict[str, int] | None) -> Path:
    """A checkpoint folder as the state file describes it (`listed`: name -> size; None: no state file)."""
    folder = root / name
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    if listed is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"step": 4, "files": listed}))
    return folder


HALF_WRITTEN = {
    "partial": (
        "step_6.partial",
        {"model.safetensors": b"x"},
        {"model.safetensors": 1},
        r"half-written checkpoint.*resume from a complete",
    ),
    "no-state": (
        "step_6",
        {"model.safetensors": b"x"},
        None,
        r"not a complete checkpoint: it has no trainer_state.json",
    ),
    "missing-file": ("step_6", {}, {"optimizer.bin": 10}, r"damaged: optimizer.bin is missing\. Resume from another"),
    "short-file": (
        "step_6",
        {"optimizer.bin": b"12345"},
        {"optimizer.bin": 10},
        r"optimizer.bin has 5 bytes, 10 were written\. Resume",
    ),
}


@pytest.mark.parametrize("case", sorted(HALF_WRITTEN))
@pytest.mark.parametrize("entry", ["read_checkpoint", "resolve_checkpoint", "pretrain"])
def test_half_written_training_checkpoints_are_refused(tmp_path, entry, case):
    name, files, listed, message = HALF_WRITTEN[case]
    root = tmp_path / "run" / "checkpoints"
    folder = fake_checkpoint(root, name, files, listed)
    with pytest.raises(ValueError, match=message):
        if entry == "read_checkpoint":
            read_checkpoint(folder)
        elif entry == "resolve_checkpoint":
            resolve_checkpoint(str(folder), root)
        else:
            pretrain(
                PretrainArguments(
                    output_dir=str(tmp_path / "run"), resume_from_checkpoint=str(folder), report_to="none", cpu=True
                )
            )


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("memory") / "state.safetensors"
    with torch.no_grad():
        model(random_ids(1, 6), use_cache=True).cache.save(path)
    return path


@pytest.mark.parametrize("entry", ["SonettCache.load", "Conversation.load"])
def test_a_memory_file_from_another_config_is_refused(memory_file, tokenizer, entry):
    other = tiny_model("mixed", sliding_window=6)
    message = r"another config \(sliding_window: file 4 vs model 6\); load it with the model that wrote it"
    with pytest.raises(ValueError, match=message):
        if entry == "SonettCache.load":
            SonettCache.load(memory_file, other.config)
        else:
            Conversation.load(memory_file, other, tokenizer)


def test_a_damaged_or_foreign_memory_file_is_refused_without_unpickling(memory_file, tmp_path, model):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(memory_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SonettCache.load(truncated, model.config)
    evil, marker = tmp_path / "evil.safetensors", tmp_path / "unpickled"
    evil.write_bytes(pickle.dumps(Unpickled(marker)))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SonettCache.load(evil, model.config)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Untrusted files
# ---------------------------------------------------------------------------------------------------------------


class Unpickled:
    """Unpickling this writes `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_weights_are_never_unpickled_by_default(saved, tmp_path):
    folder = shutil.copytree(saved / "complete", tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": Unpickled(marker)}, folder / "pytorch_model.bin")
    for loader in LOADERS.values():
        with pytest.raises(OSError, match="only pickle weights"):
            loader(folder)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # opted in: torch's safe unpickler
        SonettForCausalLM.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists()


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_EXCEPTIONS = {"UnpicklingError", "PickleError", "PicklingError"}


def unsafe_loads(source: str) -> list[str]:
    """`torch.load(...)` calls without `weights_only=True`, imports of unpicklers (a module that imports `pickle` only
    to name its exception classes passes), `numpy.load(..., allow_pickle=True)` and `pandas.read_pickle`."""
    tree = ast.parse(source)
    found, pickle_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLERS:
                    pickle_names.add(alias.asname or alias.name)
                    if alias.name.split(".")[0] != "pickle":
                        found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            names = {alias.name for alias in node.names}
            if not names <= PICKLE_EXCEPTIONS:
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and node.func.attr == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and node.func.attr == "load":
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"line {node.lineno}: numpy.load with allow_pickle")
            if node.func.attr == "read_pickle":
                found.append(f"line {node.lineno}: read_pickle")
    for node in ast.walk(tree):  # `import pickle` is fine only for its exception classes
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in pickle_names:
            if node.attr not in PICKLE_EXCEPTIONS:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif (
            isinstance(node, ast.Name)
            and node.id in pickle_names
            and not isinstance(getattr(node, "ctx", None), ast.Load)
        ):
            found.append(f"line {node.lineno}: rebinds {node.id}")
    return found


def test_the_scanner_flags_each_unsafe_pattern():
    unsafe = {
        "import torch\ntorch.load('f')": "torch.load without weights_only=True",
        "import torch\ntorch.load('f', weights_only=False)": "torch.load without weights_only=True",
        "import pickle\npickle.load(open('f', 'rb'))": "pickle.load",
        "import pickle as p\np.loads(b'')": "p.loads",
        "from pickle import load": "from pickle import load",
        "import dill": "import dill",
        "import numpy as np\nnp.load('f', allow_pickle=True)": "allow_pickle",
        "import pandas as pd\npd.read_pickle('f')": "read_pickle",
    }
    for source, expected in unsafe.items():
        assert any(expected in line for line in unsafe_loads(source)), source
    safe = [
        "import torch\ntorch.load('f', weights_only=True)",
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
        "from pickle import UnpicklingError",
        "import numpy as np\nnp.load('f.npy')",
    ]
    for source in safe:
        assert unsafe_loads(source) == [], source


def test_no_source_unpickles_or_loads_torch_files_unsafely():
    sources = sorted((ROOT / "modeling").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert len(sources) > 20
    problems = {str(path.relative_to(ROOT)): unsafe_loads(path.read_text()) for path in sources}
    assert {name: found for name, found in problems.items() if found} == {}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


def assert_no_pickle(folder_or_file: Path) -> int:
    """No file is a pickle by name or by content (pickle protocol 2+ opcode, or torch.save's zip); returns the count."""
    paths = [folder_or_file] if folder_or_file.is_file() else [p for p in folder_or_file.rglob("*") if p.is_file()]
    for path in paths:
        head = path.read_bytes()[:4]
        assert not path.name.endswith(PICKLE_SUFFIXES), path
        assert not (head[:1] == b"\x80" and 2 <= head[1] <= 5), path
        assert head != b"PK\x03\x04", path
    return len(paths)


def test_saved_folders_and_memory_files_hold_no_pickle(model, tokenizer, processor, memory_file, tmp_path):
    text = tiny_model("mixed", vocab_size=len(tokenizer))
    write_model_folder(text, tokenizer, tmp_path / "text", {"training_data": "unit test", "steps": 0})
    vision = SonettForConditionalGeneration.from_text_model(
        text, cross_attention_layers=[0], vision_config=VISION, image_token_id=tokenizer.image_token_id
    )
    vision.save_pretrained(tmp_path / "vision")
    processor.save_pretrained(tmp_path / "vision")
    assert assert_no_pickle(tmp_path / "text") >= 10
    assert assert_no_pickle(tmp_path / "vision") >= 10
    assert assert_no_pickle(memory_file) == 1
    assert (tmp_path / "text" / "model.safetensors").is_file() and (tmp_path / "vision" / "model.safetensors").is_file()
    with pytest.raises(AssertionError):  # the check can fail
        torch.save({"x": torch.zeros(1)}, tmp_path / "state.safetensors")
        assert_no_pickle(tmp_path / "state.safetensors")

"""SonettProcessor: image markers <-> images, padding, cross-attention mask, chat template, save/load (also as remote
code in a fresh process where `sonett` cannot be imported)."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers_remote import NO_PACKAGE_PREAMBLE, fresh_process_env
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

from sonett import SonettImageProcessor, SonettProcessor
from sonett.data.tokenizer import train_bpe_tokenizer

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
CORPUS = ["a picture of a cat", "what is in this image?", "the red square and the blue square"] * 4
# Single characters around the markers: each is exactly one token, so positions can be written by hand.
INTERLEAVED = ["a<|image|>b<|image|>c", "x<|image|>"]


def normalised(colour):
    return (torch.tensor(colour, dtype=torch.float32) / 255.0 - 0.5) / 0.5


def solid(colour, size=(8, 6)):
    return Image.new("RGB", size, colour)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1)  # padding_side="left"


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SonettProcessor(image_processor=SonettImageProcessor(), tokenizer=tokenizer)


def ids_of(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_interleaved_prompt_with_left_padding(processor, tokenizer):
    assert tokenizer.padding_side == "left"
    out = processor(INTERLEAVED, images=[solid(RED), solid(BLUE), solid(GREEN)])
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_mask", "cross_attention_mask"}
    assert set(out) == set(processor.model_input_names)
    a, b, c, x = ids_of(tokenizer, "a", "b", "c", "x")
    img, pad = tokenizer.image_token_id, tokenizer.pad_token_id
    assert out["input_ids"].tolist() == [[a, img, b, img, c], [pad, pad, pad, x, img]]  # one token per image
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert out["image_mask"].tolist() == [[1, 1], [1, 0]]
    assert out["image_mask"].dtype == out["cross_attention_mask"].dtype == torch.long
    expected = [
        [[0, 0], [1, 0], [1, 0], [1, 1], [1, 1]],  # image 0 from its marker at 1, image 1 from its marker at 3
        [[0, 0], [0, 0], [0, 0], [0, 0], [1, 0]],  # padding sees nothing; image 0 from 4; no image 1 at all
    ]
    assert out["cross_attention_mask"].tolist() == expected
    pixels = out["pixel_values"]
    assert pixels.shape == (2, 2, 3, 32, 32) and pixels.dtype == torch.float32
    for (sample, index), colour in {(0, 0): RED, (0, 1): BLUE, (1, 0): GREEN}.items():
        assert torch.allclose(pixels[sample, index], normalised(colour)[:, None, None].expand(3, 32, 32))
    assert not pixels[1, 1].any()  # a missing image is zeros

    per_sample = processor(INTERLEAVED, images=[[solid(RED), solid(BLUE)], [solid(GREEN)]])
    for key in out:
        assert torch.equal(per_sample[key], out[key]), key


def test_right_padding_masks_the_padding(processor, tokenizer):
    out = processor(INTERLEAVED, images=[[solid(RED), solid(BLUE)], [solid(GREEN)]], padding_side="right")
    pad, img = tokenizer.pad_token_id, tokenizer.image_token_id
    assert out["input_ids"][1].tolist() == [*ids_of(tokenizer, "x"), img, pad, pad, pad]
    assert out["cross_attention_mask"][1].tolist() == [[0, 0], [1, 0], [0, 0], [0, 0], [0, 0]]
    assert tokenizer.padding_side == "left"  # the call did not change the tokenizer


def test_single_string_and_single_image(processor):
    out = processor("a<|image|>", images=solid(RED))
    assert out["input_ids"].shape == (1, 2)
    assert out["pixel_values"].shape == (1, 1, 3, 32, 32)
    assert out["cross_attention_mask"].tolist() == [[[0], [1]]]
    as_lists = processor(INTERLEAVED, images=[solid(RED), solid(BLUE), solid(GREEN)], return_tensors=None)
    assert as_lists["cross_attention_mask"][1][4] == [1, 0]
    assert isinstance(as_lists["pixel_values"], np.ndarray)


TOTAL = "The text has 3 <|image|> markers in total (per sample: [2, 1]) but "
MISMATCHES = [
    (INTERLEAVED, [solid(RED), solid(BLUE)], TOTAL + "2 images given"),
    (INTERLEAVED, [solid(RED)] * 4, TOTAL + "4 images given"),
    (INTERLEAVED, [[solid(RED), solid(BLUE)], []], "Sample 1 has 1 <|image|> marker in its text but 0 images given"),
    (INTERLEAVED, [[solid(RED)], [solid(GREEN)]], "Sample 0 has 2 <|image|> markers in its text but 1 image given"),
    (INTERLEAVED, None, "The text has 3 <|image|> markers (per sample: [2, 1]) but no images were given"),
    ("no markers", solid(RED), "The text has 0 <|image|> markers in total (per sample: [0]) but 1 image given"),
    (INTERLEAVED, [[solid(RED), solid(BLUE)]], "`images` holds 1 per-sample lists but the text has 2 samples"),
]


@pytest.mark.parametrize(("text", "images", "message"), MISMATCHES)
def test_marker_image_mismatch_gives_both_counts(processor, text, images, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        processor(text, images=images)


def test_bad_image_error_reaches_the_caller(processor):
    with pytest.raises(ValueError, match="image 1 has 5 channels"):
        processor(INTERLEAVED, images=[solid(RED), np.zeros((8, 8, 5), np.uint8), solid(GREEN)])


def test_default_image_processor_and_numpy_output(tokenizer):
    processor = SonettProcessor(tokenizer=tokenizer)
    assert isinstance(processor.image_processor, SonettImageProcessor)
    out = processor(INTERLEAVED, images=[solid(RED), solid(BLUE), solid(GREEN)], return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].shape == (2, 2, 3, 32, 32)
    assert out["cross_attention_mask"].shape == (2, 5, 2)


def test_text_only_call_equals_the_tokenizer(processor, tokenizer):
    texts = ["what is in this image?", "a cat"]
    for text in (texts, texts[0]):
        for return_tensors in ("pt", None):
            out = processor(text, return_tensors=return_tensors)
            reference = tokenizer(text, padding=True, return_tensors=return_tensors)
            assert set(out) == set(reference)
            for key in reference:
                if return_tensors is None:
                    assert out[key] == reference[key]
                else:
                    assert torch.equal(out[key], reference[key])


def test_decode_delegates_to_the_tokenizer(processor, tokenizer):
    ids = processor(["a<|image|>b"], images=[solid(RED)])["input_ids"]
    assert processor.batch_decode(ids) == tokenizer.batch_decode(ids) == ["a<|image|>b"]
    assert processor.decode(ids[0], skip_special_tokens=True) == "ab"


def test_chat_template_with_image_parts(processor):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": solid(RED)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "red"},
    ]
    text = processor.apply_chat_template(conversation)
    assert text == "<|bos|><|start|>user\n<|image|>What?<|end|>\n<|start|>assistant\nred<|end|>\n"

    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    direct = processor(text, images=[solid(RED)])
    assert set(out) == set(direct)
    for key in direct:
        assert torch.equal(out[key], direct[key]), key

    masked = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = masked["input_ids"][0].tolist()
    assistant = [token for token, keep in zip(ids, masked["assistant_masks"][0]) if keep]
    assert processor.decode(assistant) == "red<|end|>"

    second = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "image", "image": solid(BLUE)}]}]
    batch = processor.apply_chat_template([conversation, second], tokenize=True, return_dict=True)
    assert batch["pixel_values"].shape == (2, 1, 3, 32, 32)
    assert batch["image_mask"].tolist() == [[1], [1]]
    assert torch.allclose(batch["pixel_values"][1, 0, :, 0, 0], normalised(BLUE))


def check_saved_folder(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"processing_sonett.py", "image_processing_sonett.py", "processor_config.json", "tokenizer.json"} <= names
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_sonett.SonettProcessor"
    assert config["image_processor"]["max_image_pixels"] == 4_000_000
    for name in ("processing_sonett.py", "image_processing_sonett.py"):
        source = (folder / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+sonett\b", source, re.MULTILINE), name


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A saved processor folder, image files for its inputs and the reference outputs."""
    folder = tmp_path_factory.mktemp("sonett_processor")
    processor = SonettProcessor(image_processor=SonettImageProcessor(max_image_pixels=4_000_000), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    paths = [str(folder / f"input_{i}.png") for i in range(3)]
    rng = np.random.default_rng(0)
    for i, path in enumerate(paths):
        Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30, 3), dtype=np.uint8)).save(path)
    reference = processor(INTERLEAVED, images=paths)
    return {"folder": folder, "paths": paths, "reference": reference, "processor": processor}


def test_same_process_round_trip(saved):
    check_saved_folder(saved["folder"])
    loaded = AutoProcessor.from_pretrained(saved["folder"], trust_remote_code=True)
    assert type(loaded).__name__ == "SonettProcessor"
    assert loaded.image_processor.max_image_pixels == 4_000_000
    assert loaded.chat_template == saved["processor"].chat_template
    assert loaded.tokenizer.padding_side == "left"
    out = loaded(INTERLEAVED, images=saved["paths"])
    for key, value in saved["reference"].items():
        assert torch.equal(out[key], value), key


FRESH_SCRIPT = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import json

    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoProcessor

    folder, out_path = sys.argv[1], sys.argv[2]
    paths, texts = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    for obj in (processor, processor.image_processor, image_processor):
        assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
    assert type(processor).__name__ == "SonettProcessor"
    assert processor.image_processor.max_image_pixels == image_processor.max_image_pixels == 4_000_000
    out = processor(texts, images=paths)
    save_file({key: value.contiguous() for key, value in out.items()}, out_path)
    """
)


def test_fresh_process_without_package_loads_remote_code(saved, tmp_path):
    script = tmp_path / "load_processor.py"
    script.write_text(FRESH_SCRIPT)
    out_path = tmp_path / "out.safetensors"
    env = fresh_process_env(tmp_path)
    inputs = [json.dumps(saved["paths"]), json.dumps(INTERLEAVED)]
    args = [sys.executable, str(script), str(saved["folder"]), str(out_path), *inputs]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = load_file(out_path)
    assert set(out) == set(saved["reference"])
    for key, value in saved["reference"].items():
        assert torch.equal(out[key], value), key

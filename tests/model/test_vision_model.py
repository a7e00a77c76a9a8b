"""SonettForConditionalGeneration: docs/design.md, invariants 1, 5 and 6 with images, image order (an image after a text
position cannot influence it), padding, generation, the cache, and the errors for inputs it cannot take."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_model import PAD, max_diff, random_ids
from helpers_remote import NO_PACKAGE_PREAMBLE, fresh_process_env
from helpers_vision import IMAGE, VISION, multimodal, pixels, prompt
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from sonett import SonettCache, SonettConfig, SonettForConditionalGeneration


def test_closed_gates_give_exactly_the_text_model_logits():
    text, model = multimodal(open_gates=False)
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels()).logits, text(ids).logits)
        assert torch.equal(model(ids).logits, text(ids).logits)


def test_a_new_multimodal_model_has_closed_gates():
    config = SonettConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vision_config=VISION,
        cross_attention_layers=[1],
        image_token_id=IMAGE,
    )
    model = SonettForConditionalGeneration(config)
    for block in model.model.cross_attention_blocks.values():
        assert block.attn_gate.item() == 0.0 and block.mlp_gate.item() == 0.0


def test_open_gates_use_the_images_but_not_before_the_first_marker():
    text, model = multimodal()
    ids = prompt()
    with torch.no_grad():
        fused = model(ids, pixel_values=pixels()).logits
        alone = text(ids).logits
    assert max_diff(fused[:, :2], alone[:, :2]) == 0.0
    assert max_diff(fused[:, 2:], alone[:, 2:]) > 1e-2


def test_an_image_after_a_position_cannot_influence_it():
    _, model = multimodal()
    ids = prompt()
    changed = pixels()
    changed[0, 1] = torch.randn(3, 16, 16)  # row 0's second image; its marker is at position 6
    with torch.no_grad():
        before, after = model(ids, pixel_values=pixels()).logits, model(ids, pixel_values=changed).logits
    assert max_diff(before[0, :6], after[0, :6]) == 0.0
    assert max_diff(before[0, 6:], after[0, 6:]) > 1e-3
    assert max_diff(before[1], after[1]) == 0.0


def test_prefill_and_decoding_with_images_equal_the_full_forward():
    _, model = multimodal()
    ids = torch.cat([prompt(), random_ids(2, 5, seed=9, low=6)], dim=1)
    with torch.no_grad():
        full = model(ids, pixel_values=pixels()).logits
        out = model(ids[:, :10], pixel_values=pixels(), use_cache=True)
        steps = [out.logits]
        for t in range(10, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        assert max_diff(torch.cat(steps, dim=1), full) <= 1e-4
        # A prompt in two chunks, the second holding an image marker, with the processor's cross-attention mask.
        cross = ((ids == IMAGE).long().cumsum(1)[:, :, None] > torch.arange(2)).long()
        first = model(ids[:, :5], pixel_values=pixels(), cross_attention_mask=cross[:, :5], use_cache=True)
        second = model(ids[:, 5:], cross_attention_mask=cross, cache=first.cache, use_cache=True)
        assert max_diff(torch.cat([first.logits, second.logits], dim=1), full) <= 1e-4


def test_rows_with_different_image_counts_and_padding_equal_each_row_alone():
    _, model = multimodal()
    rows = [prompt(1, 9, markers=((1, 5),), seed=3)[0], prompt(1, 6, markers=((2,),), seed=4)[0]]
    width = 9
    ids = torch.full((2, width), PAD)
    attention = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], attention[i, width - len(row) :] = row, 1
    images = pixels(2, 2)
    image_mask = torch.tensor([[1, 1], [1, 0]])
    with torch.no_grad():
        batch = model(ids, attention_mask=attention, pixel_values=images, image_mask=image_mask).logits
        first = model(rows[0][None], pixel_values=images[:1]).logits[0]
        second = model(rows[1][None], pixel_values=images[1:, :1]).logits[0]
    assert max_diff(batch[0], first) <= 1e-5
    assert max_diff(batch[1, -6:], second) <= 1e-5


@pytest.mark.parametrize(
    "strategy", [{"do_sample": False}, {"num_beams": 3, "do_sample": False}], ids=["greedy", "beam"]
)
def test_generate_with_and_without_the_cache_agree(strategy):
    _, model = multimodal()
    settings = {"max_new_tokens": 6, "pad_token_id": PAD, **strategy}
    with_cache = model.generate(prompt(), pixel_values=pixels(), **settings)
    without = model.generate(prompt(), pixel_values=pixels(), use_cache=False, **settings)
    assert torch.equal(with_cache, without)


def test_the_cache_file_keeps_the_images(tmp_path):
    _, model = multimodal(num_visual_tokens=3)
    ids = torch.cat([prompt(), random_ids(2, 4, seed=9, low=6)], dim=1)
    with torch.no_grad():
        full = model(ids, pixel_values=pixels()).logits
        cache = model(ids[:, :10], pixel_values=pixels(), use_cache=True).cache
        cache.save(tmp_path / "state.safetensors")
        restored = SonettCache.load(tmp_path / "state.safetensors", model.config)
        rest = model(ids[:, 10:], cache=restored, use_cache=True).logits
    assert max_diff(rest, full[:, 10:]) <= 1e-4


def test_resampler_gives_a_fixed_number_of_visual_tokens():
    _, model = multimodal(num_visual_tokens=5)
    with torch.no_grad():
        tokens = model.get_image_tokens(pixels())
    assert tokens.shape == (2, 2, 5, 32)
    assert max_diff(tokens[:, :, 0], tokens[:, :, 1]) > 1e-4  # queries start different


def test_the_convolutional_stem_sees_neighbouring_patches_and_keeps_the_pixel_scale():
    """Xiao et al.'s stem: a pixel changes the features of the patches next to its own (a patchify stem changes only
    its own), and fan-in initialisation keeps the stem's output at about the scale of its input."""
    features = {}
    for stem in ("patchify", "convolutional"):
        _, model = multimodal(stem=stem)
        images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        changed = images.clone()
        changed[0, :, 3, 3] += 5.0  # bottom-right pixel of patch (0, 0)
        with torch.no_grad():
            before, after = (model.vision_model.patch_embedding(x).flatten(2)[0] for x in (images, changed))
        features[stem] = ((after - before).abs().amax(0) > 1e-6).view(4, 4), before.std().item()
    touched, _ = features["patchify"]
    assert touched[0, 0] and touched.sum() == 1
    touched, scale = features["convolutional"]
    assert touched[0, 0] and touched[0, 1] and touched[1, 0] and touched[1, 1] and not touched[2:].any()
    assert 0.2 < scale < 5.0, scale  # normal(0.02) init would leave it near 0.005


REMOTE = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText
    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    ids, pixels = torch.tensor(IDS), torch.tensor(PIXELS)
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits
    generated = model.generate(ids, pixel_values=pixels, max_new_tokens=5, do_sample=False, pad_token_id=0)
    save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, out)
    """
)


@pytest.mark.parametrize("stem", ["patchify", "convolutional"])
def test_save_load_and_remote_code_give_identical_outputs(tmp_path, stem):
    _, model = multimodal(stem=stem)
    with torch.no_grad():  # trained-looking LayerScale values must survive loading (not be re-initialised)
        for block in model.vision_model.layers:
            block.attn_scale.uniform_(0.3, 0.9)
            block.mlp_scale.uniform_(0.3, 0.9)
    model.save_pretrained(tmp_path / "model")
    ids, images = prompt(), pixels()
    with torch.no_grad():
        logits = model(ids, pixel_values=images).logits
    generated = model.generate(ids, pixel_values=images, max_new_tokens=5, do_sample=False, pad_token_id=PAD)

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    assert type(loaded) is SonettForConditionalGeneration
    assert torch.equal(loaded.vision_model.layers[0].attn_scale, model.vision_model.layers[0].attn_scale)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=images).logits, logits)

    script = tmp_path / "remote.py"
    script.write_text(REMOTE.replace("IDS", repr(ids.tolist())).replace("PIXELS", repr(images.tolist())))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "out.safetensors")],
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = load_file(tmp_path / "out.safetensors")
    assert max_diff(remote["logits"], logits) <= 1e-6
    assert torch.equal(remote["generated"], generated)


def test_bad_image_inputs_are_refused_with_the_problem_named():
    text, model = multimodal()
    ids = prompt()
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(images, 3, 16, 16\)"):
        model(ids, pixel_values=torch.randn(2, 2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(images, 3, 16, 16\)"):
        model(ids, pixel_values=torch.randn(2, 2, 4, 16, 16))
    with pytest.raises(ValueError, match="2 image markers .* but 1 images"):
        model(ids, pixel_values=pixels(2, 1))
    with pytest.raises(ValueError, match="no cross_attention_layers"):
        text.model(ids, image_tokens=torch.randn(2, 2, 16, 32))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cross_attention_layers": [1]}, "vision_config is None"),
        ({"cross_attention_layers": [5], "vision_config": {}}, "layer indices in \\[0, 3\\)"),
        ({"cross_attention_layers": [1, 1], "vision_config": {}}, "repeated entries"),
        ({"vision_config": {"image_size": 30, "patch_size": 4}}, "multiple of patch_size"),
        ({"vision_config": {"stem": "resnet"}}, "stem must be one of"),
        ({"vision_config": {"stem": "convolutional", "image_size": 24, "patch_size": 6}}, "power of two"),
        ({"image_token_id": 500}, "outside the vocabulary"),
        (
            {
                "cross_attention_layers": [1],
                "vision_config": {},
                "hierarchy": {"shorten_factor": 2, "start_layer": 1, "end_layer": 2},
            },
            "inside the hierarchy span",
        ),
    ],
)
def test_invalid_vision_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        SonettConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            **overrides,
        )


def test_image_text_to_text_pipeline_equals_generate():
    from PIL import Image
    from transformers import pipeline

    from sonett import SonettImageProcessor, SonettProcessor
    from sonett.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["what is in this image? a red square"] * 8, vocab_size=300, min_frequency=1)
    processor = SonettProcessor(image_processor=SonettImageProcessor(), tokenizer=tokenizer)
    config = SonettConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vision_config={"hidden_size": 32},
        cross_attention_layers=[1],
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = SonettForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in model.model.cross_attention_blocks.values():
            block.attn_gate.fill_(1.0)
    image = Image.new("RGB", (20, 12), (200, 30, 30))
    prompt_text = "<|image|>what is in this image?"
    result = pipeline("image-text-to-text", model=model, processor=processor)(
        text=prompt_text, images=[image], max_new_tokens=4, generate_kwargs={"do_sample": False}
    )
    inputs = processor(text=[prompt_text], images=[[image]], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_text = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert new_text.strip()
    assert result[0]["generated_text"] == prompt_text + new_text

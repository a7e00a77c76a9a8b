"""The vision recipe end to end on a tiny text model: it trains, keeps a frozen language model unchanged, merges
LoRA into a plain folder, and the folder reloads through AutoProcessor / AutoModelForImageTextToText."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from sonett import SonettConfig, SonettForCausalLM
from sonett.data.images import DIGIT_NAMES, SHAPES_ANSWERS, digits_examples
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.training.vision import VisionArguments, answer_accuracy, question_records, train_vision

WORDS = " ".join([*DIGIT_NAMES, *SHAPES_ANSWERS])
CORPUS = [f"what digit is this? how many shapes? what colour is the circle? {WORDS}"] * 20


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=320, min_frequency=1)
    config = SonettConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["linear_attention", "sliding_attention", "full_attention"],
        sliding_window=8,
        linear_feature_dim=4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    SonettForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_args(text_folder, output_dir, **overrides):
    settings = {
        "text_model": str(text_folder),
        "output_dir": str(output_dir),
        "cross_attention_layers": [0, 2],
        "image_size": 16,
        "vision_hidden_size": 32,
        "vision_layers": 1,
        "train_shapes": 40,
        "test_shapes": 4,
        "eval_questions": 8,
        "max_steps": 4,
        "encoder_steps": 3,
        "encoder_batch_size": 8,
        "batch_size": 8,
        "warmup_steps": 1,
        **overrides,
    }
    return VisionArguments(**settings)


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["frozen", "lora"])
def test_recipe_writes_a_folder_that_reloads(text_folder, tmp_path, lora_rank):
    results = train_vision(tiny_args(text_folder, tmp_path / "out", text_lora_rank=lora_rank))
    assert 0.0 <= results["digits_accuracy"] <= 1.0 and results["digits_test_images"] > 300
    assert results["shapes_test_questions"] == 8 and len(results["samples"]) == 16
    assert set(results["encoder_stage"]["held_out_accuracy"]) == {"digit", "kinds", "colours"}
    saved = json.loads((tmp_path / "out" / "vision_results.json").read_text())
    assert saved["digits_accuracy"] == results["digits_accuracy"]
    card = (tmp_path / "out" / "README.md").read_text()  # a model card, so the folder can be pushed to the Hub
    assert "digits accuracy" in card and "shapes accuracy" in card and "convolutional stem" in card
    assert "handwritten digits" in card and "trust_remote_code=True" in card

    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert not [name for name in weights if "lora" in name], "LoRA must be merged into plain weights"
    text_weights = load_file(text_folder / "model.safetensors")
    layer = "model.layers.1.mlp.down_proj.weight"
    if lora_rank == 0:
        assert torch.equal(weights[layer], text_weights[layer])  # the frozen language model is unchanged
    assert not torch.equal(weights["model.cross_attention_blocks.0.attn_gate"], torch.zeros(1))

    # The folder is the model that was evaluated: its held-out answers reproduce the reported accuracy.
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    digits_test = question_records(digits_examples("test", seed=0, image_size=16), "digits")
    accuracy, predictions = answer_accuracy(model, processor, digits_test)
    assert accuracy == results["digits_accuracy"]
    assert predictions[:8] == [sample["prediction"] for sample in results["samples"][:8]]


def test_a_frozen_encoder_stays_as_stage_one_left_it(text_folder, tmp_path):
    """With `fusion_encoder_lr_scale=0` the fusion steps leave the encoder alone: a run of 1 and a run of 4 fusion
    steps (same seed, same stage 1) save the same encoder weights, while their cross-attention differs."""
    saved = {}
    for steps in (1, 4):
        out = tmp_path / f"steps{steps}"
        train_vision(tiny_args(text_folder, out, max_steps=steps, fusion_encoder_lr_scale=0.0, text_lora_rank=0))
        saved[steps] = load_file(out / "model.safetensors")
    encoder = [name for name in saved[1] if name.startswith("vision_model.")]
    assert encoder and all(torch.equal(saved[1][name], saved[4][name]) for name in encoder)
    cross = "model.cross_attention_blocks.0.cross_attn.q_proj.weight"
    assert not torch.equal(saved[1][cross], saved[4][cross])


def test_the_encoder_learning_rate_in_the_fusion_stage():
    from torch import nn

    from sonett.training.optimization import parameter_groups
    from sonett.training.vision import encoder_learning_rate

    model = nn.ModuleDict({"encoder": nn.Linear(4, 4), "text": nn.Linear(4, 4)})
    groups = encoder_learning_rate(parameter_groups(model, 0.1), model["encoder"], 1e-4)
    encoder_ids = {id(p) for p in model["encoder"].parameters()}
    for group in groups:
        mine = {id(p) in encoder_ids for p in group["params"]}
        assert len(mine) == 1  # no group mixes encoder and other parameters
        assert (group.get("lr") == 1e-4) == mine.pop()
    assert sum(len(g["params"]) for g in groups) == 4

    frozen = encoder_learning_rate(parameter_groups(model, 0.1), model["encoder"], 0.0)
    assert {id(p) for g in frozen for p in g["params"]} == {id(p) for p in model["text"].parameters()}
    assert not any(p.requires_grad for p in model["encoder"].parameters())


def test_batch_shares_that_leave_no_shape_questions_are_refused():
    with pytest.raises(ValueError, match="must stay below 1"):
        VisionArguments(digit_share=0.5, caption_share=0.5)
    with pytest.raises(ValueError, match=r"caption_share must be in \[0, 1\]"):
        VisionArguments(caption_share=-0.1)


def test_a_missing_text_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No text model at"):
        train_vision(VisionArguments(text_model=str(tmp_path / "nothing"), output_dir=str(tmp_path / "out")))

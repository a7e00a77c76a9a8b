"""The bad-input matrix, configs: invalid fields through SonettConfig, SonettConfig.from_pretrained and
SonettForCausalLM.from_pretrained, a config of another model type, and a config.json that is not JSON
(docs/design.md, invariant 10)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers_bad_input import save_reference_folders
from helpers_model import VOCAB, tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from sonett import SonettConfig, SonettForCausalLM, SonettForConditionalGeneration


@pytest.fixture(scope="module")
def model():
    """Sliding and full attention, max_position_embeddings 256."""
    return tiny_model("mixed")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """A complete saved folder of the `model` fixture, one of the same kinds with hidden_size 64, and a sharded one."""
    return save_reference_folders(tmp_path_factory.mktemp("saved"), model)


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

"""SonettConfig: defaults, save/load round trip and field validation."""

import json

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig

from sonett import LAYER_KINDS, SonettConfig


def test_default_layer_types_follow_num_hidden_layers():
    config = SonettConfig()
    assert len(config.layer_types) == config.num_hidden_layers
    assert set(config.layer_types) <= set(LAYER_KINDS)
    assert config.layer_types[3] == "full_attention"
    assert config.layer_types[0] == "sliding_attention"

    config = SonettConfig(num_hidden_layers=6)
    assert len(config.layer_types) == 6
    assert config.layer_types.count("full_attention") == 1


def test_derived_defaults():
    config = SonettConfig(hidden_size=64, num_attention_heads=4)
    assert config.num_key_value_heads == 4
    assert config.head_dim == 16
    assert config.model_type == "sonett"
    assert config.tie_word_embeddings is True


def test_default_rope_has_one_entry_per_kind_with_its_own_base():
    rope = SonettConfig().rope_parameters
    assert set(rope) == {"full_attention", "sliding_attention"}
    assert rope["full_attention"] == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}


def test_rope_parameters_for_reads_nested_or_flat():
    nested = SonettConfig()
    assert nested.rope_parameters_for("full_attention")["rope_theta"] == 1_000_000.0
    assert nested.rope_parameters_for("sliding_attention")["rope_theta"] == 10_000.0
    flat = SonettConfig(rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    assert flat.rope_parameters_for("full_attention")["rope_theta"] == 123.0
    assert flat.rope_parameters_for("sliding_attention")["rope_theta"] == 123.0


def custom_config():
    return SonettConfig(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_act="gelu",
        max_position_embeddings=512,
        initializer_range=0.05,
        rms_norm_eps=1e-5,
        use_cache=False,
        pad_token_id=3,
        bos_token_id=4,
        eos_token_id=[5, 6],
        tie_word_embeddings=False,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e3},
        },
        attention_bias=True,
        attention_dropout=0.1,
        mlp_bias=True,
        sliding_window=7,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    )


@pytest.mark.parametrize("loader", [SonettConfig, AutoConfig], ids=["SonettConfig", "AutoConfig"])
def test_save_load_round_trip_keeps_every_field(tmp_path, loader):
    config = custom_config()
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
    assert on_disk["auto_map"]["AutoConfig"] == "configuration_sonett.SonettConfig"

    loaded = loader.from_pretrained(tmp_path)
    assert type(loaded) is SonettConfig
    expected = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    actual = {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"}
    assert actual == expected
    for field in ("head_dim", "num_key_value_heads", "sliding_window", "eos_token_id", "tie_word_embeddings"):
        assert getattr(loaded, field) == getattr(config, field)
    assert loaded.rope_parameters_for("full_attention")["factor"] == 2.0


def test_round_trip_of_defaults(tmp_path):
    config = SonettConfig()
    config.save_pretrained(tmp_path)
    loaded = SonettConfig.from_pretrained(tmp_path)
    assert loaded.layer_types == config.layer_types
    assert loaded.rope_parameters == config.rope_parameters


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_hidden_layers": 2, "layer_types": ["full_attention", "mamba2"]}, r"layer_types\[1\]"),
        ({"num_hidden_layers": 2, "layer_types": ["chunked_attention", "full_attention"]}, r"layer_types\[0\]"),
        ({"num_hidden_layers": 4, "layer_types": ["full_attention"] * 3}, "layer_types has 3 entries"),
        ({"num_hidden_layers": 2, "layer_types": ["full_attention"] * 3}, "num_hidden_layers"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": 1}, "sliding_window must be >= 2"),
        ({"num_hidden_layers": 2, "layer_types": ["memory_attention"] * 2, "sliding_window": 1}, "sliding_window"),
        ({"sliding_window": None}, "sliding_window"),
        (
            {"num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 0},
            "sliding_window",
        ),
        ({"vocab_size": 100, "pad_token_id": 100}, "pad_token_id"),
        ({"vocab_size": 100, "bos_token_id": -1}, "bos_token_id"),
        ({"vocab_size": 100, "eos_token_id": 250}, "eos_token_id"),
        ({"vocab_size": 100, "eos_token_id": [2, 100]}, "eos_token_id"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "longrope", "rope_theta": 1e4},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            },
            "rope_parameters.*longrope",
        ),
        ({"vocab_size": 0}, "vocab_size"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
    ids=[
        "unknown-kind",
        "hf-kind-not-in-sonett",
        "too-few-layer-types",
        "too-many-layer-types",
        "heads-not-dividing-hidden",
        "kv-heads-not-dividing-heads",
        "window-zero",
        "window-one",
        "window-one-memory",
        "window-none",
        "window-zero-mixed",
        "pad-id-too-large",
        "bos-id-negative",
        "eos-id-too-large",
        "eos-list-id-too-large",
        "rope-type-longrope",
        "rope-type-nested-longrope",
        "vocab-zero",
        "hidden-zero",
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SonettConfig(**kwargs)


def test_full_attention_only_needs_no_window():
    config = SonettConfig(num_hidden_layers=2, layer_types=["full_attention"] * 2, sliding_window=None)
    assert config.sliding_window is None


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3"])
def test_supported_scaled_rope_types_are_accepted(rope_type):
    params = {"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0}
    if rope_type == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=1024)
    config = SonettConfig(rope_parameters=params)
    assert config.rope_parameters_for("sliding_attention")["rope_type"] == rope_type


def test_invalid_field_set_after_init_fails_on_save(tmp_path):
    config = SonettConfig(num_hidden_layers=2, layer_types=["full_attention"] * 2)
    config.layer_types = ["full_attention", "bogus"]
    # @strict wraps the ValueError in its own StrictDataclassClassValidationError; the message still names it.
    with pytest.raises(StrictDataclassClassValidationError, match=r"layer_types\[1\] = 'bogus'"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()

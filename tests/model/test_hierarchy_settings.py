"""`SonettConfig.hierarchy_settings`: the `hierarchy` setting read once into a typed, frozen `HierarchySettings`.

config.json keeps the plain dict main writes (tests/fixtures/sonett-main-2026-12-hierarchy holds a config.json
saved by main before the change), and every reader in the package and its scripts goes through the accessor.
"""

import dataclasses
import pathlib
import re

import pytest
from helpers_model import tiny_config

import sonett
from sonett import SonettConfig, SonettForCausalLM
from sonett.model.configuration_sonett import HierarchySettings

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
MAIN_FOLDER = FIXTURES / "sonett-main-2026-12-hierarchy"
KINDS = ["sliding_attention", "full_attention", "linear_attention", "memory_attention", "full_attention"]


def five_layers(**overrides) -> SonettConfig:
    return tiny_config("mixed", num_hidden_layers=5, layer_types=list(KINDS), **overrides)


def test_the_dict_is_read_into_typed_settings_with_defaults():
    config = five_layers(hierarchy={"shorten_factor": 3, "start_layer": 1, "end_layer": 4})
    settings = config.hierarchy_settings
    assert settings == HierarchySettings(shorten_factor=3, start_layer=1, end_layer=4)
    assert (settings.pooling, settings.upsampling) == ("linear", "repeat")
    assert settings.span == range(1, 4) == config.hierarchy_span()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.shorten_factor = 4
    assert five_layers().hierarchy_settings is None
    assert five_layers().hierarchy_span() == range(0)


def test_typed_settings_are_accepted_and_saved_as_the_dict():
    settings = HierarchySettings(shorten_factor=2, start_layer=1, end_layer=4, upsampling="linear")
    config = five_layers(hierarchy=settings)
    assert config.hierarchy == {
        "shorten_factor": 2,
        "start_layer": 1,
        "end_layer": 4,
        "pooling": "linear",
        "upsampling": "linear",
    }
    assert config.hierarchy_settings == settings


def test_config_json_is_byte_identical_to_mains(tmp_path):
    """The same settings give exactly the config.json main saved, and main's file loads into the typed form."""
    main = MAIN_FOLDER / "config.json"
    loaded = SonettConfig.from_pretrained(MAIN_FOLDER)
    assert loaded.hierarchy_settings == HierarchySettings(2, 1, 4, pooling="linear", upsampling="linear")
    loaded.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_bytes() == main.read_bytes()
    built = SonettConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=5,
        layer_types=list(KINDS),
        sliding_window=4,
        hierarchy={"start_layer": 1, "shorten_factor": 2, "end_layer": 4, "upsampling": "linear"},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    built.save_pretrained(tmp_path / "built")
    assert (tmp_path / "built" / "config.json").read_bytes() == main.read_bytes()


def test_a_model_reads_its_shorten_factor_from_the_settings(tmp_path):
    model = SonettForCausalLM(five_layers(hierarchy={"shorten_factor": 3, "start_layer": 1, "end_layer": 4}))
    assert model.model.hourglass.shorten_factor == 3
    model.save_pretrained(tmp_path)
    assert SonettForCausalLM.from_pretrained(tmp_path).config.hierarchy_settings == model.config.hierarchy_settings


def test_invalid_settings_are_refused_like_the_dict():
    with pytest.raises(ValueError, match=r"hierarchy\['pooling'\] = 'max'"):
        five_layers(hierarchy=HierarchySettings(2, 1, 4, pooling="max"))
    with pytest.raises(ValueError, match="strictly inside"):
        five_layers(hierarchy=HierarchySettings(2, 0, 4))


# Reading the `hierarchy` dict directly (indexing it, .get, truthiness, getattr) outside the config.
DIRECT_READ = re.compile(r"\.hierarchy\b(?!_)|[\"']hierarchy[\"'],\s*None\)")


def test_every_reader_goes_through_the_accessor():
    package = pathlib.Path(sonett.__file__).parent
    scripts = pathlib.Path(__file__).parents[2] / "scripts"
    files = [*package.rglob("*.py"), *scripts.rglob("*.py")]
    offenders = [
        f"{path}:{number}: {line.strip()}"
        for path in files
        if path.name != "configuration_sonett.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if DIRECT_READ.search(line)
    ]
    assert offenders == []

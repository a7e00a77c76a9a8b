"""Model presets by name: the JSON files of the repository's `configuration/` folder, shipped in the wheel as the
package data `sonett.configuration` (see `pyproject.toml`), so a preset loads by name from any install.

A preset is a `SonettConfig` as JSON; keys starting with `_` are comments, and the vocabulary size and special
token ids come from the tokenizer the model is trained with (`build_config`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from sonett.model.configuration_sonett import SonettConfig

PRESET_PACKAGE = "sonett.configuration"
DEFAULT_PRESET = "sonett-tiny"


def _preset_folder() -> Path:
    """The folder of the shipped presets (the package data of an install, or `configuration/` of a checkout)."""
    folder = Path(str(resources.files(PRESET_PACKAGE)))
    if not folder.is_dir():
        raise FileNotFoundError(f"The presets folder {folder} is missing; reinstall sonett (pip install sonett).")
    return folder


def preset_names() -> list[str]:
    """The names of the shipped presets, e.g. `['sonett-1b', ..., 'sonett-tiny']`."""
    return sorted(path.stem for path in _preset_folder().glob("*.json"))


def preset_path(name_or_path: str | Path) -> Path:
    """The JSON file of a preset: an existing file path as given, or a shipped preset by name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _preset_folder() / f"{name_or_path}.json"
    if Path(name_or_path).name == str(name_or_path) and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"No preset {str(name_or_path)!r}; give a JSON file or one of {preset_names()}.")


def load_preset(name_or_path: str | Path) -> dict:
    """A preset as a dict: a JSON file path, or the name of a shipped preset (e.g. `sonett-tiny`)."""
    path = preset_path(name_or_path)
    try:
        preset = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"The preset {path} is not valid JSON: {error}.") from None
    if not isinstance(preset, dict):
        raise ValueError(f"The preset {path} must hold a JSON object of config values, not {type(preset).__name__}.")
    return preset


def preset_name(name_or_path: str | Path) -> str:
    """The short name of a preset (`sonett-tiny` for the name or for `configuration/sonett-tiny.json`)."""
    return Path(name_or_path).stem


def preset_values(preset: dict) -> dict:
    """The values of a preset that make the model config: comment keys (starting with `_`) and model_type dropped."""
    return {k: v for k, v in preset.items() if not k.startswith("_") and k != "model_type"}


def config_from_preset(preset: dict, **overrides) -> SonettConfig:
    """A `SonettConfig` from a preset dict (comment keys starting with `_` dropped), with `overrides` applied."""
    return SonettConfig(**{**preset_values(preset), **overrides})


def build_config(preset: dict, tokenizer: PreTrainedTokenizerBase) -> SonettConfig:
    """The model config of a preset, with the vocabulary and special ids of `tokenizer`."""
    return config_from_preset(
        preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

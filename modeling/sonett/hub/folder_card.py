"""The model card of a folder a user saved without one: a `save_pretrained` folder (text, or vision with its
processor), the merged folder of `sonett finetune --merge`, or a PEFT adapter folder.

The card is rendered by `sonett.hub.model_card.render_model_card` from the folder's `config.json` (an adapter's: its
base model's), its parameter count and its results files (`results.json`, `*_results.json`) if any. An adapter's
card names its base model by Hub id (metadata `base_model`, library `peft`): a base known only by a local path
needs the Hub id it was (or will be) pushed to, since a card must not publish where files lay on this machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import safe_open

from sonett.evaluation.footprint import meta_model
from sonett.hub.model_card import is_hub_id, render_model_card
from sonett.model.configuration_sonett import SonettConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
RESULTS_PATTERNS = ("results.json", "*_results.json")
# huggingface_hub's default card template (what PEFT's save_pretrained writes into an adapter folder) carries this
# comment while nobody has filled it in: such a card is a placeholder and is replaced by a generated one.
PLACEHOLDER_MARKER = "<!-- Provide a quick summary of what the model is/does. -->"


class CardError(ValueError):
    """No card can be generated for the folder; the message names the problem and the fix."""


def is_adapter_folder(folder: str | Path) -> bool:
    """A PEFT adapter folder: `adapter_config.json` and no model `config.json`."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / CONFIG_FILE).is_file()


def is_placeholder_card(text: str) -> bool:
    """Whether a README.md is empty or huggingface_hub's unfilled default template (PEFT writes one)."""
    return not text.strip() or PLACEHOLDER_MARKER in text


def read_results(folder: str | Path) -> dict:
    """The folder's results files (`results.json`, `*_results.json`) merged in name order; {} when there are none."""
    folder = Path(folder)
    paths = sorted({path for pattern in RESULTS_PATTERNS for path in folder.glob(pattern) if path.is_file()})
    results: dict = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CardError(f"{path.name} is not valid JSON ({error}); fix or remove it.") from None
        if isinstance(data, dict):
            results.update(data)
    return results


def adapter_base_model(adapter_config: dict, base_model: str | None = None) -> str:
    """The Hub id of an adapter's base model: `base_model` if given, else the adapter config's
    `base_model_name_or_path` when that is a Hub id.

    Raises:
        CardError: the base is named only by a local path (and `base_model` is not given), `base_model` is not a
            Hub id, or it contradicts the Hub id the adapter config names.
    """
    named = adapter_config.get("base_model_name_or_path")
    if base_model is not None:
        if not is_hub_id(base_model):
            raise CardError(
                f"--base_model {base_model!r} is not a Hub repository id; give OWNER/NAME of the base model's "
                "repository (push a local base first with `sonett push BASE_FOLDER OWNER/NAME`)."
            )
        if is_hub_id(named) and named != base_model:
            raise CardError(
                f"{ADAPTER_CONFIG_FILE} names the base model {named!r} but --base_model says {base_model!r}; "
                "drop --base_model, or save the adapter again from the base you mean."
            )
        return base_model
    if not named:
        raise CardError(
            f"{ADAPTER_CONFIG_FILE} names no base_model_name_or_path; pass --base_model OWNER/NAME (base_model= in "
            "Python), the Hub repository of the model the adapter was trained on."
        )
    if not is_hub_id(named):
        raise CardError(
            f"{ADAPTER_CONFIG_FILE} names its base model by a local path ({named}), which the Hub cannot resolve "
            "and the card must not publish; push the base model (`sonett push BASE_FOLDER OWNER/NAME`) and pass "
            "--base_model OWNER/NAME (base_model= in Python)."
        )
    return named


def _sonett_config(source: str | Path, what: str) -> SonettConfig:
    try:
        config = SonettConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CardError(
            f"Cannot read {what} ({error}); write README.md yourself, or make the config readable."
        ) from None
    if config.model_type != "sonett":
        raise CardError(f"{what} is a {config.model_type!r} config, not Sonett's; write README.md yourself.")
    return config


def count_parameters(config: SonettConfig) -> int:
    """Parameters of the model `config` describes (tied weights counted once), built on the meta device."""
    return sum(parameter.numel() for parameter in meta_model(config).parameters())


def safetensors_parameters(path: Path) -> int:
    """Elements of every tensor of a safetensors file, read from its header."""
    total = 0
    with safe_open(str(path), framework="numpy") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
            count = 1
            for size in handle.get_slice(name).get_shape():
                count *= size
            total += count
    return total


def adapter_facts(folder: Path, adapter_config: dict) -> dict:
    """What the card says of an adapter: method, rank, alpha, target modules, parameter count."""
    targets = adapter_config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    weights = folder / ADAPTER_WEIGHTS_FILE
    parameters = safetensors_parameters(weights) if weights.is_file() else None
    return {
        "peft_type": str(adapter_config.get("peft_type", "LORA")),
        "rank": adapter_config.get("r", "n/a"),
        "alpha": adapter_config.get("lora_alpha", "n/a"),
        "target_modules": targets,
        "trainable_parameters": f"{parameters:,}" if parameters is not None else "n/a",
    }


def folder_model_card(folder: str | Path, repo_id: str | None = None, base_model: str | None = None) -> str:
    """The card for a saved folder that has none (see the module docstring).

    Args:
        folder: a `save_pretrained` folder of a Sonett model, or a PEFT adapter folder.
        repo_id: the Hub id it goes to (the card's title and usage example); the folder name by default.
        base_model: the Hub id of the base model: required for an adapter whose config names its base by a local
            path; for a full model (a merged fine-tune) it fills the metadata's `base_model`.

    Raises:
        CardError: naming why no card can be written and the fix.
    """
    folder = Path(folder)
    results = read_results(folder)
    name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    if not is_adapter_folder(folder):
        config = _sonett_config(folder, f"{folder / CONFIG_FILE}")
        if base_model is not None and not is_hub_id(base_model):
            raise CardError(f"--base_model {base_model!r} is not a Hub repository id; give OWNER/NAME.")
        logger.info("generating the model card of %s from its config", folder)
        return render_model_card(config, count_parameters(config), results, name, repo_id, base_model=base_model)
    adapter_config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    base = adapter_base_model(adapter_config, base_model)
    named = adapter_config.get("base_model_name_or_path")
    local_base = Path(named).expanduser() if isinstance(named, str) and named else None
    if local_base is not None and (local_base / CONFIG_FILE).is_file():
        config = _sonett_config(local_base, f"the base model's config ({local_base / CONFIG_FILE})")
    else:
        config = _sonett_config(base, f"the config of the base model {base}")
    logger.info("generating the model card of the adapter %s (base %s)", folder, base)
    facts = adapter_facts(folder, adapter_config)
    return render_model_card(config, count_parameters(config), results, name, repo_id, base_model=base, adapter=facts)


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "CardError",
    "adapter_base_model",
    "adapter_facts",
    "count_parameters",
    "folder_model_card",
    "is_adapter_folder",
    "is_placeholder_card",
    "read_results",
]

"""Write a Hub-ready Sonett folder: safetensors weights, config with `auto_map`, remote code, tokenizer,
generation config, a filled model card and the measured results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .model_card import render_model_card

logger = logging.getLogger(__name__)

RESULTS_FILE = "training_results.json"


def count_parameters(model: PreTrainedModel) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def write_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    results: dict,
    model_name: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Save everything a Hub repository of this model needs into `output_dir`.

    Args:
        model: a Sonett model (its `save_pretrained` writes the full `auto_map` and copies the code files).
        tokenizer: the tokenizer to ship with it.
        output_dir: the folder; created if needed.
        results: measured facts for the model card, also written to `training_results.json`.
        model_name: the card's title (the folder name by default).
        repo_id: the Hub id used in the card's usage example.

    Returns:
        The folder path.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    name = model_name or output_dir.name
    card = render_model_card(model.config, count_parameters(model), results, name, repo_id=repo_id)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s", output_dir)
    return output_dir


def add_quality_results(folder: str | Path, rows: list[dict]) -> None:
    """Add side-by-side rows (see `sonett.model_card.quality_rows`) to a Sonett folder's results and re-render its card.

    A row replaces an earlier one of the same `evaluation`. The folder must hold a Sonett config; its
    `training_results.json` is created if missing.
    """
    from .configuration_sonett import SonettConfig

    folder = Path(folder)
    config = SonettConfig.from_pretrained(folder)
    results_file = folder / RESULTS_FILE
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    names = {row["evaluation"] for row in rows}
    results["quality"] = [row for row in results.get("quality", []) if row["evaluation"] not in names] + rows
    parameters = results.get("parameters")
    if parameters is None:
        from .modeling_sonett import SonettForCausalLM

        with torch.device("meta"):
            parameters = count_parameters(SonettForCausalLM(config))
    card = render_model_card(config, parameters, results, folder.name, repo_id=str(folder))
    results_file.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(card, encoding="utf-8")


def write_baseline_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path, results: dict
) -> Path:
    """Save a baseline model (a plain transformers architecture) with its tokenizer and `training_results.json`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s", output_dir)
    return output_dir


__all__ = ["add_quality_results", "count_parameters", "write_baseline_folder", "write_model_folder"]

"""Write a Hub-ready Sonett folder: safetensors weights, config with `auto_map`, remote code, tokenizer,
generation config, a filled model card and the measured results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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


__all__ = ["count_parameters", "write_model_folder"]

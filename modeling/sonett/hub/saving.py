"""Write a Hub-ready Sonett folder: safetensors weights, config with `auto_map`, remote code, tokenizer,
generation config (stopping at the end of a chat turn), a filled model card and the measured results."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from sonett.data.tokenizer import TURN_END_TOKEN
from sonett.hub.loading import check_saved_code
from sonett.hub.model_card import render_model_card
from sonett.hub.upload import relative_local_paths

logger = logging.getLogger(__name__)

RESULTS_FILE = "training_results.json"
# The reply length when the caller sets none: transformers' own text-generation pipeline default, long enough for a
# chat answer and short enough that a reply that never ends stops within seconds on a CPU. (generate's built-in
# default, 20 tokens including nothing of the prompt, cuts most answers off mid-sentence.)
DEFAULT_MAX_NEW_TOKENS = 256


def chat_stop_token_ids(tokenizer: PreTrainedTokenizerBase | ProcessorMixin) -> list[int]:
    """The ids that end a reply: the tokenizer's eos token and the chat template's turn end `<|end|>`, if present."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    ids = [tokenizer.eos_token_id]
    if TURN_END_TOKEN in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(TURN_END_TOKEN))
    return list(dict.fromkeys(i for i in ids if i is not None))


def chat_generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | ProcessorMixin
) -> GenerationConfig:
    """A copy of `model.generation_config` with Sonett's defaults: every end token and a default reply length.

    `eos_token_id` lists `chat_stop_token_ids` (generate, `pipeline("text-generation")` and `transformers serve`
    then stop at the end of the assistant turn), `pad_token_id` / `bos_token_id` come from the tokenizer, and
    `max_new_tokens` is `DEFAULT_MAX_NEW_TOKENS`, at most half of `max_position_embeddings`. Settings the caller
    already chose (another `max_new_tokens`, sampling) are kept.
    """
    config = copy.deepcopy(model.generation_config)
    config._from_model_config = False  # no longer only what the model config implies
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    stop = chat_stop_token_ids(tok)
    if stop:
        config.eos_token_id = stop if len(stop) > 1 else stop[0]
    if tok.pad_token_id is not None:
        config.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        config.bos_token_id = tok.bos_token_id
    if config.max_new_tokens is None:
        limit = getattr(model.config, "max_position_embeddings", None)
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS if limit is None else min(DEFAULT_MAX_NEW_TOKENS, limit // 2)
    return config


def save_model_and_tokenizer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | ProcessorMixin, output_dir: str | Path
) -> Path:
    """`save_pretrained` of a model and its tokenizer (or processor) into one folder, with `chat_generation_config`.

    Every folder Sonett writes for use (training output, merged adapters, multimodal models, baselines) goes through
    here, so its `generation_config.json` stops at the end of a chat turn, and its only code files are the package's
    shipped ones (`sonett.hub.loading.check_saved_code` refuses objects loaded from a folder's own code and a folder
    that already holds other `.py` files).
    """
    output_dir = Path(output_dir)
    check_saved_code(output_dir, model, tokenizer)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = chat_generation_config(model, tokenizer)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


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

    Absolute local paths in `results` and `repo_id` (data files, arguments, a checkpoint, the folder itself) are
    written relative to the working directory or the folder, or as a file name alone (`relative_local_paths`), so the
    card and `training_results.json` never publish where the files lay on this machine.

    Args:
        model: a Sonett model (its `save_pretrained` writes the full `auto_map` and copies the code files).
        tokenizer: the tokenizer to ship with it.
        output_dir: the folder; created if needed.
        results: measured facts for the model card, also written to `training_results.json`.
        model_name: the card's title (the folder name by default).
        repo_id: the Hub id (or the local folder) used in the card's usage example.

    Returns:
        The folder path.
    """
    output_dir = save_model_and_tokenizer(model, tokenizer, output_dir)
    results = relative_local_paths(results, output_dir)
    repo_id = relative_local_paths(repo_id, output_dir)
    name = model_name or output_dir.name
    card = render_model_card(model.config, count_parameters(model), results, name, repo_id=repo_id)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s", output_dir)
    return output_dir


def add_quality_results(folder: str | Path, rows: list[dict]) -> None:
    """Add side-by-side rows (see `sonett.hub.model_card.quality_rows`) to a Sonett folder's results and re-render
    its card.

    A row replaces an earlier one of the same `evaluation`. The folder must hold a Sonett config; its
    `training_results.json` is created if missing.
    """
    from sonett.model.configuration_sonett import SonettConfig

    folder = Path(folder)
    config = SonettConfig.from_pretrained(folder)
    results_file = folder / RESULTS_FILE
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    names = {row["evaluation"] for row in rows}
    results["quality"] = [row for row in results.get("quality", []) if row["evaluation"] not in names] + rows
    results = relative_local_paths(results, folder)  # commands name local folders
    parameters = results.get("parameters")
    if parameters is None:
        from sonett.evaluation.footprint import meta_model

        parameters = count_parameters(meta_model(config))
    repo_id = relative_local_paths(str(folder), folder)
    card = render_model_card(config, parameters, results, folder.name, repo_id=repo_id)
    results_file.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(card, encoding="utf-8")


def write_baseline_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path, results: dict
) -> Path:
    """Save a baseline model (a plain transformers architecture) with its tokenizer and `training_results.json`."""
    output_dir = save_model_and_tokenizer(model, tokenizer, output_dir)
    results = relative_local_paths(results, output_dir)
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s", output_dir)
    return output_dir


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "add_quality_results",
    "chat_generation_config",
    "chat_stop_token_ids",
    "count_parameters",
    "save_model_and_tokenizer",
    "write_baseline_folder",
    "write_model_folder",
]

"""Fill the Hub model card (README.md) of a Sonett folder from its config, its measured results and a Jinja template.

The metadata (the card's YAML header, read by the Hub's widgets and `huggingface_hub.ModelCard.load`) is built as a
`huggingface_hub.ModelCardData` (`card_metadata`), measured results included as `EvalResult`s, and reaches the
template as `card_data` (its YAML), as `ModelCard.from_template` does. The template ships inside the package
(`model_card_template.md`, next to this file) so that an installed package renders the same card as a checkout;
`render_model_card(..., template_path=...)` takes another one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from sonett.model.configuration_sonett import SonettConfig

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")

DEFAULT_INTENDED_USE = (
    "Research on hybrid attention architectures and a working example of a custom model in the Hugging Face "
    "ecosystem: loading, generation, fine-tuning and sharing."
)

# Results that describe the training run; the card lists them under "Training", every other number under "Results".
TRAINING_KEYS = (
    "training_data",
    "steps",
    "tokens_seen",
    "batch_tokens",
    "block_size",
    "learning_rate",
    "hardware",
    "precision",
    "train_runtime",
)
NOT_METRICS = (
    *TRAINING_KEYS,
    "parameters",
    "trainable_parameters",
    "train_tokens_per_second",
    "total_runtime_seconds",
    "wall_time_s",
)
MISSING = "n/a"
LICENSE = "apache-2.0"
# A result whose name ends in one of these words is a measurement (an `EvalResult`): `validation_loss`,
# `digits_accuracy`; training-side numbers (`final_train_loss`) and counts (`validation_tokens`) are not.
METRIC_TYPES = ("loss", "perplexity", "accuracy")
NOT_EVALUATIONS = ("train_", "final_")
# The dataset of an evaluation when the results name no Hub dataset (a local corpus).
LOCAL_DATASET = "custom"


def layer_mix(layer_types: list[str]) -> str:
    """A short summary such as `3 sliding_attention + 1 full_attention`."""
    counts = Counter(layer_types)
    return " + ".join(f"{count} {kind}" for kind, count in counts.items())


def hierarchy_sentence(config: SonettConfig) -> str:
    """`layers 1-3 run on the sequence shortened 2x (hourglass, linear pooling, repeat upsampling)`, or ""."""
    settings = getattr(config, "hierarchy_settings", None)
    if settings is None:
        return ""
    span = settings.span
    return (
        f"layers {span.start}-{span.stop - 1} run on the sequence shortened {settings.shorten_factor}x "
        f"(hourglass, {settings.pooling} pooling, {settings.upsampling} upsampling)"
    )


def hierarchy_summary(config: SonettConfig) -> str:
    """The hierarchy sentence as a suffix for the layer mix (`; layers 1-3 run on ...`), or ""."""
    sentence = hierarchy_sentence(config)
    return f"; {sentence}" if sentence else ""


def format_value(value: object) -> str:
    """Thousands separators for integers, four decimals for floats (scientific below 1e-3), text as is."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def metric_rows(results: dict) -> list[tuple[str, str]]:
    """(label, formatted value) for every top-level number in `results` that is not a training fact.

    `validation_loss` becomes the row `validation loss`; nested values (loss curves, arguments) are left out.
    """
    rows = []
    for key, value in results.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append((key.replace("_", " "), format_value(value)))
    return rows


def quality_rows(results: dict) -> list[dict]:
    """The side-by-side rows `results["quality"]` holds (see `sonett.evaluation.comparison`), each with the keys "
    "`evaluation`,
    `model`, `llama`, `target` and `command`, every value as text; [] when there are none."""
    rows = []
    for row in results.get("quality", []):
        missing = {"evaluation", "model", "llama", "target", "command"} - set(row)
        if missing:
            raise ValueError(f"A quality row lacks {sorted(missing)}: {row}; give every key (text, may be empty).")
        rows.append({key: str(row[key]) for key in ("evaluation", "model", "llama", "target", "command")})
    return rows


def vision_facts(config: SonettConfig) -> dict | None:
    """The vision encoder's settings for the card, or None for a text-only config."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    visual_tokens = vision.num_visual_tokens or vision.num_patches
    return {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "stem": getattr(vision, "stem", "patchify"),
        "hidden_size": vision.hidden_size,
        "num_layers": vision.num_hidden_layers,
        "num_heads": vision.num_attention_heads,
        "visual_tokens": visual_tokens,
        "cross_attention_layers": ", ".join(str(i) for i in config.cross_attention_layers or []) or "none",
    }


def pipeline_tag(config: SonettConfig) -> str:
    """`image-text-to-text` for a model with a vision encoder, else `text-generation`."""
    return "image-text-to-text" if getattr(config, "vision_config", None) is not None else "text-generation"


def is_hub_id(name: object) -> bool:
    """Whether `name` reads as a Hub repository id (`owner/name` or `name`) rather than a local path."""
    if not isinstance(name, str) or not name or name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    if name.count("/") > 1 or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_datasets(results: dict) -> list[str]:
    """The Hub datasets the model was trained on: `results["datasets"]`, else the training run's `dataset_name`
    argument; local corpora are not Hub datasets and are left out."""
    named = results.get("datasets") or (results.get("arguments") or {}).get("dataset_name") or []
    return [name for name in ([named] if isinstance(named, str) else named) if is_hub_id(name)]


def eval_results(results: dict, task_type: str) -> list[EvalResult]:
    """One `EvalResult` per measured number of `results` (a top-level `*_loss`, `*_perplexity` or `*_accuracy`, or a
    fine-tune's `*_after`; not a training loss, nor a fine-tune's `*_before`), on the Hub dataset trained on if there
    is one, else on the described local data."""
    datasets = hub_datasets(results)
    described = str(results.get("training_data") or "held-out data")
    evaluations = []
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key.startswith(NOT_EVALUATIONS):
            continue
        metric = key.removesuffix("_after").rsplit("_", 1)[-1]  # a fine-tune's `validation_loss_after`
        if metric not in METRIC_TYPES:
            continue
        evaluations.append(
            EvalResult(
                task_type=task_type,
                dataset_type=datasets[0] if datasets else LOCAL_DATASET,
                dataset_name=datasets[0] if datasets else described,
                dataset_split="validation" if key.startswith("validation") else None,
                metric_type=metric,
                metric_name=key.replace("_", " "),
                metric_value=value,
            )
        )
    return evaluations


def card_metadata(
    config: SonettConfig,
    results: dict,
    model_name: str,
    base_model: str | None = None,
    adapter: dict | None = None,
) -> ModelCardData:
    """The card's metadata: license, library (`transformers`, or `peft` for an adapter), pipeline tag, tags, Hub
    datasets, base model and the measured results as `eval_results`.

    Args:
        config: the model's config (an adapter's: its base model's).
        results: measured facts (see `render_model_card`).
        model_name: the name the evaluation results are filed under.
        base_model: the Hub id of the model this one derives from (an adapter's base, a merged fine-tune's base).
        adapter: the adapter's facts (`adapter_facts`), or None for a full model.
    """
    tags = ["sonett", "hybrid-attention"]
    tags += ["multimodal"] if getattr(config, "vision_config", None) is not None else []
    tags += ["hourglass"] if getattr(config, "hierarchy_settings", None) is not None else []
    tags += [adapter["peft_type"].lower()] if adapter else []
    tags += ["custom_code"]
    task = pipeline_tag(config)
    evaluations = eval_results(results, task)
    return ModelCardData(
        license=LICENSE,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=task,
        tags=tags,
        datasets=hub_datasets(results) or None,
        base_model=base_model,
        model_name=model_name if evaluations else None,  # names the results (`model-index`), written only with them
        eval_results=evaluations or None,
    )


def card_values(
    config: SonettConfig,
    num_parameters: int,
    results: dict,
    model_name: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    adapter: dict | None = None,
) -> dict:
    """Everything the template reads, already formatted; missing training facts print as "n/a". `card_data` is the
    YAML of `card_metadata`, for the card's header."""
    hierarchy = None
    if getattr(config, "hierarchy_settings", None) is not None:
        hierarchy = {"sentence": hierarchy_sentence(config), "factor": config.hierarchy_settings.shorten_factor}
    vision = vision_facts(config)
    metadata = card_metadata(config, results, model_name, base_model, adapter)
    return {
        "card_data": metadata.to_yaml(),
        "model_name": model_name,
        "repo_id": repo_id or model_name,
        "base_model": base_model,
        "adapter": adapter,
        "pipeline_tag": metadata.pipeline_tag,
        "parameters": format_value(num_parameters),
        "num_layers": config.num_hidden_layers,
        "layer_mix": layer_mix(config.layer_types),
        "hierarchy_note": hierarchy_summary(config),
        "layer_types": ", ".join(config.layer_types),
        "kinds": sorted(set(config.layer_types)),
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "sliding_window": config.sliding_window,
        "adaptive_span": bool(getattr(config, "adaptive_span", False)),
        "vocab_size": config.vocab_size,
        "hierarchy": hierarchy,
        "vision": vision,
        "training": {key: format_value(results[key]) if key in results else MISSING for key in TRAINING_KEYS},
        "metrics": metric_rows(results),
        "quality": quality_rows(results),
        "intended_use": results.get("intended_use", DEFAULT_INTENDED_USE),
        "missing": MISSING,
    }


def render_model_card(
    config: SonettConfig,
    num_parameters: int,
    results: dict,
    model_name: str,
    repo_id: str | None = None,
    template_path: Path | None = None,
    base_model: str | None = None,
    adapter: dict | None = None,
) -> str:
    """The model card (README.md) text: the metadata header (`card_metadata`) and the template's body.

    Args:
        config: the model's config.
        num_parameters: trainable parameters (tied weights counted once).
        results: measured facts. Training facts (`training_data`, `steps`, `tokens_seen`, `batch_tokens`,
            `block_size`, `learning_rate`, `hardware`, `precision`, `train_runtime`) print as "n/a" when missing;
            every other top-level number (`validation_loss`, `digits_accuracy`, ...) becomes a row of the results
            table; `intended_use` replaces the default paragraph.
        model_name: the card's title.
        repo_id: the Hub id shown in the usage example (defaults to `model_name`).
        template_path: a Jinja template; the packaged `model_card_template.md` by default. It reads the header
            as `{{ card_data }}` (YAML), as `huggingface_hub.ModelCard.from_template` templates do.
        base_model: the Hub id of the base model (metadata `base_model`, and an adapter's usage example).
        adapter: for a PEFT adapter, its facts (`peft_type`, `rank`, `alpha`, `target_modules`,
            `trainable_parameters`); `config` and `num_parameters` then describe the base model.
    """
    path = Path(template_path) if template_path is not None else TEMPLATE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template not found at {path}; pass template_path= or reinstall sonett with its package data."
        )
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    try:
        template = environment.from_string(path.read_text(encoding="utf-8"))
        values = card_values(config, num_parameters, results, model_name, repo_id, base_model, adapter)
        return template.render(values)
    except jinja2.TemplateError as error:
        raise ValueError(f"Model card template {path} failed to render: {error}. Fix the template.") from error


__all__ = [
    "card_metadata",
    "card_values",
    "eval_results",
    "hierarchy_summary",
    "hub_datasets",
    "is_hub_id",
    "layer_mix",
    "metric_rows",
    "pipeline_tag",
    "quality_rows",
    "render_model_card",
]

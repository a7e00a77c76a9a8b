"""Fill the Hub model card (README.md) of a Sonett folder from its config, its measured results and a Jinja template.

The template ships inside the package (`model_card_template.md`, next to this file) so that an installed package
renders the same card as a checkout; `render_model_card(..., template_path=...)` takes another one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import jinja2

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


def card_values(
    config: SonettConfig, num_parameters: int, results: dict, model_name: str, repo_id: str | None = None
) -> dict:
    """Everything the template reads, already formatted; missing training facts print as "n/a"."""
    hierarchy = None
    if getattr(config, "hierarchy_settings", None) is not None:
        hierarchy = {"sentence": hierarchy_sentence(config), "factor": config.hierarchy_settings.shorten_factor}
    vision = vision_facts(config)
    return {
        "model_name": model_name,
        "repo_id": repo_id or model_name,
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
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
) -> str:
    """The model card (README.md) text.

    Args:
        config: the model's config.
        num_parameters: trainable parameters (tied weights counted once).
        results: measured facts. Training facts (`training_data`, `steps`, `tokens_seen`, `batch_tokens`,
            `block_size`, `learning_rate`, `hardware`, `precision`, `train_runtime`) print as "n/a" when missing;
            every other top-level number (`validation_loss`, `digits_accuracy`, ...) becomes a row of the results
            table; `intended_use` replaces the default paragraph.
        model_name: the card's title.
        repo_id: the Hub id shown in the usage example (defaults to `model_name`).
        template_path: a Jinja template; the packaged `model_card_template.md` by default.
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
        return template.render(card_values(config, num_parameters, results, model_name, repo_id))
    except jinja2.TemplateError as error:
        raise ValueError(f"Model card template {path} failed to render: {error}. Fix the template.") from error


__all__ = ["card_values", "hierarchy_summary", "layer_mix", "metric_rows", "quality_rows", "render_model_card"]

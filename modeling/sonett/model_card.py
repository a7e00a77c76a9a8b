"""Fill the Hub model card of a Sonett folder from `model_cards/template.md`, its config and its results."""

from __future__ import annotations

import string
from collections import Counter
from pathlib import Path

from .configuration_sonett import SonettConfig

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "model_cards" / "template.md"

DEFAULT_INTENDED_USE = (
    "Research on hybrid attention architectures and a working example of a custom model in the Hugging Face "
    "ecosystem: loading, generation, fine-tuning and sharing."
)


def layer_mix(layer_types: list[str]) -> str:
    """A short summary such as `3 sliding_attention + 1 full_attention`."""
    counts = Counter(layer_types)
    return " + ".join(f"{count} {kind}" for kind, count in counts.items())


def hierarchy_summary(config: SonettConfig) -> str:
    """`; layers 1-3 run on the sequence shortened 2x (hourglass, linear pooling, repeat upsampling)`, or ""."""
    if not getattr(config, "hierarchy", None):
        return ""
    span = config.hierarchy_span()
    pooling = config.hierarchy.get("pooling", "linear")
    upsampling = config.hierarchy.get("upsampling", "repeat")
    return (
        f"; layers {span.start}-{span.stop - 1} run on the sequence shortened "
        f"{config.hierarchy['shorten_factor']}x (hourglass, {pooling} pooling, {upsampling} upsampling)"
    )


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
        results: training facts: `training_data`, `steps`, `tokens_seen`, `batch_tokens`, `learning_rate`,
            `hardware`, `precision`, `train_runtime`, `validation_loss`, `validation_perplexity`,
            `validation_tokens`, `block_size`; missing ones print as "n/a".
        model_name: the card's title.
        repo_id: the Hub id shown in the usage example (defaults to `model_name`).
        template_path: the template; `model_cards/template.md` of the checkout by default.
    """
    path = template_path or TEMPLATE_PATH
    if not path.is_file():
        raise FileNotFoundError(f"Model card template not found at {path}; pass template_path.")
    template = path.read_text()
    values = {key: f"{value:,}" if isinstance(value, int) else value for key, value in results.items()}
    values.update({key: f"{value:.4f}" for key, value in results.items() if isinstance(value, float)})
    values.update(
        {
            "model_name": model_name,
            "repo_id": repo_id or model_name,
            "parameters": f"{num_parameters:,}",
            "num_layers": config.num_hidden_layers,
            "layer_mix": layer_mix(config.layer_types) + hierarchy_summary(config),
            "layer_types": ", ".join(config.layer_types),
            "hidden_size": config.hidden_size,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": config.num_key_value_heads,
            "sliding_window": config.sliding_window,
            "vocab_size": config.vocab_size,
        }
    )
    values.setdefault("intended_use", DEFAULT_INTENDED_USE)
    placeholders = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(template)}
    return string.Template(template).substitute({key: values.get(key, "n/a") for key in placeholders if key})


__all__ = ["hierarchy_summary", "layer_mix", "render_model_card"]

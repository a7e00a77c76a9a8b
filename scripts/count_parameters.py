#!/usr/bin/env python
"""Print the parameter count of every preset in configuration/ as a Markdown table (weights on the meta device)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from sonett import SonettForCausalLM
from sonett.presets import config_from_preset, load_preset

PRESET_DIR = Path(__file__).resolve().parents[1] / "configuration"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print("| preset | parameters | layers (kinds) | hidden | heads / KV heads | window | vocab |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for path in PRESET_DIR.glob("sonett-*.json"):
        config = config_from_preset(load_preset(str(path)))
        with torch.device("meta"):
            model = SonettForCausalLM(config)
        rows.append((sum(p.numel() for p in model.parameters()), path, config))
    for count, path, config in sorted(rows, key=lambda row: row[0]):
        kinds = ", ".join(f"{n} {k.split('_')[0]}" for k, n in Counter(config.layer_types).items())
        if (settings := config.hierarchy_settings) is not None:
            span = settings.span
            kinds += f"; layers {span.start}-{span.stop - 1} shortened {settings.shorten_factor}x"
        print(
            f"| `{path.stem}` | {count / 1e6:,.1f} M | {config.num_hidden_layers} ({kinds}) | {config.hidden_size} "
            f"| {config.num_attention_heads} / {config.num_key_value_heads} | {config.sliding_window} "
            f"| {config.vocab_size:,} |"
        )


if __name__ == "__main__":
    main()

"""What a Sonett model is made of, from its config alone: the layer mix, the parameters by part and layer kind, and
the decoding state (bytes per token and constant bytes) beside an equal-size Llama's KV cache.

    sonett info runs/sonett-tiny                # a folder written by save_pretrained (no code of it runs)
    sonett info sonett-small --dtype bfloat16   # a preset by name (or a preset JSON file)
    sonett info sonett-tiny --json              # machine-readable
    sonett info                                 # every shipped preset, as a Markdown table

Nothing is loaded but config.json: the model is built on the meta device. A folder is checked first as every
loader of the package checks it (`sonett.hub.loading.check_model_folder`). Softmax (`full_attention`) layers keep
every token's keys and values, so their state grows per token; `sliding_attention` and `memory_attention` layers
keep at most a window; `linear_attention` layers and the memory hold a constant state
(`sonett.evaluation.footprint`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sonett.cli.parsing import argument_parser, spellings
from sonett.evaluation.footprint import footprint
from sonett.model.configuration_sonett import SonettConfig

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CONTEXTS = [1024, 8192, 32768, 131072]


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett info`."""
    parser = argument_parser("info", __doc__)
    parser.add_argument(
        "model",
        nargs="*",
        help="model folders, preset names or preset JSON files (none: every shipped preset, as a table)",
    )
    parser.add_argument(*spellings("json"), action="store_true", help="print JSON instead of text")
    parser.add_argument(
        *spellings("dtype"),
        choices=DTYPES,
        default=None,
        help="dtype of the decoding state (default: the folder's saved dtype, float32 for a preset)",
    )
    parser.add_argument(
        *spellings("contexts"),
        type=int,
        nargs="+",
        default=DEFAULT_CONTEXTS,
        help="context lengths at which to give the exact state size",
    )
    return parser


def load_config(target: str) -> tuple[SonettConfig, str]:
    """The config of a model folder (checked, no code run) or of a preset; and what it was ("folder", "preset")."""
    from sonett.hub.loading import check_model_folder
    from sonett.presets import config_from_preset, load_preset, preset_names

    path = Path(target).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; pass a folder written by save_pretrained (or `sonett train`), or a "
                f"preset name: one of {preset_names()}."
            )
        check_model_folder(path)
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type != SonettConfig.model_type:
            raise ValueError(
                f"{path} holds a {model_type!r} model, not a Sonett one; `sonett info` reads Sonett folders and "
                "presets."
            )
        return SonettConfig.from_pretrained(path), "folder"
    if not path.exists() and ("/" in target or target.endswith(".json")):  # a path, not a preset name
        raise FileNotFoundError(
            f"No model folder or preset file at {target}; pass a folder written by save_pretrained (or `sonett "
            f"train`), a preset JSON file, or a preset name: one of {preset_names()}."
        )
    return config_from_preset(load_preset(target)), "preset"


def state_dtype(config: SonettConfig, requested: str | None) -> torch.dtype:
    """The dtype of the decoding state: as requested, else the config's saved dtype, else float32."""
    if requested is not None:
        return getattr(torch, requested)
    saved = getattr(config, "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else torch.float32


def human(size: float) -> str:
    """Bytes as `123 B`, `1.5 KiB`, `12.0 MiB`, ..."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def describe(target: str, kind: str, info: dict) -> str:
    """The text report of one model."""
    layers, parameters, state, llama = info["layers"], info["parameters"], info["state"], info["llama"]
    lines = [f"{target} ({kind}): {info['architecture']}"]
    mix = ", ".join(f"{count} {name}" for name, count in layers["kinds"].items())
    lines.append(f"layers:      {layers['count']} = {mix}")
    lines.append(f"  order:     {', '.join(kind.split('_')[0] for kind in layers['layer_types'])}")
    window = layers["sliding_window"]
    if window and {"sliding_attention", "memory_attention"} & set(layers["kinds"]):
        spans = " (adaptive spans: at most this)" if layers["adaptive_span"] else ""
        lines.append(f"  window:    {window} tokens{spans}")
    hierarchy = layers["hierarchy"]
    if hierarchy:
        shortened = ", ".join(f"{count} {name}" for name, count in hierarchy["shortened_kinds"].items())
        lines.append(
            f"  hierarchy: layers {hierarchy['start_layer']}-{hierarchy['end_layer'] - 1} ({shortened}) run on the "
            f"sequence shortened {hierarchy['shorten_factor']}x"
        )
    else:
        lines.append("  hierarchy: none (a flat stack)")
    lines.append(f"parameters:  {parameters['total']:,}")
    tied = " (tied with the output head)" if not parameters["output_head"] else ""
    rows = [("embedding", parameters["embedding"], tied)]
    if parameters["output_head"]:
        rows.append(("output head", parameters["output_head"], ""))
    for name, count in parameters["per_kind"].items():
        layer_count = layers["kinds"][name]
        rows.append((name, count, f" ({layer_count} layer{'s' if layer_count > 1 else ''})"))
    for name in ("hourglass", "cross_attention", "vision", "final_norm"):
        if parameters[name]:
            rows.append((name.replace("_", " "), parameters[name], ""))
    for name, count, note in rows:
        lines.append(f"  {name:<18}{count:>14,}  {count / parameters['total']:6.1%}{note}")
    matched = "parameter-matched" if llama["parameter_matched"] else "same shape, not matched within 5%"
    lines.append(
        f"decode state (batch 1, {state['dtype']}): Sonett beside an equal-size Llama "
        f"({llama['parameters']:,} parameters, {matched})"
    )
    if parameters["vision"]:
        lines.append("  (text tokens; each image adds its cross-attention keys and values; Llama: the text model)")
    lines.append(f"  {'':<18}{'Sonett':>14}  {'Llama':>14}")
    lines.append(f"  {'per token':<18}{human(state['per_token_bytes']):>14}  {human(llama['per_token_bytes']):>14}")
    lines.append(f"  {'constant':<18}{human(state['constant_bytes']):>14}  {human(llama['constant_bytes']):>14}")
    for tokens, size in state["at_bytes"].items():
        ratio = llama["at_bytes"][tokens] / size if size else float("inf")
        lines.append(
            f"  {f'at {int(tokens):,} tokens':<18}{human(size):>14}  {human(llama['at_bytes'][tokens]):>14}"
            f"  (Llama / Sonett {ratio:,.1f}x)"
        )
    return "\n".join(lines)


def preset_table(infos: list[tuple[str, dict]]) -> str:
    """A Markdown table of several models, smallest first."""
    lines = [
        "| preset | parameters | layers (kinds) | hidden | heads / KV heads | window | vocab | state per token "
        "| constant state |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, info in sorted(infos, key=lambda item: item[1]["parameters"]["total"]):
        layers, shape, state = info["layers"], info["shape"], info["state"]
        kinds = ", ".join(f"{count} {kind.split('_')[0]}" for kind, count in layers["kinds"].items())
        if layers["hierarchy"]:
            h = layers["hierarchy"]
            kinds += f"; layers {h['start_layer']}-{h['end_layer'] - 1} shortened {h['shorten_factor']}x"
        lines.append(
            f"| `{name}` | {info['parameters']['total'] / 1e6:,.1f} M | {layers['count']} ({kinds}) "
            f"| {shape['hidden_size']} | {shape['num_attention_heads']} / {shape['num_key_value_heads']} "
            f"| {layers['sliding_window']} | {shape['vocab_size']:,} | {human(state['per_token_bytes'])} "
            f"| {human(state['constant_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.contexts):
        parser.error(f"--contexts must be positive token counts, got {args.contexts}.")
    from sonett.presets import preset_names

    targets = args.model or preset_names()
    results = []
    for target in targets:
        try:
            config, kind = load_config(target)
        except (FileNotFoundError, ValueError) as error:  # names the problem and the fix
            parser.error(str(error))
        info = footprint(config, state_dtype(config, args.dtype), tuple(args.contexts))
        results.append((target, kind, {"model": target, "source": kind, **info}))
    if args.json:
        payload = [info for _, _, info in results]
        print(json.dumps(payload[0] if len(args.model) == 1 else payload, indent=2))
    elif len(results) == 1:
        print(describe(*results[0]))
    else:
        print(preset_table([(target, info) for target, _, info in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

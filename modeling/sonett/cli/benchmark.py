"""Speed and memory of a Sonett preset against a transformers `LlamaForCausalLM` of equal parameter count, on CPU.

Llama gets Sonett's width, depth, heads, KV heads and vocabulary, and its MLP is widened until the parameter counts
match. Random weights, fp32, sdpa attention. Three sections (`--sections`, default all):

- train: training tokens/s of one step (forward with labels, backward, AdamW step, zero_grad) for each of
  `--train_presets` at each of its contexts, batch so that a step holds 4,096 tokens; one warm-up step, then the
  best of `--repeats` with both models interleaved in one process;
- prefill: the long-context table for `--preset` at `--contexts`, each measurement in a fresh process: prefill
  time (one forward, logits of the last position only, as `generate()` does), peak resident memory during prefill,
  decode ms/token and cache size;
- decode: ms/token at `--contexts` for both models eager (dynamic caches) and compiled (`torch.compile(fullgraph=
  True)` of the one-token step over a static cache; compile time printed on its own), interleaved in one process.

Train and prefill rows also give FLOPs per token counted from the config (docs/benchmarks.md), the achieved FLOP/s
and their fraction of the machine's fp32 matmul peak, which the run measures first (`torch.mm` of square fp32
matrices on the same threads). It prints Markdown tables and writes one PNG plot per section (`--plot` prefix).

    sonett benchmark                                            # every row of docs/benchmarks.md
    sonett benchmark --sections decode --contexts 1024 16384    # one section
    sonett benchmark --sections train --train_presets sonett-tiny@512,4096 sonett-mini@512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sonett.cli.parsing import argument_parser, spellings
from sonett.evaluation.benchmark import (
    DECODE_MODES,
    MODELS,
    SECTIONS,
    decode_table,
    markdown_table,
    matmul_peak_flops,
    measure,
    measure_decode,
    measure_in_fresh_process,
    measure_training,
    training_table,
)

# The training rows: sonett-tiny at the --train_contexts, the hourglass at 4k and the hidden-512 preset at 512.
DEFAULT_TRAIN_PRESETS = ["sonett-tiny", "sonett-tiny-hourglass@4096", "sonett-mini@512"]


def train_preset(spec: str) -> tuple[str, list[int] | None]:
    """`PRESET` or `PRESET@N,M`: a preset (name or JSON file) and its own training contexts (None: --train_contexts)."""
    preset, _, contexts = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not preset:
        raise argparse.ArgumentTypeError(f"{spec!r} names no preset; write PRESET or PRESET@CONTEXT[,CONTEXT...].")
    if not contexts:
        return preset, None
    try:
        values = [int(value) for value in contexts.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: the contexts after @ must be integers >= 2 separated by commas, e.g. {preset}@512,4096."
        )
    return preset, values


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def plot_path(prefix: Path, section: str) -> Path:
    """`runs/benchmark` (or `runs/benchmark.png`) -> `runs/benchmark-SECTION.png`."""
    stem = prefix.with_suffix("") if prefix.suffix == ".png" else prefix
    return stem.with_name(f"{stem.name}-{section}.png")


def _figure(columns: int, width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width, 3.8), squeeze=False)
    return plt, figure, list(axes[0])


def _save(plt, figure, path: Path, title: str) -> None:
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_prefill(rows: list[dict], path: Path, preset: str) -> None:
    """Prefill time, peak memory, decode time and cache size against the context length, both models."""
    plt, figure, axes = _figure(4, 17)
    metrics = [("prefill_s", "prefill (s)"), ("peak_mb", "peak memory in prefill (MiB)"),
               ("decode_ms", "decode (ms / token)"), ("cache_mb", "cache (MiB)")]  # fmt: skip
    for axis, (key, label) in zip(axes, metrics):
        for name, style in (("sonett", "o-"), ("llama", "s--")):
            points = [(r["context"], r[key]) for r in rows if r["model"] == name]
            axis.plot([p[0] for p in points], [max(p[1], 1e-3) for p in points], style, label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[0].legend()
    _save(plt, figure, path, f"{preset} vs LlamaForCausalLM of equal parameter count (CPU, fp32, batch 1)")


def plot_train(rows: list[dict], path: Path, peak_flops: float) -> None:
    """Training tokens/s and fraction of the matmul peak per preset and context, both models side by side."""
    plt, figure, axes = _figure(2, 13)
    labels = list(dict.fromkeys(f"{r['preset']}\n{r['context']:,}" for r in rows))
    for axis, (key, title) in zip(axes, (("tokens_per_s", "training tokens/s"), ("fraction", "of fp32 matmul peak"))):
        for offset, name in ((-0.2, "sonett"), (0.2, "llama")):
            values = [
                r["tokens_per_s"] if key == "tokens_per_s" else r["flops_per_token"] * r["tokens_per_s"] / peak_flops
                for r in rows
                if r["model"] == name
            ]
            axis.bar([i + offset for i in range(len(values))], values, width=0.4, label=name)
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
        if key == "tokens_per_s":
            axis.set_yscale("log")  # presets of different widths differ by orders of magnitude
        axis.set_title(title)
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend()
    _save(plt, figure, path, "training step against LlamaForCausalLM of equal parameter count (CPU, fp32)")


def plot_decode(rows: list[dict], path: Path, preset: str) -> None:
    """ms/token against the context length, Sonett and Llama, eager and compiled."""
    plt, figure, axes = _figure(1, 7)
    for name in MODELS:
        marker = "o" if name == "sonett" else "s"
        for mode, style in (("eager", f"{marker}-"), ("compiled", f"{marker}--")):
            points = [(r["context"], r["decode_ms"]) for r in rows if r["model"] == name and r["mode"] == mode]
            points = [p for p in points if p[1] is not None]
            if points:
                axes[0].plot([p[0] for p in points], [p[1] for p in points], style, label=f"{name} {mode}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("context (tokens)")
    axes[0].set_ylabel("ms / token")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    _save(plt, figure, path, f"decode, {preset} vs LlamaForCausalLM (CPU, fp32, batch 1)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett benchmark`."""
    parser = argument_parser("benchmark", __doc__)
    parser.add_argument(
        *spellings("sections"), nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure"
    )
    parser.add_argument(
        *spellings("preset"),
        "--config",
        default="sonett-tiny-constant",
        help="the preset (name or JSON file, as in train) of the prefill and decode sections",
    )
    parser.add_argument(
        *spellings("contexts"),
        type=positive,
        nargs="+",
        default=[1024, 4096, 16384, 32768],
        help="context lengths of the prefill and decode sections",
    )
    parser.add_argument(
        *spellings("train_presets"),
        type=train_preset,
        nargs="+",
        default=[train_preset(spec) for spec in DEFAULT_TRAIN_PRESETS],
        metavar="PRESET[@N,M]",
        help="presets of the train section, each with its own contexts after @ or else --train_contexts "
        f"(default: {' '.join(DEFAULT_TRAIN_PRESETS)})",
    )
    parser.add_argument(
        *spellings("train_contexts"), type=positive, nargs="+", default=[512, 4096], help="training contexts"
    )
    parser.add_argument(
        *spellings("train_batch"),
        type=positive,
        default=None,
        help="sequences per training step (default: 4096 tokens per step, at least one sequence)",
    )
    parser.add_argument(*spellings("repeats"), type=positive, default=3, help="timed rounds; the best counts")
    parser.add_argument(
        *spellings("decode_tokens"), type=positive, default=32, help="greedy tokens timed after the prefill"
    )
    parser.add_argument(
        *spellings("decode_modes"), nargs="+", choices=DECODE_MODES, default=list(DECODE_MODES), help="decode section"
    )
    parser.add_argument(
        *spellings("plot"),
        type=Path,
        default=Path("runs") / "benchmark",
        help="prefix of the PNG plots: PREFIX-train.png, PREFIX-prefill.png, PREFIX-decode.png",
    )
    parser.add_argument(*spellings("json"), type=Path, default=None, help="also write the raw rows here")
    parser.add_argument(
        *spellings("prefill_chunk"), type=int, default=0, help="prefill in chunks of this many tokens (0: one pass)"
    )
    parser.add_argument(*spellings("timeout"), type=int, default=1800, help="seconds per worker process")
    parser.add_argument(*spellings("worker"), choices=MODELS, help=argparse.SUPPRESS)  # one measurement, as JSON
    return parser


def check_presets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 naming a preset that does not load, before anything is measured."""
    from sonett.presets import load_preset

    names = ([args.preset] if {"prefill", "decode"} & set(args.sections) else []) + (
        [preset for preset, _ in args.train_presets] if "train" in args.sections else []
    )
    for name in dict.fromkeys(names):
        try:
            load_preset(name)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))


def run_prefill(args: argparse.Namespace) -> list[dict]:
    rows = []
    for context in args.contexts:
        for name in MODELS:
            rows.append(
                measure_in_fresh_process(
                    name, args.preset, context, args.decode_tokens, args.prefill_chunk, timeout=args.timeout
                )
            )
            print(f"prefill: measured {name:6s} at {context:6d} tokens", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.preset, args.contexts[0], args.decode_tokens, args.prefill_chunk)))
        return
    check_presets(parser, args)
    import torch

    results: dict = {"threads": torch.get_num_threads(), "peak_flops": None, "train": [], "prefill": [], "decode": []}
    if {"train", "prefill"} & set(args.sections):
        results["peak_flops"] = peak = matmul_peak_flops()
        print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({results['threads']} threads, best torch.mm of 1024^2 and "
              "2048^2 matrices)\n")  # fmt: skip

    if "train" in args.sections:
        for preset, contexts in args.train_presets:
            for context in contexts or args.train_contexts:
                results["train"] += measure_training(preset, context, args.train_batch, args.repeats)
                print(f"train: measured {preset} at {context} tokens", file=sys.stderr, flush=True)
        print("## Training, one step (forward, backward, AdamW), fp32\n")
        print(training_table(results["train"], results["peak_flops"]))
        plot_train(results["train"], path := plot_path(args.plot, "train"), results["peak_flops"])
        print(f"\nplot: {path}\n")

    if "prefill" in args.sections:
        rows = results["prefill"] = run_prefill(args)
        first = {r["model"]: r for r in rows if r["context"] == args.contexts[0]}
        prefill = f"prefill in chunks of {args.prefill_chunk}" if args.prefill_chunk else "one-pass prefill"
        print(
            f"## Long context: {args.preset} ({first['sonett']['parameters']:,} parameters) vs LlamaForCausalLM "
            f"({first['llama']['parameters']:,} parameters), {prefill}\n"
        )
        print(markdown_table(rows, args.contexts, results["peak_flops"]))
        plot_prefill(rows, path := plot_path(args.plot, "prefill"), f"{args.preset}, {prefill}")
        print(f"\nplot: {path}\n")

    if "decode" in args.sections:
        for context in args.contexts:
            results["decode"] += measure_decode(
                args.preset, context, args.decode_tokens, args.repeats, tuple(args.decode_modes)
            )
            print(f"decode: measured at {context} tokens", file=sys.stderr, flush=True)
        print(f"## Decode: {args.preset} vs LlamaForCausalLM, ms per token (batch 1)\n")
        print(decode_table(results["decode"]))
        plot_decode(results["decode"], path := plot_path(args.plot, "decode"), args.preset)
        print(f"\nplot: {path}\n")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""Long-context cost of a Sonett preset against a transformers `LlamaForCausalLM` of the same shape, on CPU.

Both models get the same width, depth, heads, KV heads, MLP width and vocabulary, random weights, fp32 and
sdpa attention. For each context length, a fresh worker process per model measures
(`sonett.evaluation.benchmark.measure`):

- prefill time: one forward over the whole context (batch 1) that builds the cache and, as `generate()` does,
  computes logits for the last position only (`logits_to_keep=1`);
- peak memory: the process's peak resident memory during prefill minus its resident memory just before;
- decode: mean milliseconds per greedy token over the next tokens, with the cache;
- cache bytes: the size of the decoding state after prefill.

It prints a Markdown table (with Sonett/Llama ratios) and writes a PNG plot.

    sonett benchmark                                   # sonett-tiny-constant, 1k..32k tokens
    sonett benchmark --preset sonett-tiny --contexts 1024 4096 --plot runs/bench.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sonett.cli.parsing import argument_parser, spellings
from sonett.evaluation.benchmark import MODELS, markdown_table, measure, measure_in_fresh_process


def plot(rows: list[dict], path: Path, preset: str) -> None:
    """Prefill time, peak memory, decode time and cache size against the context length, both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("prefill_s", "prefill (s)"), ("peak_mb", "peak memory in prefill (MiB)"),
               ("decode_ms", "decode (ms / token)"), ("cache_mb", "cache (MiB)")]  # fmt: skip
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
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
    figure.suptitle(f"{preset} vs LlamaForCausalLM of the same shape (CPU, fp32, batch 1)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett benchmark`."""
    parser = argument_parser("benchmark", __doc__)
    parser.add_argument(
        *spellings("preset"),
        "--config",
        default="sonett-tiny-constant",
        help="a preset name or JSON file (as in train)",
    )
    parser.add_argument(
        *spellings("contexts"),
        type=int,
        nargs="+",
        default=[1024, 4096, 16384, 32768],
        help="context lengths to measure",
    )
    parser.add_argument(*spellings("decode_tokens"), type=int, default=32, help="greedy tokens timed after the prefill")
    parser.add_argument(*spellings("plot"), type=Path, default=Path("runs") / "benchmark.png", help="the PNG plot")
    parser.add_argument(*spellings("json"), type=Path, default=None, help="also write the raw rows here")
    parser.add_argument(
        *spellings("prefill_chunk"), type=int, default=0, help="prefill in chunks of this many tokens (0: one pass)"
    )
    parser.add_argument(*spellings("timeout"), type=int, default=1800, help="seconds per worker process")
    parser.add_argument(*spellings("worker"), choices=MODELS, help=argparse.SUPPRESS)  # one measurement, as JSON
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.preset, args.contexts[0], args.decode_tokens, args.prefill_chunk)))
        return

    rows = []
    for context in args.contexts:
        for name in MODELS:
            rows.append(
                measure_in_fresh_process(
                    name, args.preset, context, args.decode_tokens, args.prefill_chunk, timeout=args.timeout
                )
            )
            print(f"measured {name:6s} at {context:6d} tokens", file=sys.stderr, flush=True)
    by_key = {(r["model"], r["context"]): r for r in rows}
    sonett_params = by_key["sonett", args.contexts[0]]["parameters"]
    llama_params = by_key["llama", args.contexts[0]]["parameters"]
    prefill = f"prefill in chunks of {args.prefill_chunk}" if args.prefill_chunk else "one-pass prefill"
    print(
        f"\n{args.preset} ({sonett_params:,} parameters) vs LlamaForCausalLM ({llama_params:,} parameters), {prefill}\n"
    )
    print(markdown_table(rows, args.contexts))
    plot(rows, args.plot, f"{args.preset}, {prefill}")
    print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())

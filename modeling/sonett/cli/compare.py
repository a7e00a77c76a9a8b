"""Train a Sonett preset and a parameter-matched transformers `LlamaForCausalLM` side by side, and compare them.

    sonett compare lm        # pretraining recipe on the stdlib corpus: validation loss, tokens/s, curves
    sonett compare mqar      # multi-query associative recall (Zoology): accuracy grid, state sizes
    sonett compare passkey   # passkey retrieval far beyond the training length (needs sonett train's tokenizer)

`lm` takes every flag of `sonett train` (`sonett.training.pretraining.PretrainArguments`; `--output_dir` is the
parent of `sonett/` and `llama/`), `mqar` those of `sonett.evaluation.comparison.MQARArguments`, `passkey` those of
`sonett.evaluation.comparison.PasskeyArguments`. Each writes `results.json` and a PNG of the loss curves (and, for
passkey, a depth-by-length heat map) into its output folder and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sonett.cli.parsing import argument_parser, dataclass_parser
from sonett.evaluation.comparison import (
    MQARArguments,
    PasskeyArguments,
    compare_language_modelling,
    compare_mqar,
    compare_passkey,
)
from sonett.evaluation.mqar import MQAR_GRID
from sonett.extras import requires_extra
from sonett.hub.loading import load_tokenizer
from sonett.hub.saving import add_quality_results
from sonett.training.pretraining import PretrainArguments

LM_OUTPUT_DIR = "runs/compare-lm"


def _pyplot():
    with requires_extra("train"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str, key: str = "loss") -> None:
    """Loss against step for each named run."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, history in curves.items():
        axis.plot([h["step"] for h in history], [h[key] for h in history], label=name, linewidth=1.2)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (nats)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_results(output_dir: Path, results: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def smoothed(history: list[dict], window: int = 20) -> list[dict]:
    """A running mean of the per-step losses, so two curves can be told apart."""
    out = []
    for index, entry in enumerate(history):
        recent = history[max(0, index - window + 1) : index + 1]
        out.append({"step": entry["step"], "loss": sum(h["loss"] for h in recent) / len(recent)})
    return out


def build_lm_parser():
    """The parser of `sonett compare lm`: every `sonett train` flag; --output_dir defaults to runs/compare-lm."""
    parser = dataclass_parser(
        PretrainArguments,
        "compare lm",
        "Pretrain a Sonett preset and a parameter-matched LlamaForCausalLM on the same data with the same recipe, and "
        "compare validation loss, speed and loss curves. Every `sonett train` flag applies to both runs; "
        "--output_dir is the parent of sonett/ and llama/.",
    )
    parser.set_defaults(output_dir=LM_OUTPUT_DIR)
    return parser


def build_mqar_parser():
    """The parser of `sonett compare mqar` (every field of `MQARArguments`)."""
    return dataclass_parser(
        MQARArguments,
        "compare mqar",
        "Train the hybrid and constant-state Sonett presets and a Llama on multi-query associative recall (the "
        "Zoology MQAR grid) and compare their accuracy, state size and speed.",
    )


def build_passkey_parser():
    """The parser of `sonett compare passkey` (every field of `PasskeyArguments`)."""
    return dataclass_parser(
        PasskeyArguments,
        "compare passkey",
        "Train Sonett and a Llama on passkey prompts at a short length, then sweep retrieval over context lengths and "
        "needle depths far beyond it (needs a tokenizer folder: `sonett train` writes runs/sonett-tiny).",
    )


# `sonett compare NAME ...`: each comparison with its own flags and `--help`.
SUBCOMMANDS = {"lm": build_lm_parser, "mqar": build_mqar_parser, "passkey": build_passkey_parser}
SUBCOMMAND_HELP = {
    "lm": "pretraining: validation loss, tokens/s and loss curves against a matched Llama",
    "mqar": "multi-query associative recall: accuracy grid and state size per model",
    "passkey": "passkey retrieval by context length and depth, far beyond the training length",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett compare`: which comparison to run (each has its own flags)."""
    width = max(len(name) for name in SUBCOMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {SUBCOMMAND_HELP[name]}" for name in SUBCOMMANDS)
    parser = argument_parser("compare", __doc__)
    parser.epilog = f"comparisons:\n{listing}\n\nRun `sonett compare NAME --help` for the flags of a comparison."
    parser.usage = f"%(prog)s {{{','.join(SUBCOMMANDS)}}} [FLAGS ...]"
    parser.add_argument("comparison", choices=list(SUBCOMMANDS), help="the comparison to run (below), then its flags")
    return parser


def main_lm(argv: list[str]) -> None:
    (args,) = build_lm_parser().parse_args_into_dataclasses(args=argv)
    comparison = compare_language_modelling(args)
    output_dir = Path(args.output_dir)
    runs = comparison.runs
    write_results(output_dir, {**runs, "loss_ratio": comparison.loss_ratio})
    plot_curves(
        {
            f"Sonett {args.config} ({runs['sonett']['parameters']:,} params)": smoothed(runs["sonett"]["loss_history"]),
            f"Llama ({runs['llama']['parameters']:,} params)": smoothed(runs["llama"]["loss_history"]),
        },
        output_dir / "loss_curves.png",
        f"Pretraining on {runs['sonett']['training_data']}, {runs['sonett']['tokens_seen']:,} tokens",
    )
    print(f"\n{'model':28s}{'parameters':>12s}{'tokens':>12s}{'tokens/s':>10s}{'valid loss':>12s}{'perplexity':>12s}")
    for name, label in (("sonett", f"Sonett {args.config}"), ("llama", "Llama (matched)")):
        run = runs[name]
        print(
            f"{label:28s}{run['parameters']:>12,}{run['tokens_seen']:>12,}{run['train_tokens_per_second']:>10,.0f}"
            f"{run['validation_loss']:>12.4f}{run['validation_perplexity']:>12.2f}"
        )
    speed = runs["sonett"]["train_tokens_per_second"] / runs["llama"]["train_tokens_per_second"]
    add_quality_results(
        output_dir / "sonett",
        [
            {
                "evaluation": f"validation loss ({runs['sonett']['tokens_seen']:,} training tokens)",
                "model": f"{runs['sonett']['validation_loss']:.4f}",
                "llama": f"{runs['llama']['validation_loss']:.4f}",
                "target": f"ratio <= 1.00 (measured {comparison.loss_ratio:.3f})",
                "command": " ".join(["sonett compare lm", *argv]),
            }
        ],
    )
    print(f"\nvalidation loss ratio Sonett / Llama: {comparison.loss_ratio:.4f}   (target <= 1.00)")
    print(f"training speed ratio Sonett / Llama:  {speed:.2f}")
    print(f"results: {output_dir / 'results.json'}, curves: {output_dir / 'loss_curves.png'}")


def main_mqar(argv: list[str]) -> None:
    (args,) = build_mqar_parser().parse_args_into_dataclasses(args=argv)
    results = compare_mqar(args)
    output_dir = Path(args.output_dir)
    write_results(output_dir, {"arguments": vars(args), "models": results})
    plot_curves(
        {name: r["loss_history"] for name, r in results.items()},
        output_dir / "loss_curves.png",
        f"MQAR training, width 128, {args.depth} layers, {args.steps} steps",
    )
    header = "".join(f"{f'({n},{d})':>11s}" for n, d in MQAR_GRID)
    print(f"\n{'model':12s}{'parameters':>11s}{header}{f'state@{args.state_length}':>13s}{'tokens/s':>10s}")
    for name, r in results.items():
        cells = "".join(f"{r['accuracy'][f'{n},{d}']:>11.3f}" for n, d in MQAR_GRID)
        print(f"{name:12s}{r['parameters']:>11,}{cells}{r['state_bytes']:>11,} B{r['tokens_per_second']:>10,.0f}")
    for name, r in results.items():
        print(f"{name}: layers {r['layer_types']}")
    targets = {"hybrid": 0.99, "constant": 0.90}
    for name in set(targets) & set(results):
        llama = results.get("llama", {}).get("accuracy", {})
        rows = [
            {
                "evaluation": f"MQAR accuracy at (length, pairs) = ({cell})",
                "model": f"{accuracy:.3f}",
                "llama": f"{llama[cell]:.3f}" if cell in llama else "not run",
                "target": f">= {targets[name]:.2f}" if cell == "256,16" else "",
                "command": "sonett compare mqar " + " ".join(argv),
            }
            for cell, accuracy in results[name]["accuracy"].items()
        ]
        add_quality_results(output_dir / name, rows)
    print(f"results: {output_dir / 'results.json'}, curves: {output_dir / 'loss_curves.png'}")


def plot_passkey(results: dict, path: Path) -> None:
    """Heat maps of retrieval accuracy by context length and depth, one per model."""
    plt = _pyplot()
    names = list(results)
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names):
        by_length = results[name]["accuracy"]
        lengths = list(by_length)
        depths = list(next(iter(by_length.values())))
        grid = [[by_length[length][depth] for length in lengths] for depth in depths]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        axis.set_xticks(range(len(lengths)), [f"{int(n) // 1024}k" for n in lengths])
        axis.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel("needle depth")
        axis.set_title(f"{name}: passkey retrieval")
    figure.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main_passkey(argv: list[str]) -> None:
    (args,) = build_passkey_parser().parse_args_into_dataclasses(args=argv)
    if not Path(args.tokenizer).is_dir():
        sys.exit(f"error: no tokenizer folder {args.tokenizer}; run `sonett train` first or pass --tokenizer FOLDER.")
    tokenizer = load_tokenizer(args.tokenizer)
    results = compare_passkey(args, tokenizer)
    output_dir = Path(args.output_dir)
    write_results(output_dir, {"arguments": vars(args), "models": results})
    plot_passkey(results, output_dir / "passkey.png")
    plot_curves(
        {name: r["loss_history"] for name, r in results.items()},
        output_dir / "loss_curves.png",
        f"Passkey training at {args.train_length} tokens",
    )
    lengths = [str(n) for n in args.lengths]
    print(f"\n{'model':10s}{'parameters':>11s}" + "".join(f"{int(n) // 1024:>6d}k" for n in lengths))
    for name, r in results.items():
        cells = "".join(f"{r['mean_accuracy'][n]:>7.2f}" if n in r["mean_accuracy"] else f"{'-':>7s}" for n in lengths)
        print(f"{name:10s}{r['parameters']:>11,}{cells}")
    print(
        f"(mean accuracy over {len(next(iter(results.values()))['accuracy'][lengths[0]])} depths; trained at "
        f"{args.train_length} tokens)"
    )
    if "sonett" in results:
        llama = results.get("llama", {}).get("mean_accuracy", {})
        add_quality_results(
            output_dir / "sonett",
            [
                {
                    "evaluation": f"passkey retrieval at {int(n):,} tokens (trained at {args.train_length})",
                    "model": f"{accuracy:.2f}",
                    "llama": f"{llama[n]:.2f}" if n in llama else "not run (quadratic attention)",
                    "target": ">= 0.90" if int(n) == 8 * args.train_length else "",
                    "command": "sonett compare passkey " + " ".join(argv),
                }
                for n, accuracy in results["sonett"]["mean_accuracy"].items()
            ],
        )
    if "memory_gates" in results.get("sonett", {}):
        print(f"memory gates (sigmoid, share of the memory read): {results['sonett']['memory_gates']}")
    print(f"results: {output_dir / 'results.json'}, heat map: {output_dir / 'passkey.png'}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    commands = {"lm": main_lm, "mqar": main_mqar, "passkey": main_passkey}
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        build_parser().parse_args(argv)  # --help exits 0; anything else exits 2 naming the comparisons
        return
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

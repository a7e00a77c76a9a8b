"""Evaluate a causal LM folder: perplexity (and optionally next-token accuracy) on a text corpus, with plots; or
the synthetic recall tasks with `--task mqar` (the Zoology MQAR grid) and `--task passkey` (retrieval by context
length and depth). Every task runs on any AutoModelForCausalLM folder, a transformers Llama included.

With no data flags it scores the held-out split of the embedded standard-library corpus that pretraining used
(same `--validation_fraction` and `--max_documents` as the run), so it reproduces the run's validation loss:

    sonett evaluate --model runs/sonett-tiny --token_accuracy true
    sonett evaluate --model runs/sonett-tiny --data_files test.jsonl --text_column body --block_size 512

    sonett evaluate --model runs/compare-mqar/hybrid --task mqar
    sonett evaluate --model runs/compare-passkey/sonett --task passkey --passkey_lengths 1024 4096

Every field of `sonett.evaluation.scoring.EvaluationArguments` is a flag. Writes `<output_dir>/results.json`,
`loss_by_position.png` (mean loss at each position of a block) and `block_perplexity.png` (histogram of
per-block perplexity); `--output_dir` defaults to `<model>-eval`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

from sonett.cli.parsing import dataclass_parser, spellings
from sonett.evaluation.scoring import (
    EvaluationArguments,
    evaluate_causal_lm,
    evaluate_mqar,
    evaluate_passkey,
)
from sonett.extras import requires_extra

LOSS_PLOT = "loss_by_position.png"
HISTOGRAM_PLOT = "block_perplexity.png"


def plot_position_loss(results: dict, path: Path) -> None:
    """Mean next-token loss against how many tokens of the block the model has seen."""
    with requires_extra("eval"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = results["position_loss"]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(range(1, len(losses) + 1), losses, linewidth=1.2)
    axis.axhline(results["loss"], color="gray", linestyle="--", linewidth=1, label=f"mean {results['loss']:.3f}")
    axis.set_xlabel("context length (tokens of the block seen)")
    axis.set_ylabel("mean next-token loss (nats)")
    axis.set_title(f"Loss by position, {results['num_blocks']} blocks of {results['block_size']} tokens")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_block_perplexity(results: dict, path: Path) -> None:
    """Histogram of the perplexity of each block, with the corpus perplexity marked."""
    with requires_extra("eval"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = results["block_perplexities"]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(values, bins=max(5, min(40, len(values) // 4)), color="steelblue", edgecolor="white")
    axis.axvline(
        results["perplexity"], color="darkred", linestyle="--", label=f"corpus perplexity {results['perplexity']:.2f}"
    )
    axis.set_xlabel("block perplexity")
    axis.set_ylabel("blocks")
    axis.set_title(f"Per-block perplexity ({results['data']}, {results['split']} split)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_table(results: dict, output_dir: Path) -> None:
    """A short summary of the results."""
    rows = [
        ("model", results["model"]),
        ("data", f"{results['data']} ({results['split']} split)"),
        (
            "blocks x tokens",
            f"{results['num_blocks']} x {results['block_size'] - 1} = {results['num_tokens']:,} predicted tokens",
        ),
        ("loss", f"{results['loss']:.4f}"),
        ("perplexity", f"{results['perplexity']:.2f}"),
        ("mean block perplexity", f"{results['mean_block_perplexity']:.2f}"),
    ]
    if "token_accuracy" in results:
        rows.append(("next-token accuracy", f"{results['token_accuracy']:.2%}"))
    rows += [
        ("wall time", f"{results['runtime_seconds']:.1f} s on {results['device']}"),
        ("results", str(output_dir / "results.json")),
        ("plots", f"{output_dir / LOSS_PLOT}, {output_dir / HISTOGRAM_PLOT}"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name + ':':{width}}{value}")


def print_task_table(results: dict, output_dir: Path) -> None:
    """The accuracy table of an mqar or passkey evaluation."""
    print(f"model: {results['model']}   task: {results['task']}")
    if results["task"] == "mqar":
        for cell, accuracy in results["accuracy"].items():
            print(f"  (length, pairs) = ({cell}):  {accuracy:.4f}")
    else:
        for length, accuracy in results["mean_accuracy"].items():
            by_depth = " ".join(f"{value:.1f}" for value in results["accuracy"][length].values())
            print(f"  {int(length):>6d} tokens: mean {accuracy:.3f}   by depth 0..100%: {by_depth}")
    print(f"wall time: {results['runtime_seconds']:.1f} s on {results['device']}")
    print(f"results: {output_dir / 'results.json'}")


def build_parser():
    """The parser of `sonett evaluate`: every field of `EvaluationArguments`, and --output_dir."""
    parser = dataclass_parser(EvaluationArguments, "evaluate", __doc__)
    parser.add_argument(
        *spellings("output_dir"), default=None, help="where results.json and the plots go (default: <model>-eval)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args, extra = build_parser().parse_args_into_dataclasses(args=argv)
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit("error: the plots need matplotlib; install it with `pip install matplotlib` (or `sonett[dev]`).")
    output_dir = Path(extra.output_dir or f"{str(args.model).rstrip('/')}-eval")
    task = {"lm": evaluate_causal_lm, "mqar": evaluate_mqar, "passkey": evaluate_passkey}[args.task]
    try:
        results = task(args)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.task != "lm":
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print()
        print_task_table(results, output_dir)
        return
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_position_loss(results, output_dir / LOSS_PLOT)
    plot_block_perplexity(results, output_dir / HISTOGRAM_PLOT)
    print()
    print_table(results, output_dir)


if __name__ == "__main__":
    sys.exit(main())

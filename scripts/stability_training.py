#!/usr/bin/env python
"""Long-run training stability: train a preset for many steps and check that loss and gradients stay finite.

It runs `sonett.training.pretraining.pretrain` (every `PretrainArguments` field is a flag; the defaults differ from
`scripts/train.py` where noted below), then prints a table of the run (steps, tokens, min/max/final loss, largest
gradient norm, non-finite counts, the largest loss jump) and writes a PNG of loss and gradient norm against the step.
It exits with status 1 when any loss or gradient norm is NaN or infinite.

    python scripts/stability_training.py                                   # tiny preset, 2,000 steps of 8 x 128
    python scripts/stability_training.py --max_steps 30 --plot runs/stability/short.png

Defaults: `--max_steps 2000 --batch_size 8 --block_size 128 --eval_steps 250 --eval_blocks 64 --report_to none
--output_dir runs/stability-training` (about 5 minutes on 2 CPU cores; the demo batch of 16 x 256 is ~4x slower).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from sonett.training.pretraining import PretrainArguments, pretrain

DEFAULTS = {
    "max_steps": 2000,
    "batch_size": 8,
    "block_size": 128,
    "eval_steps": 250,
    "eval_blocks": 64,
    "report_to": "none",
    "output_dir": "runs/stability-training",
}


@dataclass
class StabilityOptions:
    """Where the plot and the summary go (default: inside `--output_dir`)."""

    plot: str | None = field(default=None, metadata={"help": "PNG path (default: OUTPUT_DIR/stability-training.png)"})
    summary: str | None = field(
        default=None, metadata={"help": "JSON path (default: OUTPUT_DIR/stability-training.json)"}
    )


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def summarise(history: list[dict], tokens_seen: int | None = None) -> dict:
    """Numbers that say whether a run stayed stable, from `results["loss_history"]`.

    Args:
        history: one dict per optimizer step with `step`, `loss`, `lr` and, where the trainer records it, `grad_norm`
            (the norm before clipping) and `validation_loss`.
        tokens_seen: training tokens of the run, copied into the summary.

    Returns:
        steps, tokens, min/max/final loss, mean loss over the first and the last 10% of steps, the largest rise of the
        loss from one step to the next, max/final gradient norm (None when not recorded), and how many losses and
        gradient norms were NaN or infinite.
    """
    if not history:
        raise ValueError("The loss history is empty: the run made no optimizer step; raise --max_steps.")
    losses = [float(entry["loss"]) for entry in history]
    finite_losses = [loss for loss in losses if math.isfinite(loss)]
    norms = [entry.get("grad_norm") for entry in history]
    recorded_norms = [float(norm) for norm in norms if norm is not None]
    finite_norms = [norm for norm in recorded_norms if math.isfinite(norm)]
    tenth = max(len(losses) // 10, 1)
    jumps = [b - a for a, b in itertools.pairwise(losses) if math.isfinite(a) and math.isfinite(b)]
    validation = [(entry["step"], entry["validation_loss"]) for entry in history if "validation_loss" in entry]

    def mean(values: list[float]) -> float | None:
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else None

    return {
        "steps": int(history[-1]["step"]),
        "tokens": tokens_seen,
        "min_loss": min(finite_losses) if finite_losses else None,
        "max_loss": max(finite_losses) if finite_losses else None,
        "final_loss": losses[-1],
        "mean_loss_first_10pct": mean(losses[:tenth]),
        "mean_loss_last_10pct": mean(losses[-tenth:]),
        "largest_loss_rise": max([0.0, *jumps]),
        "max_grad_norm": max(finite_norms) if finite_norms else None,
        "final_grad_norm": recorded_norms[-1] if recorded_norms else None,
        "grad_norm_recorded": bool(recorded_norms),
        "non_finite_losses": len(losses) - len(finite_losses),
        "non_finite_grad_norms": len(recorded_norms) - len(finite_norms),
        "validation": validation,
    }


def is_stable(summary: dict) -> bool:
    """True when no loss and no recorded gradient norm was NaN or infinite."""
    return summary["non_finite_losses"] == 0 and summary["non_finite_grad_norms"] == 0


def _cell(value) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(summary: dict) -> str:
    """The summary as a two-column Markdown table."""
    rows = [
        ("optimizer steps", summary["steps"]),
        ("training tokens", summary["tokens"]),
        ("loss: min / max", f"{_cell(summary['min_loss'])} / {_cell(summary['max_loss'])}"),
        ("loss: first 10% mean -> last 10% mean", f"{_cell(summary['mean_loss_first_10pct'])} -> "
         f"{_cell(summary['mean_loss_last_10pct'])}"),
        ("loss: final", summary["final_loss"]),
        ("largest loss rise between two steps", summary["largest_loss_rise"]),
        ("gradient norm (before clipping): max / final", f"{_cell(summary['max_grad_norm'])} / "
         f"{_cell(summary['final_grad_norm'])}"),
        ("non-finite losses", summary["non_finite_losses"]),
        ("non-finite gradient norms", summary["non_finite_grad_norms"]),
    ]  # fmt: skip
    for step, loss in summary["validation"]:
        rows.append((f"validation loss at step {step:,}", loss))
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    return "\n".join(lines)


def plot(history: list[dict], path: str | Path, title: str) -> None:
    """Loss (with validation points) and gradient norm against the optimizer step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    figure, (loss_axis, norm_axis) = plt.subplots(1, 2, figsize=(12, 4))
    loss_axis.plot(steps, [entry["loss"] for entry in history], linewidth=0.8, label="train")
    validation = [(entry["step"], entry["validation_loss"]) for entry in history if "validation_loss" in entry]
    if validation:
        loss_axis.plot(*zip(*validation), "o-", label="validation")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    loss_axis.legend()
    norms = [(entry["step"], entry["grad_norm"]) for entry in history if entry.get("grad_norm") is not None]
    if norms:
        norm_axis.plot(*zip(*norms), linewidth=0.8, color="tab:red")
        norm_axis.set_yscale("log")
        norm_axis.set(title="gradient norm (before clipping)")
    else:
        norm_axis.text(0.5, 0.5, "grad_norm not recorded by this trainer", ha="center", va="center")
        norm_axis.set(title="gradient norm")
    norm_axis.set(xlabel="step")
    figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run, summarise, print, plot. Returns the exit status: 0 stable, 1 a non-finite loss or gradient norm."""
    parser = HfArgumentParser((PretrainArguments, StabilityOptions))
    parser.set_defaults(**DEFAULTS)
    args, options = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output_dir)
    plot_path = Path(options.plot or output / "stability-training.png")
    summary_path = Path(options.summary or output / "stability-training.json")

    results = pretrain(args)
    history = results["loss_history"]
    summary = summarise(history, results.get("tokens_seen"))
    summary.update(
        config=args.config,
        batch_tokens=results.get("batch_tokens"),
        train_runtime=results.get("train_runtime"),
        final_validation_loss=results.get("validation_loss"),
    )
    print(f"\nTraining stability of {args.config}: {args.batch_size} x {args.block_size} tokens per micro-batch, "
          f"lr {args.learning_rate:g}, clip {args.max_grad_norm:g}, {results.get('train_runtime')}\n")  # fmt: skip
    print(table(summary))
    if not summary["grad_norm_recorded"]:
        print("\n(this version of the trainer does not record grad_norm in loss_history)")
    title = f"{args.config}: {summary['steps']:,} steps, {args.batch_size} x {args.block_size} tokens per batch"
    plot(history, plot_path, title)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps({"summary": summary, "loss_history": history}, indent=1))
    print(f"\nplot: {plot_path}\nsummary: {summary_path}")
    if not is_stable(summary):
        print("\nUNSTABLE: a loss or gradient norm was NaN or infinite (see the table).")
        return 1
    print("\nstable: every loss and gradient norm was finite.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Score model folders with EleutherAI's lm-evaluation-harness (`hf` backend) side by side, offline.

    python scripts/compare.py lm                 # trains runs/compare-lm/sonett and its matched Llama
    python scripts/lm_eval_compare.py            # scores both on the harness tasks below

The tasks come from the standard-library files that pretraining held out (`sonett.evaluation.harness.stdlib_tasks`):
`stdlib_next_line` (multiple choice: the real next line among four, acc and acc_norm, chance 0.25) and
`stdlib_line_completion` (generate until the end of the line, exact match). The held-out split is read from the
first model's `training_results.json`, so no question comes from a file either model trained on. Writes
`<output_dir>/tasks/` (the task YAML and data, reusable with `lm_eval --include_path`) and
`<output_dir>/results.json`, and prints a table. Needs the `eval` extra (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sonett.evaluation.harness import STDLIB_TASKS, run_harness, stdlib_tasks

METRICS = (("stdlib_next_line", "acc"), ("stdlib_next_line", "acc_norm"), ("stdlib_line_completion", "exact_match"))


def training_results(folder: Path) -> dict:
    """What a pretraining run recorded in the folder's `training_results.json` (empty if there is none)."""
    path = folder / "training_results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["runs/compare-lm/sonett", "runs/compare-lm/llama"])
    parser.add_argument("--output_dir", default=None, help="default: <parent of the first model>/lm-eval")
    parser.add_argument("--examples", type=int, default=200, help="questions per task")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folders = [Path(model) for model in args.models]
    for folder in folders:
        if not (folder / "config.json").is_file():
            sys.exit(f"error: {folder} is not a model folder; run `python scripts/compare.py lm` or pass --models.")
    trained = training_results(folders[0]).get("arguments", {})
    if trained.get("data_files") or trained.get("dataset_name"):
        sys.exit(f"error: {folders[0]} was not trained on the embedded corpus; these tasks hold out its files only.")
    held_out = {"validation_fraction": trained.get("validation_fraction", 0.02),
                "max_documents": trained.get("max_documents")}  # fmt: skip
    for folder in folders[1:]:
        other = training_results(folder).get("arguments", {})
        if other and {key: other.get(key) for key in held_out} != held_out:
            sys.exit(f"error: {folder} held out other files than {folders[0]} ({other} against {held_out}).")
    output_dir = Path(args.output_dir or folders[0].parent / "lm-eval")
    tasks_dir = output_dir / "tasks"
    stdlib_tasks(tasks_dir, examples=args.examples, seed=args.seed, **held_out)

    results = {"tasks": list(STDLIB_TASKS), "held_out": held_out, "examples": args.examples, "models": {}}
    for folder in folders:
        out = run_harness(folder, list(STDLIB_TASKS), tasks_dir, batch_size=args.batch_size, device=args.device)
        scores = {
            f"{task}/{metric}": {
                "value": out["results"][task][f"{metric},none"],
                "stderr": out["results"][task][f"{metric}_stderr,none"],
            }
            for task, metric in METRICS
        }
        recorded = training_results(folder)
        results["models"][str(folder)] = {
            "architecture": recorded.get("architecture", "?"),
            "parameters": recorded.get("parameters"),
            "validation_loss": recorded.get("validation_loss"),
            "samples": {task: out["results"][task]["sample_len"] for task in STDLIB_TASKS},
            "scores": scores,
        }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    width = max(len(name) for name in results["models"]) + 2
    header = "".join(f"{task.removeprefix('stdlib_') + ' ' + metric:>30s}" for task, metric in METRICS)
    print(f"\n{'model':{width}s}{'parameters':>12s}{header}")
    for name, entry in results["models"].items():
        cells = "".join(
            f"{entry['scores'][f'{t}/{m}']['value']:>21.3f} ± {entry['scores'][f'{t}/{m}']['stderr']:.3f}"
            for t, m in METRICS
        )
        parameters = f"{entry['parameters']:,}" if entry["parameters"] else "?"
        print(f"{name:{width}s}{parameters:>12s}{cells}")
    print(f"\n(lm-evaluation-harness, hf backend, {args.examples} questions per task; {output_dir / 'results.json'})")
    return results


if __name__ == "__main__":
    main()

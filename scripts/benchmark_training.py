#!/usr/bin/env python
"""Training throughput of a preset in one process and in N data-parallel processes, with the same global batch.

Each run is `scripts/train.py` for `--steps` optimizer steps (no validation during training); more than one process
goes through `accelerate launch` with an Accelerate config (default: the two-process CPU config). The throughput is
the training loop's own figure (`train_tokens_per_second` in training_results.json: tokens over the loop's wall time,
data preparation and saving excluded). The machine's load average before each run is printed with it, since a busy
machine makes the figures meaningless.

    python scripts/benchmark_training.py --steps 100                        # 1 vs 2 CPU processes, tiny preset
    python scripts/benchmark_training.py --processes 1 4 --accelerate_config configuration/accelerate/multi_gpu.yaml \\
        --no_cpu --config sonett-small --global_batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configuration" / "accelerate" / "cpu_two_processes.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sonett-tiny", help="preset name or JSON file")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--global_batch", type=int, default=16, help="blocks per optimizer step, all processes")
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--max_documents", type=int, default=150, help="stdlib documents to read (data prep time)")
    parser.add_argument("--accelerate_config", default=str(CPU_CONFIG), help="config for runs with >1 process")
    parser.add_argument("--no_cpu", action="store_true", help="do not pass --cpu (benchmark GPUs)")
    parser.add_argument("--output_dir", default="/tmp/sonett-benchmark-training")
    return parser.parse_args()


def run_once(args: argparse.Namespace, processes: int) -> dict:
    """Train once with `processes` processes; returns its training_results.json plus the load before it."""
    if args.global_batch % processes:
        raise ValueError(f"--global_batch {args.global_batch} is not divisible by {processes} processes.")
    output_dir = Path(args.output_dir) / f"processes-{processes}"
    train = [str(ROOT / "scripts" / "train.py"), "--output_dir", str(output_dir), "--config", args.config]
    train += ["--batch_size", str(args.global_batch // processes), "--block_size", str(args.block_size)]
    train += ["--max_steps", str(args.steps), "--eval_steps", "0", "--eval_blocks", "16", "--report_to", "none"]
    train += ["--max_documents", str(args.max_documents)]
    if not args.no_cpu:
        train.append("--cpu")
    if processes == 1:
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config]
        command += ["--num_processes", str(processes), *train]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"run with {processes} process(es) failed:\n{result.stderr[-4000:]}")
    results = json.loads((output_dir / "training_results.json").read_text())
    results["load_before"] = load
    results["wall_s"] = time.perf_counter() - started
    results["threads"] = os.environ.get("OMP_NUM_THREADS", "torch default") if processes == 1 else "1 (torchrun)"
    return results


def main() -> None:
    args = parse_args()
    print(f"{args.config}, {args.steps} steps, global batch {args.global_batch} x {args.block_size} tokens")
    rows = [(processes, run_once(args, processes)) for processes in args.processes]
    base = rows[0][1]["train_tokens_per_second"]
    print(
        f"\n{'processes':>9} {'threads/proc':>13} {'hardware':>22} {'train s':>8} {'tokens/s':>9} {'speed-up':>8} "
        f"{'load before':>11} {'final loss':>10}"
    )
    for processes, results in rows:
        print(
            f"{processes:>9} {results['threads']:>13} {results['hardware']:>22} {results['train_runtime']:>8} "
            f"{results['train_tokens_per_second']:>9,.0f} {results['train_tokens_per_second'] / base:>8.2f} "
            f"{results['load_before']:>11.2f} {results['final_train_loss']:>10.4f}"
        )


if __name__ == "__main__":
    main()

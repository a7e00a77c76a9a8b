#!/usr/bin/env python
"""Speed (and optionally quality) of an hourglass Sonett preset against flat twins of equal size, on CPU.

Three models, built side by side with `torch.manual_seed(0)` weights, fp32, batch 1, random token ids:

- hourglass: the preset, which must have a `hierarchy` (layers start..end-1 on a sequence shortened k times);
- flat: the same preset without `hierarchy`, `intermediate_size` widened so the parameter count matches;
- llama: transformers `LlamaForCausalLM` of the flat model's shape (sdpa attention, tied embeddings).

For each context length it measures training throughput (tokens/s of forward with labels, backward, AdamW step,
zero_grad; one warm-up step, then the best of `--repeats`) and prefill time (no-grad forward that builds the
cache, `logits_to_keep=1`; best of `--repeats`). Repeats interleave the models, so background load hits all
alike. It prints a Markdown table; ratios > 1 mean the hourglass is faster.

With `--train_steps N` it also pretrains the hourglass preset and its flat twin (written as JSON into
`--output_dir`) for N steps with `sonett.training.pretraining.pretrain` defaults, and compares validation losses.

    python scripts/benchmark_hierarchy.py                                  # sonett-tiny-hourglass, 1k and 4k
    python scripts/benchmark_hierarchy.py --contexts 1024 4096 8192 --repeats 5 --json runs/hierarchy.json
    python scripts/benchmark_hierarchy.py --contexts 1024 --train_steps 800
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from sonett import SonettForCausalLM
from sonett.evaluation.baselines import llama_config_like
from sonett.hub.saving import count_parameters
from sonett.presets import config_from_preset, load_preset
from sonett.training.pretraining import PretrainArguments, pretrain

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("hourglass", "flat", "llama")


def preset_parameters(preset: dict) -> int:
    """Parameter count of the model a preset describes, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return count_parameters(SonettForCausalLM(config_from_preset(preset)))


def flat_twin(preset: dict) -> dict:
    """`preset` without `hierarchy`, with the `intermediate_size` whose parameter count is closest to the preset's."""
    target = preset_parameters(preset)
    flat = {k: v for k, v in copy.deepcopy(preset).items() if k != "hierarchy"}
    flat["_comment"] = (
        f"Flat twin of an hourglass preset at equal parameter count ({target:,}); see {Path(__file__).name}."
    )

    def count(width: int) -> int:
        return preset_parameters({**flat, "intermediate_size": width})

    base = preset["intermediate_size"]
    slope = count(base + 1) - count(base)  # parameters per unit of MLP width (all layers)
    estimate = base + round((target - count(base)) / slope)
    flat["intermediate_size"] = min(range(estimate - 2, estimate + 3), key=lambda w: abs(count(w) - target))
    return flat


def build_models(preset: dict, flat: dict, max_positions: int) -> dict[str, PreTrainedModel]:
    """hourglass, flat and llama models with random weights (seed 0), fp32."""
    positions = max(max_positions, preset.get("max_position_embeddings", 0))
    configs = {
        "hourglass": config_from_preset(preset, max_position_embeddings=positions),
        "flat": config_from_preset(flat, max_position_embeddings=positions),
    }
    llama_config = llama_config_like(configs["flat"])
    models: dict[str, PreTrainedModel] = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        models[name] = SonettForCausalLM(config)
    torch.manual_seed(0)
    models["llama"] = LlamaForCausalLM(llama_config)
    return models


def train_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """Seconds of one full training step: forward with labels, backward, AdamW step, zero_grad."""
    started = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


@torch.no_grad()
def prefill(model: PreTrainedModel, ids: torch.Tensor) -> float:
    """Seconds of a no-grad forward that builds the cache and keeps the last position's logits."""
    started = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - started


def measure_speed(models: dict[str, PreTrainedModel], contexts: list[int], repeats: int) -> dict:
    """{context: {model: {"train_tokens_per_s", "prefill_s"}}}, best of `repeats`, models interleaved."""
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    results: dict = {}
    for context in contexts:
        vocab = models["flat"].config.vocab_size
        ids = torch.randint(10, vocab, (1, context), generator=torch.Generator().manual_seed(1))
        train = {name: [] for name in models}
        for name, model in models.items():
            train_step(model.train(), optimizers[name], ids)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                train[name].append(train_step(model, optimizers[name], ids))
        fill = {name: [] for name in models}
        for model in models.values():
            prefill(model.eval(), ids)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                fill[name].append(prefill(model, ids))
        results[context] = {
            name: {"train_tokens_per_s": context / min(train[name]), "prefill_s": min(fill[name])} for name in models
        }
    return results


def run_pretraining(args: argparse.Namespace, flat: dict) -> dict:
    """Pretrain the hourglass preset and its flat twin for `--train_steps`; their results, by model name."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    flat_path = args.output_dir / "flat-twin.json"
    flat_path.write_text(json.dumps(flat, indent=2) + "\n")
    results = {}
    for name, config in (("hourglass", args.preset), ("flat", str(flat_path))):
        output_dir = args.output_dir / name
        returned = pretrain(
            PretrainArguments(
                config=config,
                output_dir=str(output_dir),
                max_steps=args.train_steps,
                eval_steps=args.train_steps,
                max_documents=args.max_documents,
            )
        )
        written = json.loads((output_dir / "training_results.json").read_text())
        results[name] = {**written, **returned}
    return results


def print_speed_table(speed: dict) -> None:
    print("| context | metric | hourglass | flat | llama | hourglass/flat speed-up | hourglass/llama speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for context, row in speed.items():
        h, f, l = (row[name] for name in MODELS)  # noqa: E741
        key = "train_tokens_per_s"
        print(
            f"| {context:,} | train tokens/s | {h[key]:,.0f} | {f[key]:,.0f} | {l[key]:,.0f} "
            f"| {h[key] / f[key]:.2f}x | {h[key] / l[key]:.2f}x |"
        )
        key = "prefill_s"
        print(
            f"| {context:,} | prefill ms | {1000 * h[key]:,.1f} | {1000 * f[key]:,.1f} | {1000 * l[key]:,.1f} "
            f"| {f[key] / h[key]:.2f}x | {l[key] / h[key]:.2f}x |"
        )


def print_quality_table(quality: dict) -> None:
    print("| model | parameters | steps | validation loss | perplexity | train tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in quality.items():
        print(
            f"| {name} | {r['parameters']:,} | {r['steps']} | {r['validation_loss']:.4f} "
            f"| {r['validation_perplexity']:.2f} | {r.get('train_tokens_per_second', float('nan')):,.0f} |"
        )
    ratio = quality["hourglass"]["validation_loss"] / quality["flat"]["validation_loss"]
    print(f"\nhourglass loss / flat loss: {ratio:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sonett-tiny-hourglass", help="a preset name or JSON path with hierarchy")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train_steps", type=int, default=0, help="also pretrain both for N steps (0: off)")
    parser.add_argument("--max_documents", type=int, default=None, help="pretrain on the first N documents only")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "runs" / "benchmark-hierarchy")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    args = parser.parse_args()

    preset = load_preset(args.preset)
    if not preset.get("hierarchy"):
        raise SystemExit(f"Preset {args.preset!r} has no `hierarchy`; give an hourglass preset.")
    flat = flat_twin(preset)
    models = build_models(preset, flat, max(args.contexts))
    parameters = {name: count_parameters(model) for name, model in models.items()}
    print(f"\n{args.preset}: hierarchy {preset['hierarchy']}, intermediate_size {preset['intermediate_size']}")
    print(f"flat twin and llama: intermediate_size {flat['intermediate_size']}")
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in parameters.items()))
    print(f"\nCPU, fp32, batch 1, best of {args.repeats} ({torch.get_num_threads()} threads)\n")
    speed = measure_speed(models, args.contexts, args.repeats)
    print_speed_table(speed)
    results: dict = {"preset": args.preset, "flat_intermediate_size": flat["intermediate_size"]}
    results |= {"parameters": parameters, "speed": speed}

    if args.train_steps:
        quality = run_pretraining(args, flat)
        print(f"\npretraining, {args.train_steps} steps each (PretrainArguments defaults otherwise)\n")
        print_quality_table(quality)
        results["quality"] = {name: {k: v for k, v in r.items() if k != "loss_history"} for name, r in quality.items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()

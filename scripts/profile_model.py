"""Where the time of one training step or one decode step goes: torch.profiler over a few steps of a preset.

Prints the top operators by self CPU time and one summary line that splits the wall time of a step into
- arithmetic: matrix products and attention / convolution kernels (aten::mm, addmm, bmm, baddbmm, matmul kernels,
  scaled-dot-product attention, convolutions, triangular solves), forward and backward;
- other operators: every other aten:: operator (elementwise, reductions, copies, cat, indexing, allocation);
- outside operators: wall time minus the profiled operator time (Python, the dispatcher, the autograd engine).

The shares are those of a profiled run (the profiler adds some overhead of its own, counted outside operators).

    python scripts/profile_model.py --preset sonett-tiny --mode train --context 512 --batch 8
    python scripts/profile_model.py --preset sonett-mini --mode decode --context 1024 --model llama
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sonett.evaluation.benchmark import build_models
from sonett.training.optimization import create_optimizer, parameter_groups

# Operators that do the arithmetic (self time of their kernels), forward and backward.
ARITHMETIC = re.compile(
    r"^aten::(mm|addmm|bmm|baddbmm|addbmm|_?mkldnn_.*|.*convolution.*|_slow_conv.*|.*scaled_dot_product.*"
    r"|linalg_solve_triangular|_linalg_solve_ex|triangular_solve)$"
)


def arithmetic(name: str) -> bool:
    """Whether a profiler event is an arithmetic kernel (see `ARITHMETIC`)."""
    return bool(ARITHMETIC.match(name))


def make_step(model: torch.nn.Module, mode: str, context: int, batch: int):
    """A no-argument function that runs one training step (`train`) or one greedy decode token after a prefill of
    `context` tokens (`decode`), for Sonett or Llama."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (batch, context), generator=generator)
    if mode == "train":
        model.train()
        optimizer = create_optimizer(parameter_groups(model, weight_decay=0.1), learning_rate=1e-4)

        def train_step() -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return train_step

    from transformers import DynamicCache

    cache = model.make_cache() if hasattr(model, "make_cache") else DynamicCache(config=model.config)
    with torch.no_grad():
        token = [model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)]

    @torch.no_grad()
    def decode_step() -> None:
        token[0] = model(input_ids=token[0], cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

    return decode_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sonett-tiny", help="a preset name or JSON file")
    parser.add_argument("--mode", choices=("train", "decode"), required=True)
    parser.add_argument("--model", choices=("sonett", "llama"), default="sonett", help="Llama: equal parameters")
    parser.add_argument("--context", type=int, default=None, help="tokens (default: 512 train, 1024 decode)")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default: 4096 tokens train, 1 decode)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after two warm-up steps")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    args = parser.parse_args(argv)
    context = args.context or (512 if args.mode == "train" else 1024)
    batch = args.batch or (max(1, 4096 // context) if args.mode == "train" else 1)
    if context < 2 or batch < 1 or args.steps < 1:
        parser.error(f"--context must be >= 2, --batch and --steps >= 1; got {context}, {batch}, {args.steps}.")

    sonett, llama = build_models(args.preset, max_position_embeddings=max(65536, 2 * context))
    model = sonett if args.model == "sonett" else llama
    del sonett, llama
    step = make_step(model, args.mode, context, batch)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - started) / args.steps * 1e6  # microseconds per step

    events = [e for e in profiler.key_averages() if e.key.startswith("aten::")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.model} ({args.preset}, {parameters:,} parameters), {args.mode}, context {context}, batch {batch}, "
          f"{torch.get_num_threads()} threads; per step over {args.steps} profiled steps\n")  # fmt: skip
    print("| operator | self CPU ms / step | share of wall | calls / step | arithmetic |")
    print("|---|---:|---:|---:|---|")
    for event in events[: args.top]:
        own = event.self_cpu_time_total / args.steps
        print(
            f"| {event.key} | {own / 1e3:.2f} | {own / wall:.1%} | {event.count / args.steps:.0f} "
            f"| {'yes' if arithmetic(event.key) else ''} |"
        )
    maths = sum(e.self_cpu_time_total for e in events if arithmetic(e.key)) / args.steps
    others = sum(e.self_cpu_time_total for e in events if not arithmetic(e.key)) / args.steps
    outside = max(wall - maths - others, 0.0)
    print(
        f"\nsummary: wall {wall / 1e3:.2f} ms/step; arithmetic {maths / wall:.0%}, "
        f"other operators {others / wall:.0%}, outside operators (Python, dispatcher, autograd) {outside / wall:.0%}"
    )


if __name__ == "__main__":
    sys.exit(main())

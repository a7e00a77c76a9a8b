"""Long-context cost of a Sonett preset against a transformers `LlamaForCausalLM` of the same shape, on CPU.

Both models get the same width, depth, heads, KV heads, MLP width and vocabulary, random weights, fp32 and
sdpa attention. For each context length, a fresh worker process per model measures:

- prefill time: one forward over the whole context (batch 1) that builds the cache and, as `generate()` does,
  computes logits for the last position only (`logits_to_keep=1`);
- peak memory: the process's peak resident memory during prefill minus its resident memory just before;
- decode: mean milliseconds per greedy token over the next tokens, with the cache;
- cache bytes: the size of the decoding state after prefill.

It prints a Markdown table (with Sonett/Llama ratios) and writes a PNG plot.

    python scripts/benchmark.py                                   # sonett-tiny-constant, 1k..32k tokens
    python scripts/benchmark.py --preset sonett-tiny --contexts 1024 4096 --plot runs/bench.png
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from sonett.extras import requires_extra

with requires_extra("eval"):
    import psutil


def build_models(preset: str):
    """(sonett, llama) with matching shapes, random weights, eval mode, fp32."""
    from transformers import LlamaForCausalLM

    from sonett import SonettForCausalLM
    from sonett.evaluation.baselines import llama_config_like
    from sonett.presets import config_from_preset, load_preset

    sonett_config = config_from_preset(load_preset(preset), max_position_embeddings=65536)
    llama_config = llama_config_like(sonett_config)
    torch.manual_seed(0)
    return SonettForCausalLM(sonett_config).eval(), LlamaForCausalLM(llama_config).eval()


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def worker(model_name: str, preset: str, context: int, decode_tokens: int, prefill_chunk: int = 0) -> dict:
    """Measure one model at one context length (run in a fresh process so peak memory is its own)."""
    sonett, llama = build_models(preset)
    model = sonett if model_name == "sonett" else llama
    del sonett, llama
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (1, context), generator=generator)
    model(ids[:, :64], use_cache=True)  # warm-up: kernels, allocator

    resident_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    if prefill_chunk:  # the same chunked prefill for both models, through their caches
        cache = model.make_cache() if hasattr(model, "make_cache") else DynamicCache(config=model.config)
        for start in range(0, context, prefill_chunk):
            out = model(ids[:, start : start + prefill_chunk], cache=cache, use_cache=True, logits_to_keep=1)
    else:
        out = model(ids, use_cache=True, logits_to_keep=1)
    prefill_seconds = time.perf_counter() - started
    peak = max(peak_rss_bytes() - resident_before, 0)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    state_bytes = cache_bytes(cache)

    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(decode_tokens + 2):
        started = time.perf_counter()
        logits = model(token, cache=cache, use_cache=True).logits
        times.append(time.perf_counter() - started)
        token = logits[:, -1:].argmax(-1)
    return {
        "model": model_name,
        "context": context,
        "prefill_s": prefill_seconds,
        "peak_mb": peak / 2**20,
        "decode_ms": 1000 * sum(times[2:]) / decode_tokens,
        "cache_mb": state_bytes / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_worker(model_name: str, args: argparse.Namespace, context: int) -> dict:
    command = [sys.executable, "-m", "sonett.cli.benchmark", "--worker", model_name, "--preset", args.preset]
    command += ["--contexts", str(context), "--decode_tokens", str(args.decode_tokens)]
    command += ["--prefill_chunk", str(args.prefill_chunk)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{model_name} at {context} tokens failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path, preset: str) -> None:
    with requires_extra("eval"):
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sonett-tiny-constant")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--plot", type=Path, default=Path("runs") / "benchmark.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    parser.add_argument(
        "--prefill_chunk", type=int, default=0, help="prefill in chunks of this many tokens (0: one pass)"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    parser.add_argument("--worker", choices=["sonett", "llama"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.contexts[0], args.decode_tokens, args.prefill_chunk)))
        return

    rows = []
    for context in args.contexts:
        for name in ("sonett", "llama"):
            rows.append(run_worker(name, args, context))
            print(f"measured {name:6s} at {context:6d} tokens", file=sys.stderr, flush=True)
    by_key = {(r["model"], r["context"]): r for r in rows}
    sonett_params, llama_params = (
        by_key["sonett", args.contexts[0]]["parameters"],
        by_key["llama", args.contexts[0]]["parameters"],
    )
    prefill = f"prefill in chunks of {args.prefill_chunk}" if args.prefill_chunk else "one-pass prefill"
    print(
        f"\n{args.preset} ({sonett_params:,} parameters) vs LlamaForCausalLM ({llama_params:,} parameters), {prefill}\n"
    )
    print("| context | prefill s (Sonett / Llama) | speed-up | peak MiB (Sonett / Llama) | ratio "
          "| decode ms/token (Sonett / Llama) | speed-up | cache MiB (Sonett / Llama) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for context in args.contexts:
        s, l = by_key["sonett", context], by_key["llama", context]  # noqa: E741
        print(
            f"| {context:,} | {s['prefill_s']:.2f} / {l['prefill_s']:.2f} | {l['prefill_s'] / s['prefill_s']:.1f}x "
            f"| {s['peak_mb']:.0f} / {l['peak_mb']:.0f} | {s['peak_mb'] / max(l['peak_mb'], 1e-9):.2f} "
            f"| {s['decode_ms']:.1f} / {l['decode_ms']:.1f} | {l['decode_ms'] / s['decode_ms']:.1f}x "
            f"| {s['cache_mb']:.2f} / {l['cache_mb']:.2f} |"
        )
    plot(rows, args.plot, f"{args.preset}, {prefill}")
    print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())

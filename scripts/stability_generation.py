#!/usr/bin/env python
"""Long-run generation stability: decode many tokens with a constant-memory preset and watch the process memory.

A manual decoding loop feeds one sampled token at a time through the model with its `SonettCache`
(`model(input_ids=token, cache=cache)`), so the cache is the only state that can grow with the text. Every
`--every` tokens it records the resident memory (RSS) of the process and the bytes held by the cache. After the
warm-up (`--warmup` tokens: the windows fill, the allocator reaches its working set), the RSS should stay flat:
the script reports its growth in % from the end of the warm-up to the end of the run (target: at most
`--max_growth`, 5%), the cache size at the end of the warm-up and at the end, and what a full-attention KV cache of
the same shape would need at the same length. It writes a PNG of RSS and cache size against tokens and exits with
status 1 when the RSS or the cache grew by more than the target after the warm-up. The cache check is the sharp one:
the process holds ~500 MiB of libraries, so 5% of RSS is ~25 MiB, more than the one full-attention layer of
`sonett-tiny` gathers in 10,000 tokens (~5 MiB; the RSS slope in the table does show it, at 0.5 KiB per token).

    python scripts/stability_generation.py                           # random-init sonett-tiny-constant, 10,000 tokens
    python scripts/stability_generation.py --model runs/sonett-tiny-constant       # a trained folder
    python scripts/stability_generation.py --tokens 1500 --warmup 500 --every 100   # a short check

To keep the measurement honest: the thread count is fixed (`--threads`), autograd is off (`torch.inference_mode`),
`gc.collect()` and glibc's `malloc_trim(0)` run before every sample (so RSS counts live memory rather than freed
blocks the allocator still holds; `--no_malloc_trim` turns that off), and the growth compares the median of the
first samples after the warm-up with the median of the last samples, so one noisy sample cannot decide it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

MEDIAN_OF = 3  # samples at each end of the measured range whose median is compared


def resident_bytes() -> int:
    """The resident memory (RSS) of this process in bytes: psutil when installed, else /proc/self/statm."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim` (returns freed heap memory to the system), or None where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def cache_bytes(cache) -> int:
    """Bytes held by the decoding state: `SonettCache.nbytes()`, or the keys and values of a transformers cache."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def full_attention_kv_bytes(config, tokens: int, element_size: int = 4) -> int:
    """Bytes a full-attention KV cache of the same depth, KV heads and head size needs for `tokens` tokens (batch 1)."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * tokens * element_size


def load_model_and_tokenizer(args: argparse.Namespace):
    """A trained folder (`--model`) or a random-init model of a preset, with a loaded or freshly trained tokenizer."""
    from sonett.hub.loading import load_model, load_tokenizer

    if args.model:  # the sonett package's classes load the folder: none of its code runs
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, dtype=torch.float32)
        return model.eval(), tokenizer, args.model
    from sonett import SonettForCausalLM
    from sonett.data.corpus import stdlib_corpus
    from sonett.data.tokenizer import train_bpe_tokenizer
    from sonett.presets import build_config, load_preset

    preset = load_preset(args.config)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        texts = stdlib_corpus(max_documents=args.tokenizer_documents)["text"]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size or preset.get("vocab_size", 4096))
    torch.manual_seed(args.seed)
    model = SonettForCausalLM(build_config(preset, tokenizer))
    return model.eval(), tokenizer, f"{args.config} (random weights)"


def _new_cache(model):
    if hasattr(model, "make_cache"):
        return model.make_cache(), "cache"
    from transformers import DynamicCache

    return DynamicCache(config=model.config), "past_key_values"


@torch.inference_mode()
def measure(model, prompt_ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Decode `args.tokens` tokens after `prompt_ids` (1, P); sample RSS and cache bytes every `args.every` tokens.

    Returns a dict with `samples` (one per measurement: generated tokens, tokens in the state, RSS bytes, cache
    bytes, mean milliseconds per token since the previous sample), the seconds spent decoding (sampling included)
    and the prompt length.
    """
    trim = None if args.no_malloc_trim else _malloc_trim()
    generator = torch.Generator().manual_seed(args.seed)
    cache, cache_argument = _new_cache(model)
    logits = model(input_ids=prompt_ids, use_cache=True, **{cache_argument: cache}).logits[:, -1]
    samples, generated, since_sample = [], 0, 0
    started = window_started = time.perf_counter()
    while generated < args.tokens:
        probabilities = torch.softmax(logits.float() / args.temperature, dim=-1)
        token = torch.multinomial(probabilities, 1, generator=generator)  # (1, 1)
        logits = model(input_ids=token, use_cache=True, **{cache_argument: cache}).logits[:, -1]
        generated += 1
        since_sample += 1
        if not torch.isfinite(logits).all():
            raise RuntimeError(
                f"The logits became NaN or infinite after {generated} generated tokens: decoding is numerically "
                f"unstable at this length; reproduce with --tokens {generated} and inspect the cache state."
            )
        if generated % args.every == 0 or generated == args.tokens:
            ms_per_token = 1000 * (time.perf_counter() - window_started) / since_sample
            gc.collect()
            if trim is not None:
                trim(0)
            samples.append(
                {
                    "generated": generated,
                    "state_tokens": int(cache.get_seq_length()),
                    "rss": resident_bytes(),
                    "cache_bytes": cache_bytes(cache),
                    "ms_per_token": ms_per_token,
                }
            )
            since_sample, window_started = 0, time.perf_counter()
    return {
        "samples": samples,
        "decode_seconds": time.perf_counter() - started,
        "prompt_tokens": prompt_ids.shape[1],
        "malloc_trim": trim is not None,
    }


def summarise(samples: list[dict], warmup: int, config=None, median_of: int = MEDIAN_OF) -> dict:
    """RSS growth after the warm-up, cache sizes, and the full-attention comparison.

    Args:
        samples: from `measure`, in order (`generated`, `state_tokens`, `rss`, `cache_bytes`).
        warmup: generated tokens before the baseline is taken.
        config: the model config, for the full-attention KV size (skipped when None).
        median_of: how many samples at each end of the measured range form its median.

    Returns:
        baseline and final RSS (medians), growth in % and in MiB, the largest RSS after the warm-up, the RSS slope
        (least squares, bytes per 1,000 tokens), the cache bytes at the first measured sample and at the end and
        their growth in %, the full-attention KV bytes at those lengths, and the decoding time per token (medians)
        at both ends.
    """
    measured = [sample for sample in samples if sample["generated"] >= warmup]
    if len(measured) < 2:
        raise ValueError(
            f"Only {len(measured)} samples after the warm-up of {warmup} tokens; generate more tokens (--tokens) "
            "or sample more often (--every)."
        )
    count = max(1, min(median_of, len(measured) // 2))
    baseline = statistics.median(sample["rss"] for sample in measured[:count])
    final = statistics.median(sample["rss"] for sample in measured[-count:])
    xs = [sample["generated"] for sample in measured]
    ys = [sample["rss"] for sample in measured]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
    first, last = measured[0], measured[-1]
    summary = {
        "warmup_tokens": warmup,
        "generated_tokens": last["generated"],
        "baseline_rss": baseline,
        "final_rss": final,
        "growth_percent": 100.0 * (final - baseline) / baseline,
        "growth_mib": (final - baseline) / 2**20,
        "max_rss_after_warmup": max(ys),
        "rss_slope_bytes_per_1k_tokens": slope * 1000,
        "cache_tokens_first": first["state_tokens"],
        "cache_bytes_first": first["cache_bytes"],
        "cache_tokens_last": last["state_tokens"],
        "cache_bytes_last": last["cache_bytes"],
        "cache_growth_percent": 100.0 * (last["cache_bytes"] - first["cache_bytes"]) / max(first["cache_bytes"], 1),
        "ms_per_token_first": statistics.median(s.get("ms_per_token", math.nan) for s in measured[:count]),
        "ms_per_token_last": statistics.median(s.get("ms_per_token", math.nan) for s in measured[-count:]),
    }
    if config is not None:
        summary["full_attention_bytes_first"] = full_attention_kv_bytes(config, first["state_tokens"])
        summary["full_attention_bytes_last"] = full_attention_kv_bytes(config, last["state_tokens"])
    return summary


def _mib(value: float) -> str:
    return f"{value / 2**20:,.2f} MiB"


def table(summary: dict) -> str:
    """The summary as a Markdown table."""
    first, last = summary["cache_tokens_first"], summary["cache_tokens_last"]
    rows = [
        ("tokens generated (warm-up)", f"{summary['generated_tokens']:,} ({summary['warmup_tokens']:,})"),
        ("RSS after warm-up (median)", _mib(summary["baseline_rss"])),
        ("RSS at the end (median)", _mib(summary["final_rss"])),
        ("RSS growth after warm-up", f"{summary['growth_percent']:+.2f}% ({summary['growth_mib']:+.2f} MiB)"),
        ("largest RSS after warm-up", _mib(summary["max_rss_after_warmup"])),
        ("RSS slope (least squares)", f"{summary['rss_slope_bytes_per_1k_tokens'] / 2**10:+,.1f} KiB per 1k tokens"),
        (
            "decode time per token: after warm-up -> end",
            f"{summary['ms_per_token_first']:.1f} -> {summary['ms_per_token_last']:.1f} ms",
        ),
        (f"cache state at {first:,} tokens", f"{summary['cache_bytes_first']:,} bytes"),
        (f"cache state at {last:,} tokens", f"{summary['cache_bytes_last']:,} bytes"),
        ("cache growth after warm-up", f"{summary['cache_growth_percent']:+.2f}%"),
    ]
    if "full_attention_bytes_last" in summary:
        rows += [
            (f"full-attention KV cache at {first:,} tokens", f"{summary['full_attention_bytes_first']:,} bytes"),
            (f"full-attention KV cache at {last:,} tokens", f"{summary['full_attention_bytes_last']:,} bytes"),
        ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def plot(samples: list[dict], summary: dict, path: str | Path, title: str) -> None:
    """RSS and cache bytes (with the full-attention KV size for comparison) against tokens in the state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [sample["state_tokens"] for sample in samples]
    figure, (rss_axis, cache_axis) = plt.subplots(1, 2, figsize=(12, 4))
    rss_axis.plot(tokens, [sample["rss"] / 2**20 for sample in samples], ".-", label="RSS")
    warm = summary["cache_tokens_first"]
    rss_axis.axvspan(tokens[0], warm, color="grey", alpha=0.2, label="warm-up")
    baseline = summary["baseline_rss"] / 2**20
    rss_axis.axhline(baseline, color="grey", linestyle="--", linewidth=0.8)
    limit = summary.get("max_growth_percent")
    if limit is not None:  # the accepted band, so that noise of a few KiB does not look like a trend
        rss_axis.axhline(baseline * (1 + limit / 100), color="tab:red", linestyle=":", label=f"+{limit:g}% target")
        top = max(baseline * (1 + 1.5 * limit / 100), max(sample["rss"] for sample in samples) / 2**20)
        rss_axis.set_ylim(min(baseline * 0.95, min(sample["rss"] for sample in samples) / 2**20), top)
    rss_axis.ticklabel_format(axis="y", useOffset=False, style="plain")
    rss_axis.set(xlabel="tokens in the state", ylabel="MiB", title=f"process RSS ({summary['growth_percent']:+.2f}%)")
    rss_axis.legend()
    cache_axis.plot(tokens, [sample["cache_bytes"] / 2**20 for sample in samples], ".-", label="this model's cache")
    if "full_attention_bytes_last" in summary:
        per_token = summary["full_attention_bytes_last"] / summary["cache_tokens_last"]
        cache_axis.plot(tokens, [t * per_token / 2**20 for t in tokens], "--", label="full-attention KV cache")
    cache_axis.set(xlabel="tokens in the state", ylabel="MiB", title="decoding state")
    cache_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained model folder (default: random weights of --config)")
    parser.add_argument("--config", default="sonett-tiny-constant", help="preset for a random-init model")
    parser.add_argument("--tokenizer", help="tokenizer folder for a random-init model (default: train a small BPE)")
    parser.add_argument("--vocab_size", type=int, help="vocabulary of the freshly trained BPE (default: the preset's)")
    parser.add_argument("--tokenizer_documents", type=int, default=100, help="stdlib files the fresh BPE learns from")
    parser.add_argument("--prompt", default="def main():\n    ", help="text the generation starts from")
    parser.add_argument("--tokens", type=int, default=10_000, help="tokens to generate")
    parser.add_argument("--warmup", type=int, default=1_000, help="generated tokens before the baseline sample")
    parser.add_argument("--every", type=int, default=250, help="sample RSS and cache size every N tokens")
    parser.add_argument("--max_growth", type=float, default=5.0, help="largest RSS and cache growth after warm-up, %%")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed, so the RSS is comparable)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_malloc_trim", action="store_true", help="do not call malloc_trim(0) before samples")
    parser.add_argument("--plot", default="runs/stability/stability-generation.png")
    parser.add_argument("--summary", default="runs/stability/stability-generation.json")
    args = parser.parse_args(argv)
    if min(args.tokens, args.every, args.threads) < 1 or args.warmup < 0:
        parser.error("--tokens, --every and --threads must be at least 1, --warmup at least 0")
    if args.warmup >= args.tokens:
        parser.error(f"--warmup ({args.warmup}) must be below --tokens ({args.tokens}); raise --tokens")
    if args.temperature <= 0:
        parser.error("--temperature must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print, plot. Returns the exit status: 0 within --max_growth, 1 above it."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, name = load_model_and_tokenizer(args)
    prompt_ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if prompt_ids.shape[1] == 0:
        raise SystemExit("--prompt tokenizes to nothing; pass a non-empty prompt.")
    print(f"model: {name}, layers {list(getattr(model.config, 'layer_types', []))}")
    print(f"generating {args.tokens:,} tokens after a {prompt_ids.shape[1]}-token prompt, {args.threads} threads, "
          f"RSS and cache sampled every {args.every} tokens ...")  # fmt: skip
    run = measure(model, prompt_ids, args)
    summary = summarise(run["samples"], args.warmup, model.config)
    summary.update(
        model=name,
        threads=args.threads,
        malloc_trim=run["malloc_trim"],
        tokens_per_second=args.tokens / run["decode_seconds"],
        max_growth_percent=args.max_growth,
    )
    print(f"\nGeneration stability of {name} ({summary['tokens_per_second']:.1f} tokens/s, "
          f"malloc_trim {'on' if run['malloc_trim'] else 'off'})\n")  # fmt: skip
    print(table(summary))
    plot(run["samples"], summary, args.plot, f"{name}: {args.tokens:,} generated tokens")
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps({"summary": summary, "samples": run["samples"]}, indent=1))
    print(f"\nplot: {args.plot}\nsummary: {args.summary}")
    growth, cache_growth = summary["growth_percent"], summary["cache_growth_percent"]
    if growth > args.max_growth or cache_growth > args.max_growth:
        print(f"\nGROWING: after the warm-up the RSS grew {growth:+.2f}% and the cache {cache_growth:+.2f}%, "
              f"over the {args.max_growth}% target.")  # fmt: skip
        return 1
    print(f"\nflat: after the warm-up the RSS grew {growth:+.2f}% and the cache {cache_growth:+.2f}% "
          f"(target: at most {args.max_growth}%).")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

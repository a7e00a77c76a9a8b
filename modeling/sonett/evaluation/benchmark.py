"""Long-context cost of a Sonett preset against a transformers `LlamaForCausalLM` of the same shape (`sonett
benchmark`): prefill time, peak memory, decode time per token and cache size at one context length, measured in a
fresh process per model and length so that each peak memory is its own.

Both models get the same width, depth, heads, KV heads, MLP width and vocabulary, random weights, fp32 and sdpa
attention.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
from transformers import DynamicCache

MODELS = ("sonett", "llama")
# The module whose `--worker` mode runs `measure` in a fresh process (an installed module, no repository path).
WORKER_MODULE = "sonett.cli.benchmark"


def build_models(preset: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(sonett, llama) with matching shapes, random weights, eval mode, fp32."""
    from transformers import LlamaForCausalLM

    from sonett.evaluation.baselines import llama_config_like
    from sonett.model.modeling_sonett import SonettForCausalLM
    from sonett.presets import config_from_preset, load_preset

    sonett_config = config_from_preset(load_preset(preset), max_position_embeddings=65536)
    llama_config = llama_config_like(sonett_config)
    torch.manual_seed(0)
    return SonettForCausalLM(sonett_config).eval(), LlamaForCausalLM(llama_config).eval()


def cache_bytes(cache) -> int:
    """Bytes of a decoding state: a `SonettCache` counts its own; a transformers cache its keys and values."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def measure(model_name: str, preset: str, context: int, decode_tokens: int, prefill_chunk: int = 0) -> dict:
    """Measure one model at one context length (call it in a fresh process, so the peak memory is its own).

    Prefill: one forward over `context` random tokens (batch 1) that builds the cache and, as `generate()` does,
    computes logits for the last position only (or the same in chunks of `prefill_chunk` tokens, for both models
    through their caches). Decode: mean milliseconds per greedy token over `decode_tokens` tokens, after two
    warm-up tokens. Returns the row of the table: prefill_s, peak_mb, decode_ms, cache_mb, parameters.
    """
    from sonett.extras import requires_extra

    with requires_extra("eval"):
        import psutil

    if model_name not in MODELS:
        raise ValueError(f"model_name must be one of {MODELS}, got {model_name!r}.")
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


def measure_in_fresh_process(
    model_name: str, preset: str, context: int, decode_tokens: int, prefill_chunk: int = 0, timeout: float = 1800
) -> dict:
    """`measure` in a new Python process (`python -m sonett.cli.benchmark --worker ...`); returns its row."""
    command = [sys.executable, "-m", WORKER_MODULE, "--worker", model_name, "--preset", preset]
    command += [
        "--contexts",
        str(context),
        "--decode_tokens",
        str(decode_tokens),
        "--prefill_chunk",
        str(prefill_chunk),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{model_name} at {context} tokens failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], contexts: list[int]) -> str:
    """The rows of both models as one Markdown table by context length, with the Sonett/Llama ratios."""
    by_key = {(r["model"], r["context"]): r for r in rows}
    lines = [
        "| context | prefill s (Sonett / Llama) | speed-up | peak MiB (Sonett / Llama) | ratio "
        "| decode ms/token (Sonett / Llama) | speed-up | cache MiB (Sonett / Llama) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for context in contexts:
        s, l = by_key["sonett", context], by_key["llama", context]  # noqa: E741
        lines.append(
            f"| {context:,} | {s['prefill_s']:.2f} / {l['prefill_s']:.2f} | {l['prefill_s'] / s['prefill_s']:.1f}x "
            f"| {s['peak_mb']:.0f} / {l['peak_mb']:.0f} | {s['peak_mb'] / max(l['peak_mb'], 1e-9):.2f} "
            f"| {s['decode_ms']:.1f} / {l['decode_ms']:.1f} | {l['decode_ms'] / s['decode_ms']:.1f}x "
            f"| {s['cache_mb']:.2f} / {l['cache_mb']:.2f} |"
        )
    return "\n".join(lines)


__all__ = ["build_models", "cache_bytes", "markdown_table", "measure", "measure_in_fresh_process", "peak_rss_bytes"]

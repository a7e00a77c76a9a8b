"""Speed and memory of a Sonett preset against a transformers `LlamaForCausalLM` of equal parameter count
(`sonett benchmark`), in three sections:

- train: training tokens/s of one step (forward with labels, backward, AdamW step, zero_grad), both models
  interleaved in one process (`measure_training`);
- prefill: the long-context table, prefill time, peak memory, decode time per token and cache size at one context
  length, measured in a fresh process per model and length so that each peak memory is its own (`measure`);
- decode: milliseconds per token, eager and compiled (`torch.compile` over a static cache), both models
  interleaved in one process (`measure_decode`).

Both models get the same width, depth, heads, KV heads and vocabulary; Llama's MLP is widened until the parameter
counts match (`sonett.evaluation.baselines.llama_config_matching`). Random weights, fp32, sdpa attention. Training
and prefill rows carry FLOPs per token counted from the config (`sonett.evaluation.flops`); `matmul_peak_flops`
measures the machine's fp32 matmul peak that the achieved FLOP/s are compared with.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from sonett.evaluation.flops import forward_flops
from sonett.training.optimization import create_optimizer, parameter_groups

logger = logging.getLogger(__name__)

MODELS = ("sonett", "llama")
SECTIONS = ("train", "prefill", "decode")
DECODE_MODES = ("eager", "compiled")
# The module whose `--worker` mode runs `measure` in a fresh process (an installed module, no repository path).
WORKER_MODULE = "sonett.cli.benchmark"
# Tokens one training step holds by default: the batch is this divided by the context (at least 1).
TRAIN_TOKENS_PER_STEP = 4096
# Square fp32 matrix sizes whose `torch.mm` gives the machine's matmul peak.
PEAK_SIZES = (1024, 2048)


def build_models(preset: str, max_position_embeddings: int = 65536) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(sonett, llama): random weights, eval mode, fp32, sdpa; Llama has Sonett's width, depth, heads, KV heads and
    vocabulary, and its MLP widened until the parameter counts match (`llama_config_matching`)."""
    from transformers import LlamaForCausalLM

    from sonett.evaluation.baselines import llama_config_matching
    from sonett.model.modeling_sonett import SonettForCausalLM
    from sonett.presets import config_from_preset, load_preset

    sonett_config = config_from_preset(load_preset(preset), max_position_embeddings=max_position_embeddings)
    llama_config = llama_config_matching(sonett_config)
    torch.manual_seed(0)
    return SonettForCausalLM(sonett_config).eval(), LlamaForCausalLM(llama_config).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_peak_flops(sizes: tuple[int, ...] = PEAK_SIZES, repeats: int = 10, warm_up_seconds: float = 1.0) -> float:
    """The machine's fp32 matmul peak in FLOP/s on the current threads: the best of `repeats` `torch.mm` of square
    fp32 matrices of each size (2 n^3 FLOPs each), after `warm_up_seconds` of products (an idle CPU needs a moment
    to reach its sustained clock: one warm-up product measured a third less on this project's machine)."""
    best = 0.0
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
        until = time.perf_counter() + warm_up_seconds
        while time.perf_counter() < until:
            torch.mm(a, b)
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - started))
    logger.info("fp32 matmul peak: %.1f GFLOP/s on %d threads", best / 1e9, torch.get_num_threads())
    return best


def cache_bytes(cache) -> int:
    """Bytes of a decoding state: a `SonettCache` counts its own; a transformers cache its keys and values."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def reset_peak_rss() -> bool:
    """Start the process's peak resident memory afresh from its current size (Linux: `/proc/self/clear_refs`).

    Needed because the peak a process reports is inherited across fork and exec: a worker started by a benchmark
    that had trained models would otherwise report the parent's gigabytes. Returns False where it cannot be reset.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The process's peak resident memory since the last `reset_peak_rss` (or since it started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def measure(model_name: str, preset: str, context: int, decode_tokens: int, prefill_chunk: int = 0) -> dict:
    """Measure one model at one context length (call it in a fresh process, so the peak memory is its own).

    Prefill: one forward over `context` random tokens (batch 1) that builds the cache and, as `generate()` does,
    computes logits for the last position only (or the same in chunks of `prefill_chunk` tokens, for both models
    through their caches). Decode: mean milliseconds per greedy token over `decode_tokens` tokens, after two
    warm-up tokens. Returns the row of the table: prefill_s, peak_mb, decode_ms, cache_mb, parameters and
    flops_per_token (of the prefill as run: the last position's logits per forward call).
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

    reset_peak_rss()
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
    flops = forward_flops(model.config, context)
    calls = math.ceil(context / prefill_chunk) if prefill_chunk else 1  # each call computes one position's logits
    return {
        "model": model_name,
        "context": context,
        "prefill_s": prefill_seconds,
        "peak_mb": peak / 2**20,
        "decode_ms": 1000 * sum(times[2:]) / decode_tokens,
        "cache_mb": state_bytes / 2**20,
        "parameters": parameter_count(model),
        "flops_per_token": flops.forward - flops.lm_head + flops.lm_head * calls / context,
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


def _flop_cells(sonett: dict, llama: dict, seconds_per_token: Callable[[dict], float], peak_flops: float) -> str:
    """' MFLOP/token | achieved GFLOP/s | of peak ' cells (Sonett / Llama) of one pair of rows."""
    achieved = [row["flops_per_token"] / seconds_per_token(row) for row in (sonett, llama)]
    return (
        f"| {sonett['flops_per_token'] / 1e6:,.1f} / {llama['flops_per_token'] / 1e6:,.1f} "
        f"| {achieved[0] / 1e9:.1f} / {achieved[1] / 1e9:.1f} "
        f"| {achieved[0] / peak_flops:.2f} / {achieved[1] / peak_flops:.2f} "
    )


FLOP_HEADER = "| MFLOP/token (Sonett / Llama) | achieved GFLOP/s (Sonett / Llama) | of peak (Sonett / Llama) "


def markdown_table(rows: list[dict], contexts: list[int], peak_flops: float | None = None) -> str:
    """The prefill rows of both models as one Markdown table by context length, with the speed-up (Llama's time
    over Sonett's) and the memory ratio (Sonett's over Llama's); with `peak_flops` (FLOP/s), also the FLOPs per
    token, the achieved FLOP/s of the prefill and their fraction of the peak."""
    by_key = {(r["model"], r["context"]): r for r in rows}
    flop_header = FLOP_HEADER if peak_flops else ""
    lines = [
        "| context | prefill s (Sonett / Llama) | speed-up | peak MiB (Sonett / Llama) | ratio "
        f"| decode ms/token (Sonett / Llama) | speed-up | cache MiB (Sonett / Llama) {flop_header}|",
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 3 if peak_flops else ""),
    ]
    for context in contexts:
        s, l = by_key["sonett", context], by_key["llama", context]  # noqa: E741
        flops = _flop_cells(s, l, lambda row: row["prefill_s"] / row["context"], peak_flops) if peak_flops else ""
        lines.append(
            f"| {context:,} | {s['prefill_s']:.2f} / {l['prefill_s']:.2f} | {l['prefill_s'] / s['prefill_s']:.1f}x "
            f"| {s['peak_mb']:.0f} / {l['peak_mb']:.0f} | {s['peak_mb'] / max(l['peak_mb'], 1e-9):.2f} "
            f"| {s['decode_ms']:.1f} / {l['decode_ms']:.1f} | {l['decode_ms'] / s['decode_ms']:.1f}x "
            f"| {s['cache_mb']:.2f} / {l['cache_mb']:.2f} {flops}|"
        )
    return "\n".join(lines)


def default_train_batch(context: int) -> int:
    """Sequences per training step so that a step holds `TRAIN_TOKENS_PER_STEP` tokens (at least 1)."""
    return max(1, TRAIN_TOKENS_PER_STEP // context)


def measure_training(preset: str, context: int, batch: int | None = None, repeats: int = 3) -> list[dict]:
    """Training tokens/s of Sonett and Llama (equal parameter count) at one context length, in this process.

    One step: forward over `batch` x `context` random ids with labels, backward, AdamW step, zero_grad. One warm-up
    step per model, then `repeats` rounds with the two models interleaved; each model's best step counts.

    Returns one row per model: preset, model, context, batch, step_s, tokens_per_s, parameters and
    flops_per_token (a training step's FLOPs per token, `FlopCount.training`).
    """
    if context < 2 or repeats < 1 or (batch is not None and batch < 1):
        raise ValueError(
            f"measure_training needs context >= 2, repeats >= 1 and batch >= 1 (or None for the default), got "
            f"context={context}, repeats={repeats}, batch={batch}."
        )
    batch = batch or default_train_batch(context)
    models = dict(zip(MODELS, build_models(preset, max_position_embeddings=max(context, 2048))))
    optimizers = {  # the project's AdamW (sonett.training.optimization), as the training loops build it
        name: create_optimizer(parameter_groups(model, weight_decay=0.1), learning_rate=1e-4)
        for name, model in models.items()
    }
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, models["sonett"].config.vocab_size, (batch, context), generator=generator)

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        started = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for name, model in models.items():
        model.train()
        step(name)  # warm-up: kernels, allocator, optimizer state
    best = dict.fromkeys(MODELS, math.inf)
    for _ in range(repeats):
        for name in MODELS:
            best[name] = min(best[name], step(name))
    return [
        {
            "preset": preset,
            "model": name,
            "context": context,
            "batch": batch,
            "step_s": best[name],
            "tokens_per_s": batch * context / best[name],
            "parameters": parameter_count(model),
            "flops_per_token": forward_flops(model.config, context).training,
        }
        for name, model in models.items()
    ]


def training_table(rows: list[dict], peak_flops: float | None = None) -> str:
    """The training rows as one Markdown table, one line per preset and context, with the ratio of tokens/s
    (Sonett's over Llama's); with `peak_flops`, also FLOPs per token, achieved FLOP/s and their fraction of the
    peak."""
    pairs = {}
    for row in rows:
        pairs.setdefault((row["preset"], row["context"]), {})[row["model"]] = row
    flop_header = FLOP_HEADER if peak_flops else ""
    lines = [
        f"| preset | context | batch | tokens/s (Sonett / Llama) | Sonett / Llama {flop_header}|",
        "|---|---:|---:|---:|---:|" + ("---:|" * 3 if peak_flops else ""),
    ]
    for (preset, context), pair in pairs.items():
        s, l = pair["sonett"], pair["llama"]  # noqa: E741
        flops = _flop_cells(s, l, lambda row: 1 / row["tokens_per_s"], peak_flops) if peak_flops else ""
        lines.append(
            f"| {preset} | {context:,} | {s['batch']} | {s['tokens_per_s']:,.0f} / {l['tokens_per_s']:,.0f} "
            f"| {s['tokens_per_s'] / l['tokens_per_s']:.2f}x {flops}|"
        )
    return "\n".join(lines)


class _Decoder:
    """One model's greedy decoding state for `measure_decode`: `step()` runs one token through its cache."""

    def __init__(
        self, model: torch.nn.Module, mode: str, context: int, max_tokens: int, ids: torch.Tensor, backend: str
    ) -> None:
        from transformers import StaticCache

        self.model, self.mode, self.position = model, mode, context
        self.compile_s: float | None = None
        is_sonett = hasattr(model, "make_cache")
        self.is_sonett = is_sonett
        if is_sonett:
            self.cache = model.make_cache("dynamic" if mode == "eager" else "static", max_cache_len=max_tokens)
            out = model(ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        else:
            if mode == "eager":
                self.cache = DynamicCache(config=model.config)
            else:
                self.cache = StaticCache(config=model.config, max_cache_len=max_tokens)
            positions = torch.arange(context)
            out = model(ids, cache=self.cache, use_cache=True, logits_to_keep=1, cache_position=positions)
        self.token = out.logits[:, -1:].argmax(-1)
        self.tokens = [int(self.token)]  # the greedy tokens so far, to compare the modes
        self.forward = model.forward
        if mode == "compiled":
            self.forward = torch.compile(model.forward, fullgraph=True, backend=backend)
            started = time.perf_counter()
            self.step()  # the first call compiles
            self.compile_s = time.perf_counter() - started

    def step(self) -> None:
        if self.is_sonett:
            logits = self.forward(input_ids=self.token, cache=self.cache, use_cache=True).logits
        else:
            position = torch.tensor([self.position])
            logits = self.forward(
                input_ids=self.token, cache=self.cache, use_cache=True, cache_position=position
            ).logits
        self.position += 1
        self.token = logits[:, -1:].argmax(-1)
        self.tokens.append(int(self.token))


@torch.no_grad()
def measure_decode(
    preset: str,
    context: int,
    decode_tokens: int = 32,
    repeats: int = 3,
    modes: tuple[str, ...] = DECODE_MODES,
    compile_backend: str = "inductor",
) -> list[dict]:
    """Milliseconds per greedy token of Sonett and Llama after a prompt of `context` random tokens, in this process.

    Modes: `eager` (Sonett's dynamic `SonettCache`, Llama's `DynamicCache`) and `compiled`
    (`torch.compile(model.forward, fullgraph=True)` on the one-token step over a static-shape cache: Sonett's
    `SonettStaticCache`, transformers' `StaticCache` for Llama). The prompt is prefilled eagerly; the first compiled
    step (the compilation) is timed on its own as compile_s. `compile_backend` is torch.compile's backend (`eager`
    traces the graph without generating code: quick, for tests). After two warm-up tokens, `repeats` rounds of
    `decode_tokens` tokens run with all variants interleaved; each variant's best round counts.

    Returns one row per model and mode: preset, model, mode, context, decode_ms, compile_s, same_tokens (for a
    compiled row: whether its greedy tokens equal the eager ones of the same model, None if either did not run) and
    note. A variant that cannot run (a static cache refuses a hierarchy, compilation fails) gets decode_ms None and
    the reason as note.
    """
    unknown = sorted(set(modes) - set(DECODE_MODES))
    if unknown or context < 1 or decode_tokens < 1 or repeats < 1:
        raise ValueError(
            f"measure_decode needs modes from {DECODE_MODES}, context >= 1, decode_tokens >= 1 and repeats >= 1; "
            f"got modes={list(modes)}, context={context}, decode_tokens={decode_tokens}, repeats={repeats}."
        )
    models = dict(zip(MODELS, build_models(preset, max_position_embeddings=max(65536, 2 * context))))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, models["sonett"].config.vocab_size, (1, context), generator=generator)
    max_tokens = context + 2 + repeats * decode_tokens + 2  # prompt, compile step, warm-up, timed tokens, spare
    decoders, rows = {}, {}
    for name, model in models.items():
        for mode in modes:
            row = {"preset": preset, "model": name, "mode": mode, "context": context, "decode_ms": None}
            row.update(compile_s=None, same_tokens=None, note="")
            rows[name, mode] = row
            try:
                decoder = _Decoder(model, mode, context, max_tokens, ids, compile_backend)
                for _ in range(2):  # warm-up
                    decoder.step()
            except Exception as error:  # the table's footnote names why this variant has no figure
                row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
                logger.warning("%s %s decoding at %d tokens failed: %s", name, mode, context, row["note"])
                continue
            row["compile_s"] = decoder.compile_s
            decoders[name, mode] = decoder
    for _ in range(repeats):
        for key, decoder in decoders.items():
            started = time.perf_counter()
            for _ in range(decode_tokens):
                decoder.step()
            milliseconds = 1000 * (time.perf_counter() - started) / decode_tokens
            best = rows[key]["decode_ms"]
            rows[key]["decode_ms"] = milliseconds if best is None else min(best, milliseconds)
    for name in MODELS:
        if (name, "eager") in decoders and (name, "compiled") in decoders:
            eager, compiled = decoders[name, "eager"].tokens, decoders[name, "compiled"].tokens
            length = min(len(eager), len(compiled))  # the compiled decoder ran one more step (the compilation)
            rows[name, "compiled"]["same_tokens"] = eager[:length] == compiled[:length]
    return list(rows.values())


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "n/a"


def _milliseconds(row: dict | None) -> str:
    return f"{row['decode_ms']:.2f}" if row and row["decode_ms"] is not None else "n/a"


def decode_table(rows: list[dict]) -> str:
    """The decode rows as one Markdown table by context length: ms/token of the four variants, the speed-ups
    (Llama's ms over Sonett's: eager / eager, compiled / compiled, Llama eager / Sonett compiled) and the compile
    times. Footnotes name the variants that did not run and why, and compiled variants whose greedy tokens differ
    from the eager ones."""
    by_key = {(r["model"], r["mode"], r["context"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    lines = [
        "| context | Sonett eager ms | Sonett compiled ms | Llama eager ms | Llama compiled ms "
        "| speed-up eager (Llama / Sonett) | speed-up compiled (Llama / Sonett) "
        "| Llama eager / Sonett compiled | compile s (Sonett / Llama) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for context in contexts:
        cells = {(m, mode): by_key.get((m, mode, context)) for m in MODELS for mode in DECODE_MODES}
        ms = {key: (row["decode_ms"] if row else None) for key, row in cells.items()}
        compile_times = [
            f"{row['compile_s']:.1f}" if row and row["compile_s"] is not None else "n/a"
            for row in (cells["sonett", "compiled"], cells["llama", "compiled"])
        ]
        lines.append(
            f"| {context:,} | {_milliseconds(cells['sonett', 'eager'])} | {_milliseconds(cells['sonett', 'compiled'])} "
            f"| {_milliseconds(cells['llama', 'eager'])} | {_milliseconds(cells['llama', 'compiled'])} "
            f"| {_ratio(ms['llama', 'eager'], ms['sonett', 'eager'])} "
            f"| {_ratio(ms['llama', 'compiled'], ms['sonett', 'compiled'])} "
            f"| {_ratio(ms['llama', 'eager'], ms['sonett', 'compiled'])} "
            f"| {compile_times[0]} / {compile_times[1]} |"
        )
    notes = sorted({f"n/a: {r['model']} {r['mode']}: {r['note']}" for r in rows if r["note"]})
    notes += sorted(
        {f"{r['model']} compiled: greedy tokens differ from eager" for r in rows if r.get("same_tokens") is False}
    )
    lines += ["", *notes] if notes else []
    return "\n".join(lines)


__all__ = [
    "DECODE_MODES",
    "SECTIONS",
    "build_models",
    "cache_bytes",
    "decode_table",
    "default_train_batch",
    "markdown_table",
    "matmul_peak_flops",
    "measure",
    "measure_decode",
    "measure_in_fresh_process",
    "measure_training",
    "peak_rss_bytes",
    "reset_peak_rss",
    "training_table",
]

"""The long-run stability scripts (`scripts/stability_training.py`, `scripts/stability_generation.py`) end to end on
tiny settings, and their summaries on hand-made histories: a NaN makes the training check fail, a growing RSS
makes the generation check fail, and a constant-memory model keeps a cache of constant size."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_CONSTANT = {  # a constant-memory mix (no full attention), small enough to decode 120 tokens in a moment
    "model_type": "sonett",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 16,
    "layer_types": ["linear_attention", "sliding_attention", "memory_attention"],
    "linear_feature_map": "taylor",
    "linear_feature_dim": 8,
    "linear_chunk_size": 16,
    "memory_chunk_size": 16,
    "max_position_embeddings": 256,
}


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def training():
    return load_script("stability_training")


@pytest.fixture(scope="module")
def generation():
    return load_script("stability_generation")


# ---------------------------------------------------------------------------------------------------- training
def test_training_summary_counts_non_finite_values(training):
    history = [
        {"step": 1, "loss": 8.0, "lr": 1e-3, "grad_norm": 3.0},
        {"step": 2, "loss": 7.0, "lr": 1e-3, "grad_norm": float("inf")},
        {"step": 3, "loss": float("nan"), "lr": 1e-3, "grad_norm": 2.0},
        {"step": 4, "loss": 7.5, "lr": 1e-3, "grad_norm": 1.5, "validation_loss": 7.2},
    ]
    summary = training.summarise(history, tokens_seen=4096)
    assert summary["steps"] == 4 and summary["tokens"] == 4096
    assert (summary["min_loss"], summary["max_loss"], summary["final_loss"]) == (7.0, 8.0, 7.5)
    assert summary["largest_loss_rise"] == 0.0  # the only rise (7.0 -> NaN -> 7.5) passes through a NaN
    assert summary["max_grad_norm"] == 3.0 and summary["final_grad_norm"] == 1.5
    assert (summary["non_finite_losses"], summary["non_finite_grad_norms"]) == (1, 1)
    assert summary["validation"] == [(4, 7.2)]
    assert not training.is_stable(summary)
    assert "| non-finite losses | 1 |" in training.table(summary)


def test_training_summary_without_grad_norm_is_stable_when_losses_are_finite(training):
    history = [{"step": s, "loss": 9.0 - s, "lr": 1e-3} for s in range(1, 21)]
    summary = training.summarise(history)
    assert summary["grad_norm_recorded"] is False and summary["max_grad_norm"] is None
    assert summary["mean_loss_first_10pct"] == 7.5 and summary["mean_loss_last_10pct"] == pytest.approx(-10.5)
    assert training.is_stable(summary)
    assert "not recorded" in training.table(summary)
    with pytest.raises(ValueError, match="loss history is empty.*--max_steps"):
        training.summarise([])


def test_training_script_runs_and_writes_plot_and_summary(training, tmp_path, capsys):
    output = tmp_path / "run"
    status = training.main(
        [
            "--max_documents", "12", "--vocab_size", "300", "--block_size", "16", "--batch_size", "2",
            "--max_steps", "3", "--warmup_steps", "1", "--eval_steps", "2", "--eval_blocks", "2",
            "--validation_fraction", "0.2", "--output_dir", str(output),
        ]
    )  # fmt: skip
    assert status == 0
    assert (output / "stability-training.png").read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((output / "stability-training.json").read_text())
    summary, history = saved["summary"], saved["loss_history"]
    assert summary["steps"] == 3 and len(history) == 3
    assert summary["tokens"] == 3 * 2 * 16
    assert summary["non_finite_losses"] == 0 and math.isfinite(summary["final_loss"])
    assert summary["final_loss"] == history[-1]["loss"]
    printed = capsys.readouterr().out
    assert "| optimizer steps | 3 |" in printed and "stable: every loss" in printed


# -------------------------------------------------------------------------------------------------- generation
def samples(rss_values, start=0, every=100, cache_bytes=1000):
    return [
        {"generated": start + every * (i + 1), "state_tokens": start + every * (i + 1) + 5, "rss": rss,
         "cache_bytes": cache_bytes}
        for i, rss in enumerate(rss_values)
    ]  # fmt: skip


def test_generation_summary_takes_medians_after_the_warmup(generation):
    mib = 2**20
    # warm-up samples (100, 200) are ignored; one noisy spike (at 500) does not move the medians
    rss = [50 * mib, 90 * mib, 100 * mib, 101 * mib, 300 * mib, 99 * mib, 102 * mib, 103 * mib, 101 * mib]
    summary = generation.summarise(samples(rss), warmup=300)
    assert summary["baseline_rss"] == 101 * mib  # median of the samples at 300, 400, 500
    assert summary["final_rss"] == 102 * mib  # median of the samples at 700, 800, 900
    assert summary["growth_percent"] == pytest.approx(100 / 101)
    assert summary["max_rss_after_warmup"] == 300 * mib
    growing = generation.summarise(samples([100 * mib * (1 + 0.02 * i) for i in range(10)]), warmup=0)
    assert growing["growth_percent"] > 5
    assert growing["rss_slope_bytes_per_1k_tokens"] == pytest.approx(0.02 * 100 * mib * 10)
    assert growing["cache_growth_percent"] == 0.0


def test_generation_summary_reports_a_growing_cache(generation):
    grown = [{**sample, "cache_bytes": 1000 + 10 * sample["generated"]} for sample in samples([100] * 10)]
    summary = generation.summarise(grown, warmup=500)
    assert (summary["cache_bytes_first"], summary["cache_bytes_last"]) == (6000, 11000)
    assert summary["cache_growth_percent"] == pytest.approx(500 / 6)
    with pytest.raises(ValueError, match="Only 1 samples after the warm-up.*--tokens"):
        generation.summarise(samples([1, 2, 3]), warmup=300)


def test_full_attention_kv_bytes(generation):
    from sonett.presets import config_from_preset

    config = config_from_preset(TINY_CONSTANT)
    # 3 layers x (keys + values) x 2 KV heads x head size 8 x 4 bytes = 384 bytes per token
    assert generation.full_attention_kv_bytes(config, 1000) == 384 * 1000


def test_generation_script_runs_with_a_constant_cache(generation, tmp_path, capsys):
    preset = tmp_path / "tiny-constant.json"
    preset.write_text(json.dumps(TINY_CONSTANT))
    plot, summary_path = tmp_path / "generation.png", tmp_path / "generation.json"
    status = generation.main(
        [
            "--config", str(preset), "--tokenizer_documents", "3", "--vocab_size", "300", "--tokens", "120",
            "--warmup", "60", "--every", "20", "--threads", "1", "--max_growth", "1000",
            "--plot", str(plot), "--summary", str(summary_path),
        ]
    )  # fmt: skip
    assert status == 0
    assert plot.read_bytes().startswith(PNG_MAGIC)
    saved = json.loads(summary_path.read_text())
    summary, recorded = saved["summary"], saved["samples"]
    assert [s["generated"] for s in recorded] == [20, 40, 60, 80, 100, 120]
    prompt = recorded[0]["state_tokens"] - 20
    assert [s["state_tokens"] for s in recorded] == [prompt + g for g in (20, 40, 60, 80, 100, 120)]
    # past the window, the state of a constant-memory model no longer grows
    assert summary["cache_bytes_first"] == summary["cache_bytes_last"] > 0
    assert summary["cache_growth_percent"] == 0.0
    assert summary["full_attention_bytes_last"] == 384 * (prompt + 120)
    assert "RSS growth after warm-up" in capsys.readouterr().out

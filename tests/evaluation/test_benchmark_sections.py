"""The train and decode sections of `sonett benchmark` (`sonett.evaluation.benchmark`) on a micro preset and one short
context: well-formed rows with the right FLOP counts, and Markdown tables with their ratio columns."""

import json

import pytest

from sonett.evaluation.baselines import llama_config_matching
from sonett.evaluation.benchmark import (
    decode_table,
    default_train_batch,
    markdown_table,
    matmul_peak_flops,
    measure_decode,
    measure_training,
    training_table,
)
from sonett.evaluation.flops import forward_flops
from sonett.presets import config_from_preset, load_preset

CONTEXT = 32


@pytest.fixture
def micro_preset(tmp_path):
    """sonett-tiny's layer pattern at width 32 with a vocabulary of 64, as a preset JSON file."""
    preset = load_preset("sonett-tiny")
    preset.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    preset.update(sliding_window=8, linear_feature_dim=4, linear_chunk_size=16, memory_chunk_size=16)
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(preset))
    return str(path)


def test_training_rows_of_both_models(micro_preset):
    rows = measure_training(micro_preset, CONTEXT, batch=2, repeats=1)
    assert [row["model"] for row in rows] == ["sonett", "llama"]
    config = config_from_preset(load_preset(micro_preset))
    llama = llama_config_matching(config)
    for row, flops in zip(rows, (forward_flops(config, CONTEXT), forward_flops(llama, CONTEXT)), strict=True):
        assert row["preset"] == micro_preset and row["context"] == CONTEXT and row["batch"] == 2
        assert row["tokens_per_s"] == pytest.approx(2 * CONTEXT / row["step_s"]) and row["step_s"] > 0
        assert row["flops_per_token"] == flops.training
    # equal parameter counts (within llama_config_matching's 5 %), not merely the same shape
    assert rows[1]["parameters"] == pytest.approx(rows[0]["parameters"], rel=0.05)
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_training(micro_preset, CONTEXT, repeats=0)


def test_default_batch_holds_4096_tokens():
    assert [default_train_batch(n) for n in (512, 4096, 16384)] == [8, 1, 1]


def test_training_table_has_the_ratio_and_flop_columns():
    rows = [
        {"preset": "p", "model": "sonett", "context": 512, "batch": 8, "tokens_per_s": 3000.0, "flops_per_token": 1e7},
        {"preset": "p", "model": "llama", "context": 512, "batch": 8, "tokens_per_s": 2000.0, "flops_per_token": 2e7},
    ]
    table = training_table(rows, peak_flops=1e11)
    header, _, line = table.splitlines()
    assert "Sonett / Llama" in header and "of peak (Sonett / Llama)" in header
    # 3,000 / 2,000 tokens/s = 1.50x; achieved 30 / 40 GFLOP/s = 0.30 / 0.40 of a 100 GFLOP/s peak
    assert "| 1.50x |" in line and "| 10.0 / 20.0 |" in line and "| 30.0 / 40.0 |" in line and "0.30 / 0.40" in line
    assert "of peak" not in training_table(rows)


def test_prefill_table_gains_flop_columns_with_a_peak():
    rows = [
        {"model": m, "context": 1024, "prefill_s": s, "peak_mb": 10.0, "decode_ms": 2.0, "cache_mb": 1.0}
        | {"flops_per_token": 1e7}
        for m, s in (("sonett", 0.1), ("llama", 0.2))
    ]
    plain, with_peak = markdown_table(rows, [1024]), markdown_table(rows, [1024], peak_flops=1e12)
    assert "speed-up" in plain and "GFLOP/s" not in plain
    # 1e7 FLOPs x 1024 tokens in 0.1 s = 102.4 GFLOP/s, 0.10 of a 1 TFLOP/s peak; Llama half of it
    assert "| 102.4 / 51.2 | 0.10 / 0.05 |" in with_peak.splitlines()[-1]


def test_decode_rows_eager_and_compiled(micro_preset):
    rows = measure_decode(micro_preset, CONTEXT, decode_tokens=2, repeats=1, compile_backend="eager")
    by_key = {(row["model"], row["mode"]): row for row in rows}
    assert set(by_key) == {(m, mode) for m in ("sonett", "llama") for mode in ("eager", "compiled")}
    for (_, mode), row in by_key.items():
        assert row["note"] == "" and row["decode_ms"] > 0 and row["context"] == CONTEXT, row
        assert (row["compile_s"] is None) == (mode == "eager")
        assert row["same_tokens"] is (True if mode == "compiled" else None)  # compiled decodes the eager tokens
    table = decode_table(rows)
    assert "speed-up eager (Llama / Sonett)" in table and "Llama eager / Sonett compiled" in table
    assert "n/a" not in table


def test_a_variant_that_cannot_run_is_named_in_a_footnote():
    rows = [
        {"model": "sonett", "mode": "eager", "context": 64, "decode_ms": 2.0, "compile_s": None, "note": ""},
        {"model": "sonett", "mode": "compiled", "context": 64, "decode_ms": None, "compile_s": None}
        | {"note": "ValueError: A static cache does not support a config with a hierarchy"},
        {"model": "llama", "mode": "eager", "context": 64, "decode_ms": 3.0, "compile_s": None, "note": ""},
        {"model": "llama", "mode": "compiled", "context": 64, "decode_ms": 1.0, "compile_s": 9.5, "note": ""},
    ]
    table = decode_table(rows)
    assert "| 64 | 2.00 | n/a | 3.00 | 1.00 | 1.50x | n/a | n/a | n/a / 9.5 |" in table
    assert table.endswith("n/a: sonett compiled: ValueError: A static cache does not support a config with a hierarchy")
    rows[1].update(decode_ms=1.5, note="", same_tokens=False)
    assert decode_table(rows).endswith("\nsonett compiled: greedy tokens differ from eager")


def test_the_hourglass_has_no_compiled_decode_and_says_why(tmp_path, micro_preset):
    preset = load_preset(micro_preset)
    preset["hierarchy"] = {"shorten_factor": 2, "start_layer": 1, "end_layer": 3}
    path = tmp_path / "hourglass.json"
    path.write_text(json.dumps(preset))
    rows = measure_decode(str(path), CONTEXT, decode_tokens=1, repeats=1, compile_backend="eager")
    sonett_compiled = next(r for r in rows if r["model"] == "sonett" and r["mode"] == "compiled")
    assert sonett_compiled["decode_ms"] is None and "hierarchy" in sonett_compiled["note"]
    with pytest.raises(ValueError, match="modes from"):
        measure_decode(str(path), CONTEXT, modes=("jit",))


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak_flops(sizes=(64,), repeats=1, warm_up_seconds=0.01) > 0

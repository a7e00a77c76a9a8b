"""`sonett benchmark`'s measurements (`sonett.evaluation.benchmark`) on the smallest settings: the cache sizes it
reports are the exact decoding states, and its worker runs as an installed module from any folder (no path into
the repository)."""

import pytest
from transformers import LlamaConfig

from sonett.evaluation.baselines import llama_config_like
from sonett.evaluation.benchmark import measure, measure_in_fresh_process
from sonett.evaluation.footprint import decode_state_bytes, llama_state_size
from sonett.presets import config_from_preset, load_preset

PRESET = "sonett-tiny"
CONTEXT, DECODE = 16, 1
SEEN = CONTEXT  # the cache is measured right after the prefill


def test_measure_reports_the_exact_sonett_state():
    row = measure("sonett", PRESET, CONTEXT, DECODE)
    config = config_from_preset(load_preset(PRESET))
    assert row["cache_mb"] * 2**20 == decode_state_bytes(config, SEEN)
    assert row["model"] == "sonett" and row["context"] == CONTEXT and row["decode_ms"] > 0 and row["prefill_s"] > 0
    with pytest.raises(ValueError, match="model_name must be one of"):
        measure("gpt", PRESET, CONTEXT, DECODE)


def test_the_worker_runs_as_an_installed_module_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: nothing may be found through the working directory
    row = measure_in_fresh_process("llama", PRESET, CONTEXT, DECODE, timeout=300)
    llama: LlamaConfig = llama_config_like(config_from_preset(load_preset(PRESET)))
    assert row["cache_mb"] * 2**20 == llama_state_size(llama).at(SEEN)
    assert row["model"] == "llama" and row["parameters"] > 0

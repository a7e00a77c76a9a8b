"""`sonett info` (`sonett.evaluation.footprint`): the decoding-state size computed from the config equals what a real
`SonettCache` holds after a forward, for every layer kind and a hierarchy; a Llama's equals its real KV cache; the
parameters add up; a folder is read without running its code; `--json` is machine-readable."""

import contextlib
import io
import json

import pytest
import torch
from helpers_model import WINDOW, random_ids, tiny_config
from transformers import LlamaForCausalLM

from sonett import SonettForCausalLM
from sonett.cli.info import main as info
from sonett.evaluation.baselines import llama_config_like
from sonett.evaluation.footprint import decode_state_bytes, llama_state_size, meta_model, parameter_counts, state_size
from sonett.presets import preset_names

EVERY_KIND = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
CONFIGS = {
    "every-kind": {"layer_types": EVERY_KIND, "num_hidden_layers": 4},
    "every-kind-hierarchy-2": {
        "layer_types": [
            "linear_attention",
            "full_attention",
            "sliding_attention",
            "memory_attention",
            "full_attention",
        ],
        "num_hidden_layers": 5,
        "hierarchy": {"shorten_factor": 2, "start_layer": 1, "end_layer": 4},
    },
    "hierarchy-3": {
        "layer_types": ["sliding_attention", "full_attention", "linear_attention", "full_attention"],
        "num_hidden_layers": 4,
        "hierarchy": {"shorten_factor": 3, "start_layer": 1, "end_layer": 3},
    },
}
LENGTHS = (1, 2, WINDOW - 1, WINDOW, 2 * WINDOW + 1, 4 * WINDOW + 3)


def run_info(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = info(argv)
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_size_from_the_config_equals_a_real_cache(name):
    config = tiny_config(**CONFIGS[name])
    torch.manual_seed(0)
    model = SonettForCausalLM(config).eval()
    for length in LENGTHS:
        with torch.no_grad():
            cache = model(random_ids(1, length), use_cache=True).cache
        assert decode_state_bytes(config, length) == cache.nbytes(), (name, length)
    model.to(torch.bfloat16)
    with torch.no_grad():
        cache = model(random_ids(1, LENGTHS[-1]), use_cache=True).cache
    assert decode_state_bytes(config, LENGTHS[-1], torch.bfloat16) == cache.nbytes()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_token_and_constant_state_add_up_to_the_exact_size(name):
    config = tiny_config(**CONFIGS[name])
    size = state_size(config)
    k = config.hierarchy["shorten_factor"] if config.hierarchy else 1
    for tokens in (k * 2 * WINDOW, k * 5 * WINDOW):  # past every window, whole groups
        assert size.constant + size.per_token * tokens == decode_state_bytes(config, tokens)
    full = 2 * config.num_key_value_heads * config.head_dim * 4  # fp32 keys and values of one token
    span = config.hierarchy_span()
    expected = sum(full / (k if i in span else 1) for i, t in enumerate(config.layer_types) if t == "full_attention")
    assert size.per_token == expected


def test_llama_state_equals_its_real_kv_cache():
    llama_config = llama_config_like(tiny_config(**CONFIGS["every-kind"]))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config).eval()
    with torch.no_grad():
        cache = llama(random_ids(1, 9), use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    size = llama_state_size(llama_config)
    assert size.constant == 0 and size.at(9) == real


def test_parameters_add_up_on_the_meta_device():
    config = tiny_config(**CONFIGS["every-kind-hierarchy-2"], tie_word_embeddings=False)
    counts = parameter_counts(meta_model(config))
    real = SonettForCausalLM(config)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    parts = counts["embedding"] + counts["output_head"] + counts["final_norm"] + counts["hourglass"]
    assert parts + sum(counts["per_kind"].values()) + counts["cross_attention"] + counts["vision"] == counts["total"]
    assert counts["per_kind"]["full_attention"] == 2 * sum(p.numel() for p in real.model.layers[1].parameters())
    assert counts["hourglass"] == sum(p.numel() for p in real.model.hourglass.parameters()) > 0


def test_info_of_a_saved_folder_as_json(tmp_path):
    config = tiny_config(**CONFIGS["every-kind"])
    model = SonettForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    code, output = run_info([str(tmp_path / "model"), "--json", "--contexts", "5", "100"])
    assert code == 0, output
    result = json.loads(output)
    assert result["source"] == "folder" and result["architecture"] == "SonettForCausalLM"
    assert result["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert result["layers"]["kinds"] == dict.fromkeys(EVERY_KIND, 1)
    assert result["state"]["per_token_bytes"] == 2 * config.num_key_value_heads * config.head_dim * 4
    assert result["state"]["at_bytes"] == {"5": decode_state_bytes(config, 5), "100": decode_state_bytes(config, 100)}
    assert result["llama"]["at_bytes"]["100"] == 100 * 4 * 2 * config.num_key_value_heads * config.head_dim * 4


def test_info_refuses_a_folder_with_code_of_its_own_without_running_it(tmp_path):
    folder = tmp_path / "model"
    SonettForCausalLM(tiny_config()).save_pretrained(folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    code, output = run_info([str(folder)])
    assert code == 2 and "evil.py is not one of the sonett package's code files" in output, output
    assert not marker.exists()
    code, output = run_info([str(tmp_path)])  # a folder without config.json: says what to pass
    assert code == 2 and "has no config.json" in output and "sonett-tiny" in output, output


def test_info_of_a_preset_and_of_every_preset():
    code, output = run_info(["sonett-tiny-hourglass"])
    assert code == 0, output
    assert "layers 1-3" in output and "shortened 2x" in output and "per token" in output and "Llama" in output
    code, output = run_info([])  # the table scripts/count_parameters.py printed, with the state sizes added
    assert code == 0, output
    assert all(f"| `{name}` |" in output for name in preset_names()), output

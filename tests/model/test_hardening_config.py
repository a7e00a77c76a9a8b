"""Hardening of configs and of loading (issue 15, items 8 and 9).

Item 8: `from_pretrained` compares the config with the checkpoint's tensor shapes, read from the safetensors headers,
and refuses a mismatch naming the field before any tensor is allocated (a `vocab_size` of 25,000,000 in config.json
used to cost seconds and GBs first). Item 9: config fields that used to be accepted and then fail deep inside torch
(or give NaN) are refused with the field named; a misspelt key is reported with the closest valid name; a short
input of `linear_attention` is no longer padded to a whole chunk.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers_model import random_ids, tiny_config, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from sonett import SonettConfig, SonettForCausalLM, SonettModel
from sonett.model.linear_attention_sonett import chunk_linear_attention


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any real (not meta) tensor an operation creates."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.numel = max(self.numel, leaf.numel())
        return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model (vocab 97, hidden 32, intermediate 64, 3 layers, 4 heads of 8, 2 kv heads), whole and
    sharded."""
    root = tmp_path_factory.mktemp("saved")
    model = tiny_model("mixed")
    model.save_pretrained(root / "complete")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def edited_copy(saved: Path, tmp_path: Path, edits: dict, source: str = "complete") -> Path:
    """A copy of a saved folder whose config.json has `edits` applied."""
    folder = shutil.copytree(saved / source, tmp_path / "folder")
    values = json.loads((folder / "config.json").read_text())
    values.update(edits)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Item 8: config sizes against the checkpoint, before any allocation
# ---------------------------------------------------------------------------------------------------------------

LOADERS = {
    "SonettForCausalLM": lambda folder, **kw: SonettForCausalLM.from_pretrained(folder, **kw),
    "AutoModelForCausalLM": lambda folder, **kw: AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, **kw
    ),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_huge_vocab_size_is_refused_from_the_headers_before_allocating(saved, tmp_path, loader):
    """2,000,000 x 32 floats would be 256 MB; the refusal comes first, naming the field and both values."""
    folder = edited_copy(saved, tmp_path, {"vocab_size": 2_000_000})
    message = (
        r"tensors have other shapes \(model.embed_tokens.weight \(97, 32\) in the checkpoint vs \(2000000, 32\) in "
        r"the model\)\. Config fields that differ from the checkpoint: vocab_size = 2000000 in the config, 97 in the "
        r"checkpoint.*set those fields in config.json.*ignore_mismatched_sizes=True"
    )
    with LargestTensor() as largest, pytest.raises(ValueError, match=message):
        LOADERS[loader](folder)
    assert largest.numel < 100_000, f"a tensor of {largest.numel} elements was allocated before the refusal"


SIZE_EDITS = {
    "hidden_size": ({"hidden_size": 64}, r"hidden_size = 64 in the config, 32 in the checkpoint"),
    "intermediate_size": (
        {"intermediate_size": 128},
        r"intermediate_size = 128 in the config, 64 in the checkpoint \(model.layers.0.mlp.gate_proj.weight\)",
    ),
    "num_key_value_heads": (
        {"num_key_value_heads": 4},
        r"num_key_value_heads \* head_dim = 4 \* 8 = 32 in the config, 16 in the checkpoint",
    ),
    "head_dim": ({"head_dim": 16}, r"num_attention_heads \* head_dim = 4 \* 16 = 64 in the config, 32 in the"),
    "fewer-layers": (
        {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]},
        r"holds 3 decoder layers but num_hidden_layers = 2 in the config, so layer 2 would be dropped.*"
        r"ignore_mismatched_sizes=True",
    ),
    "more-layers": (
        {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2},
        r"holds 3 decoder layers but num_hidden_layers = 4 in the config, so layer 3 would be randomly "
        r"initialised.*allow_missing_weights=True",
    ),
}


@pytest.mark.parametrize("case", sorted(SIZE_EDITS))
def test_each_size_field_is_named_with_both_values(saved, tmp_path, case):
    edits, message = SIZE_EDITS[case]
    folder = edited_copy(saved, tmp_path, edits)
    with pytest.raises(ValueError, match=message):
        SonettForCausalLM.from_pretrained(folder)


def test_sharded_checkpoints_and_keyword_overrides_are_checked_too(saved, tmp_path):
    folder = edited_copy(saved, tmp_path, {"vocab_size": 2_000_000}, source="sharded")
    with LargestTensor() as largest, pytest.raises(ValueError, match=r"vocab_size = 2000000 in the config, 97 in"):
        SonettForCausalLM.from_pretrained(folder)
    assert largest.numel < 100_000
    with pytest.raises(ValueError, match=r"intermediate_size = 128 in the config, 64 in the checkpoint"):
        SonettForCausalLM.from_pretrained(saved / "complete", intermediate_size=128)
    with pytest.raises(ValueError, match=r"vocab_size = 2000000 in the config, 97 in the checkpoint"):
        SonettForCausalLM.from_pretrained(saved / "complete", config=tiny_config("mixed", vocab_size=2_000_000))
    # A checkpoint of the base model loads into the head and back (transformers' prefix handling): no false refusal.
    body = tmp_path / "body"
    SonettModel(tiny_config("mixed")).save_pretrained(body)
    SonettForCausalLM.from_pretrained(body)
    SonettModel.from_pretrained(saved / "complete")


def test_the_opt_outs_still_load(saved, tmp_path):
    """ignore_mismatched_sizes=True re-initialises what differs, as in transformers; allow_missing_weights=True adds
    layers to train."""
    folder = edited_copy(saved, tmp_path, {"intermediate_size": 128})
    model, info = SonettForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (128, 32)
    assert "model.layers.0.mlp.gate_proj.weight" in {name for name, _, _ in info["mismatched_keys"]}
    folder = edited_copy(saved, tmp_path / "more", SIZE_EDITS["more-layers"][0])
    model = SonettForCausalLM.from_pretrained(folder, allow_missing_weights=True)
    assert len(model.model.layers) == 4


def hub_cache(saved: Path, root: Path, edits: dict) -> Path:
    """A Hugging Face cache holding `tester/sonett-tiny` at one commit, as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "models--tester--sonett-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = shutil.copytree(saved / "complete", repo / "snapshots" / commit)
    values = json.loads((snapshot / "config.json").read_text())
    values.update(edits)
    (snapshot / "config.json").write_text(json.dumps(values))
    return root


def test_a_cached_hub_model_is_checked_from_the_cache(saved, tmp_path):
    cache = hub_cache(saved, tmp_path / "bad", {"vocab_size": 2_000_000})
    with LargestTensor() as largest, pytest.raises(ValueError, match=r"vocab_size = 2000000 in the config, 97 in"):
        SonettForCausalLM.from_pretrained("tester/sonett-tiny", cache_dir=cache, local_files_only=True)
    assert largest.numel < 100_000
    good = hub_cache(saved, tmp_path / "good", {})
    loaded = SonettForCausalLM.from_pretrained("tester/sonett-tiny", cache_dir=good, local_files_only=True)
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model("mixed")(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# Item 9: config fields
# ---------------------------------------------------------------------------------------------------------------

NAN = float("nan")
INVALID_FIELDS = {
    "eps-nan": ({"rms_norm_eps": NAN}, r"rms_norm_eps must be a small positive number \(e.g. 1e-6\), got nan"),
    "eps-zero": ({"rms_norm_eps": 0.0}, r"rms_norm_eps must be a small positive number \(e.g. 1e-6\), got 0.0"),
    "eps-negative": ({"rms_norm_eps": -1e-6}, r"rms_norm_eps must be a small positive number.*got -1e-06"),
    "theta-nan": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": NAN}},
        r"rope_parameters: rope_theta must be a positive number, got nan",
    ),
    "theta-inf-per-kind": (
        {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": math.inf}}},
        r"rope_parameters\['full_attention'\]: rope_theta must be a positive number, got inf",
    ),
    # The legacy top-level key of older config.json files (without rope_parameters): 0 became the default base.
    "legacy-theta-zero": (
        {"rope_parameters": None, "rope_theta": 0},
        r"rope_parameters\['full_attention'\]: rope_theta must be a positive number, got 0",
    ),
    "legacy-theta-nan": (
        {"rope_parameters": None, "rope_theta": NAN},
        r"rope_theta must be a positive number, got nan",
    ),
    "legacy-theta-text": ({"rope_parameters": None, "rope_theta": "big"}, r"rope_theta must be a positive number"),
    "hidden-act": (
        {"hidden_act": "swishh"},
        r"hidden_act = 'swishh' is not an activation transformers knows; did you mean 'swish'\? choose one of",
    ),
    "positions-zero": ({"max_position_embeddings": 0}, r"max_position_embeddings must be a positive integer, got 0"),
    "positions-negative": (
        {"max_position_embeddings": -3},
        r"max_position_embeddings must be a positive integer, got -3",
    ),
    "vision-eps": (
        {"vision_config": {"layer_norm_eps": NAN}},
        r"SonettVisionConfig.layer_norm_eps must be a small positive number",
    ),
}
# Cases the code before this change already refused (kept in the matrix for the other entry points).
REFUSED_BEFORE = {"legacy-theta-text"}


@pytest.mark.parametrize("case", sorted(INVALID_FIELDS))
@pytest.mark.parametrize("entry", ["SonettConfig", "SonettConfig.from_pretrained", "SonettForCausalLM.from_pretrained"])
def test_invalid_fields(saved, tmp_path, entry, case):
    overrides, message = INVALID_FIELDS[case]
    folder = edited_copy(saved, tmp_path, overrides)  # config.json writes NaN and Infinity as json does
    with pytest.raises(ValueError, match=message):
        if entry == "SonettConfig":
            tiny_config("mixed", **{k: v for k, v in overrides.items() if k != "rope_parameters" or v is not None})
        elif entry == "SonettConfig.from_pretrained":
            SonettConfig.from_pretrained(folder)
        else:
            SonettForCausalLM.from_pretrained(folder)


def sonett_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "configuration_sonett" in record.name]


def test_a_misspelt_key_is_reported_with_the_closest_field(saved, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        config = tiny_config("mixed", sliding_windw=8)
    assert config.sliding_window == 4  # transformers keeps the key as an attribute; the field keeps its value
    assert any(
        "unknown key 'sliding_windw': did you mean 'sliding_window'?" in text for text in sonett_warnings(caplog)
    )
    caplog.clear()
    folder = edited_copy(saved, tmp_path, {"intermediate_sise": 64})
    with caplog.at_level(logging.WARNING):
        SonettForCausalLM.from_pretrained(folder)
    assert any("'intermediate_sise': did you mean 'intermediate_size'?" in text for text in sonett_warnings(caplog))


def test_transformers_own_keys_and_custom_metadata_are_not_reported(saved, tmp_path, caplog):
    extras = {
        "torch_dtype": "float32",
        "architectures": ["SonettForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sonett.SonettConfig"},
        "_name_or_path": "somewhere",
        "transformers_version": "5.24.0",
        "output_attentions": False,
        "num_labels": 2,
        "sep_token_id": None,
        "max_length": 20,
        "training_recipe": "tiny",
    }
    with caplog.at_level(logging.WARNING):
        tiny_config("mixed", **extras)
        SonettForCausalLM.from_pretrained(edited_copy(saved, tmp_path, extras))
        AutoModelForCausalLM.from_pretrained(saved / "complete", trust_remote_code=True)
    assert sonett_warnings(caplog) == []


# ---------------------------------------------------------------------------------------------------------------
# Item 9: linear_chunk_size — a short input is one chunk of its own length, not padded to a whole chunk
# ---------------------------------------------------------------------------------------------------------------


def linear_inputs(seq_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """φq, φk `(1, 2, seq, 5)`, values `(1, 2, seq, 4)`, log decays `(1, 2, seq)`."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.rand(1, 2, seq_len, 5, generator=generator)
    k = torch.rand(1, 2, seq_len, 5, generator=generator)
    v = torch.randn(1, 2, seq_len, 4, generator=generator)
    log_decay = -torch.rand(1, 2, seq_len, generator=generator)
    return q, k, v, log_decay


def padded_reference(q, k, v, log_decay, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The former computation: zero keys, values and log decays up to a multiple of `chunk_size`."""
    seq_len = q.shape[2]
    length = -(-seq_len // chunk_size) * chunk_size
    pad = length - seq_len
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    out, state = chunk_linear_attention(q, k, v, torch.nn.functional.pad(log_decay, (0, pad)), chunk_size)
    return out[:, :, :seq_len], state


def test_a_short_linear_attention_input_costs_its_length_not_a_huge_chunk_size():
    """A 6-token forward at linear_chunk_size=1024 used to build (1024 x 1024) score matrices per head."""
    ids = random_ids(1, 6)
    sizes, logits = {}, {}
    for chunk in (6, 64, 1024):
        torch.manual_seed(0)
        layers = ["linear_attention", "full_attention"]
        model = SonettForCausalLM(tiny_config(layer_types=layers, num_hidden_layers=2, linear_chunk_size=chunk))
        with torch.no_grad(), LargestTensor() as largest:
            logits[chunk] = model.eval()(ids).logits
        sizes[chunk] = largest.numel
    assert sizes[1024] == sizes[6], sizes
    assert torch.equal(logits[1024], logits[6])
    torch.testing.assert_close(logits[64], logits[6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len", [1, 6, 300])
def test_a_short_input_with_a_huge_chunk_size_matches_the_padded_computation(seq_len):
    q, k, v, log_decay = linear_inputs(seq_len)
    out, state = chunk_linear_attention(q, k, v, log_decay, 1024)
    ref_out, ref_state = padded_reference(q, k, v, log_decay, 1024)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("seq_len", "chunk"), [(6, 8), (16, 8), (17, 8), (30, 8), (10, 64), (200, 256)])
def test_usual_chunk_sizes_compute_exactly_as_before(seq_len, chunk):
    """Up to FULL_CHUNK_PADDING_MAX a short input is still padded to the whole chunk: bit-identical outputs."""
    q, k, v, log_decay = linear_inputs(seq_len, seed=1)
    out, state = chunk_linear_attention(q, k, v, log_decay, chunk)
    ref_out, ref_state = padded_reference(q, k, v, log_decay, chunk)
    assert torch.equal(out, ref_out) and torch.equal(state, ref_state)

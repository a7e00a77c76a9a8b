"""The bad-input matrix, model folders: missing, truncated, mismatched or pickle-only weights, a missing
shard and a missing config.json, refused by SonettForCausalLM, AutoModelForCausalLM and the remote-code
copy in a fresh process; the opt-outs load and report; pickle weights are never unpickled by default
(docs/design.md, invariant 10)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_bad_input import Unpickled, save_reference_folders
from helpers_model import random_ids, tiny_model
from helpers_remote import NO_PACKAGE_PREAMBLE, fresh_process_env
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sonett import SonettForCausalLM


@pytest.fixture(scope="module")
def model():
    """Sliding and full attention, max_position_embeddings 256."""
    return tiny_model("mixed")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """A complete saved folder of the `model` fixture, one of the same kinds with hidden_size 64, and a sharded one."""
    return save_reference_folders(tmp_path_factory.mktemp("saved"), model)


def break_no_weights(folder: Path, saved: Path) -> None:
    (folder / "model.safetensors").unlink()


def break_missing_tensor(folder: Path, saved: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def break_other_shapes(folder: Path, saved: Path) -> None:
    shutil.copy(saved / "wider" / "model.safetensors", folder / "model.safetensors")


def break_truncated(folder: Path, saved: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def break_missing_shard(folder: Path, saved: Path) -> None:
    (folder / "model.safetensors").unlink()
    for path in (saved / "sharded").iterdir():
        if path.name.startswith("model") and path.name != "model-00002-of-00008.safetensors":
            shutil.copy(path, folder / path.name)


def break_no_config(folder: Path, saved: Path) -> None:
    (folder / "config.json").unlink()


def break_pickle_only(folder: Path, saved: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save(load_file(saved / "complete" / "model.safetensors"), folder / "pytorch_model.bin")


BROKEN_FOLDERS = {
    "no-weights": (
        break_no_weights,
        OSError,
        r"has a config.json but no weights \(no model.safetensors\).*save_pretrained",
    ),
    "missing-tensor": (
        break_missing_tensor,
        ValueError,
        r"lacks 1 weights the model needs: model.layers.1.mlp.up_proj.weight.*allow_missing_weights=True",
    ),
    "other-shapes": (
        break_other_shapes,
        ValueError,
        r"does not fit this config: \d+ tensors have other shapes \(model.embed_tokens.weight \(97, 64\) in the "
        r"checkpoint vs \(97, 32\) in the model.*another hidden_size.*ignore_mismatched_sizes=True",
    ),
    "truncated": (break_truncated, OSError, r"truncated or corrupt.*force_download=True"),
    "missing-shard": (
        break_missing_shard,
        OSError,
        r"lacks 1 of the \d+ weight shards.*model-00002-of-.*save_pretrained",
    ),
    "no-config": (break_no_config, OSError, r"has weights but no config.json.*save the model again"),
    "pickle-only": (break_pickle_only, OSError, r"only pickle weights \(pytorch_model.bin\).*use_safetensors=False"),
}
# Without a config.json no Sonett code runs under the Auto classes: transformers' own error, which names the file.
AUTO_EXPECTED = {
    "no-config": (ValueError, r"Unrecognized model in .*Should have a `model_type` key in its config.json")
}
LOADERS = {
    "SonettForCausalLM": lambda folder, **kw: SonettForCausalLM.from_pretrained(folder, **kw),
    "AutoModelForCausalLM": lambda folder, **kw: AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, **kw
    ),
}


def broken_copy(saved: Path, tmp_path: Path, case: str) -> Path:
    folder = shutil.copytree(saved / "complete", tmp_path / case)
    BROKEN_FOLDERS[case][0](folder, saved)
    return folder


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_broken_model_folders_are_refused(saved, tmp_path, loader, case):
    folder = broken_copy(saved, tmp_path, case)
    _, error, message = BROKEN_FOLDERS[case]
    if loader == "AutoModelForCausalLM":
        error, message = AUTO_EXPECTED.get(case, (error, message))
    with pytest.raises(error, match=message):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_complete_folder_still_loads_identically(saved, model, loader):
    loaded = LOADERS[loader](saved / "complete")
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_opt_outs_load_and_report(saved, tmp_path, loader):
    folder = broken_copy(saved, tmp_path, "missing-tensor")
    loaded, info = LOADERS[loader](folder, allow_missing_weights=True, output_loading_info=True)
    assert info["missing_keys"] == {"model.layers.1.mlp.up_proj.weight"}
    assert loaded.model.layers[1].mlp.up_proj.weight.shape == (64, 32)
    folder = broken_copy(saved, tmp_path, "other-shapes")
    loaded, info = LOADERS[loader](folder, ignore_mismatched_sizes=True, output_loading_info=True)
    assert "model.embed_tokens.weight" in {name for name, _, _ in info["mismatched_keys"]}


# A fresh interpreter where `sonett` cannot be imported: the remote-code copy in each folder refuses the same way.
REMOTE_REFUSALS = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import json

    from transformers import AutoModelForCausalLM

    outcome = {}
    for folder in sys.argv[2:]:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            outcome[folder] = ["loaded", type(model).__module__]
        except Exception as error:  # the test compares type and message
            outcome[folder] = [type(error).__name__, str(error)]
    with open(sys.argv[1], "w") as handle:
        json.dump(outcome, handle)
    """
)


def test_the_remote_code_copy_refuses_broken_folders_too(saved, tmp_path):
    folders = {case: broken_copy(saved, tmp_path, case) for case in BROKEN_FOLDERS}
    script, out = tmp_path / "remote.py", tmp_path / "outcome.json"
    script.write_text(REMOTE_REFUSALS)
    paths = [str(saved / "complete"), *(str(f) for f in folders.values())]
    result = subprocess.run(
        [sys.executable, str(script), str(out), *paths],
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(out.read_text())
    kind, module = outcome[str(saved / "complete")]
    assert kind == "loaded" and module.startswith("transformers_modules"), outcome[str(saved / "complete")]
    for case, folder in folders.items():
        error, message = AUTO_EXPECTED.get(case, BROKEN_FOLDERS[case][1:])
        kind, text = outcome[str(folder)]
        assert kind == error.__name__ and re.search(message, text), (case, kind, text)


def test_pickle_weights_are_never_unpickled_by_default(saved, tmp_path):
    folder = shutil.copytree(saved / "complete", tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": Unpickled(marker)}, folder / "pytorch_model.bin")
    for loader in LOADERS.values():
        with pytest.raises(OSError, match="only pickle weights"):
            loader(folder)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # opted in: torch's safe unpickler
        SonettForCausalLM.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists()

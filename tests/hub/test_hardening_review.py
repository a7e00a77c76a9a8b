"""Issue 15, adversarial review of the merged hardening: bypasses of its guarantees that the first tests missed."""

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers_hub import TOKEN
from helpers_model import tiny_config, tiny_model
from safetensors.torch import load_file, save_file

from sonett import SonettForCausalLM
from sonett.hub.loading import UntrustedCodeError, check_model_folder, check_saved_code
from sonett.hub.upload import FolderNotReadyError, list_upload_files, push_folder_to_hub, relative_local_paths

REPO = "tester/hardened"  # the repo id of the dry-run pushes


@pytest.fixture
def folder(model_folder, tmp_path):
    return Path(shutil.copytree(model_folder, tmp_path / "model"))


def refusal(folder: Path) -> str:
    with pytest.raises(FolderNotReadyError) as error:
        push_folder_to_hub(folder, REPO, dry_run=True)
    return str(error.value)


# ---- item 3: a safetensors header is text too ------------------------------------------------------------------------


def test_a_token_or_local_path_in_safetensors_metadata_is_refused(folder):
    weights = folder / "model.safetensors"
    metadata = {"format": "pt", "note": f"pushed with {TOKEN}", "source": "/home/alice/private/run"}
    save_file(load_file(weights), weights, metadata=metadata)
    message = refusal(folder)
    assert "model.safetensors line 1: a Hugging Face token (hf_" in message
    assert TOKEN not in message  # masked
    assert "model.safetensors line 1: an absolute local path (/home/alice/private/run)" in message


def test_a_plain_safetensors_header_passes(folder):
    assert "model.safetensors" in {f.path_in_repo for f in push_folder_to_hub(folder, REPO, dry_run=True).files}


# ---- item 3: a file URL names a local path ---------------------------------------------------------------------------


def test_a_file_url_in_the_card_is_made_relative_and_elsewhere_refused(folder):
    assert relative_local_paths("data at file:///home/alice/corpus.txt", folder) == "data at file://corpus.txt"
    (folder / "chat_template.jinja").write_text("{# from file:///home/alice/templates/x.jinja #}")
    assert "chat_template.jinja line 1: an absolute local path (/home/alice/templates/x.jinja)" in refusal(folder)


# ---- item 1: transformers also runs custom_generate/generate.py ------------------------------------------------------


def test_planted_custom_generate_code_is_refused_for_loading_and_saving(tmp_path):
    """transformers replaces `generate` with `custom_generate/generate.py` of a folder loaded with
    trust_remote_code=True; the tooling must neither accept such a folder nor save a model into one."""
    model = tiny_model("full")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    (folder / "custom_generate").mkdir()
    (folder / "custom_generate" / "generate.py").write_text("def generate(model, *args, **kwargs):\n    return None\n")
    with pytest.raises(UntrustedCodeError, match=r"custom_generate/generate\.py is not one of the sonett package"):
        check_model_folder(folder)
    with pytest.raises(UntrustedCodeError, match=r"Not saving into .*custom_generate/generate\.py"):
        check_saved_code(folder, model)


# ---- items 3 and 8: a weight index names files of its own folder only ------------------------------------------------


def _index_pointing_outside(folder: Path, tmp_path: Path) -> None:
    """Move the weights out of `folder` and write an index whose shard names lead to them (`../elsewhere/...`)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(folder / "model.safetensors", elsewhere / "model.safetensors")
    tensors = load_file(elsewhere / "model.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "../elsewhere/model.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_an_index_naming_shards_outside_the_folder_is_refused_for_upload_and_load(folder, tmp_path):
    _index_pointing_outside(folder, tmp_path)
    message = refusal(folder)
    assert "names the shard ../elsewhere/model.safetensors, which is not a file name in the folder" in message
    with pytest.raises(OSError, match=r"names weight shards outside the folder \(\.\./elsewhere/model\.safetensors\)"):
        SonettForCausalLM.from_pretrained(folder)


# ---- item 3: a broad --allow_extra_files pattern never admits secrets ------------------------------------------------

SECRETS_OUTSIDE_THE_FIRST_LIST = [
    ".bash_history",
    ".python_history",
    "secrets.toml",
    ".streamlit/secrets.toml",
    "api_key.txt",
    "openai_apikey",
    "password.txt",
    ".vault-token",
    "terraform.tfstate",
]


@pytest.mark.parametrize("name", SECRETS_OUTSIDE_THE_FIRST_LIST)
def test_allow_extra_files_star_still_refuses_secret_names(folder, name):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("not for publication\n")
    assert name not in {f.path_in_repo for f in list_upload_files(folder, allow_extra_files=("*",))}
    with pytest.raises(FolderNotReadyError, match=rf"Files that hold credentials are in the folder: {name}"):
        push_folder_to_hub(folder, REPO, dry_run=True, allow_extra_files=("*",))


# ---- item 9: the remaining numeric fields fail in the config, not deep inside torch ---------------------------------


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("attention_dropout", 2.0, "attention_dropout must be a probability in [0, 1)"),
        ("attention_dropout", float("nan"), "attention_dropout must be a probability in [0, 1)"),
        ("attention_dropout", -0.5, "attention_dropout must be a probability in [0, 1)"),
        ("initializer_range", float("nan"), "initializer_range must be a finite standard deviation >= 0"),
        ("initializer_range", -1.0, "initializer_range must be a finite standard deviation >= 0"),
    ],
)
def test_dropout_and_initializer_range_are_checked_in_the_config(field, value, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        tiny_config("full", **{field: value})


# ---- item 6: another kind of file is refused from its header, before its data is read -----------------------------


def test_a_large_file_that_is_no_memory_file_is_refused_before_its_data_is_read(tmp_path):
    import struct
    import tracemalloc

    from sonett import SonettCache
    from sonett.model.cache_sonett import MemoryFileError

    size = 200 * 1024 * 1024  # a sparse model.safetensors given by mistake
    header = json.dumps(
        {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}
    ).encode()
    path = tmp_path / "model.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + size)
    tracemalloc.start()
    try:
        with pytest.raises(MemoryFileError, match="is not a Sonett memory file"):
            SonettCache.load(path, tiny_config())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024, f"read {peak:,} bytes to refuse it"

"""Invariant 5: save -> load gives identical logits and greedy generations, in this process and in a fresh
process where the `sonett` package cannot be imported (remote code, `trust_remote_code=True`)."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_model import PAD, random_ids, tiny_model
from helpers_remote import EVERY_KIND, HOURGLASS_KINDS, NO_PACKAGE_PREAMBLE, fresh_process_env
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from sonett import SonettConfig, SonettForCausalLM, SonettModel

REMOTE_FILES = (
    "configuration_sonett.py",
    "modeling_sonett.py",
    "cache_sonett.py",
    "attention_sonett.py",
    "layers_sonett.py",
    "linear_attention_sonett.py",
    "memory_attention_sonett.py",
    "hierarchy_sonett.py",
    "peft_sonett.py",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NEW_TOKENS = 8
ABSOLUTE_IMPORT = re.compile(r"^\s*(from\s+sonett\b|import\s+sonett\b)", re.MULTILINE)

# Runs in a fresh interpreter: argv = model folder, output file, optional folder to re-save into.
REMOTE_SCRIPT = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder, out_path = sys.argv[1], sys.argv[2]
    resave = sys.argv[3] if len(sys.argv) > 3 else None

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    for obj in (config, model, base):
        module = type(obj).__module__
        assert module.startswith("transformers_modules"), module
    assert type(model).__name__ == "SonettForCausalLM"
    assert type(base).__name__ == "SonettModel"
    assert model.lm_head.weight is model.model.embed_tokens.weight

    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(ids).logits
        hidden = base(ids).last_hidden_state
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
    save_file(
        {"logits": logits.contiguous(), "hidden": hidden.contiguous(), "generated": generated.contiguous()},
        out_path,
    )
    if resave:
        model.save_pretrained(resave)
    """
)


def run_fresh(tmp_path, folder, ids, name, resave=None):
    script = REMOTE_SCRIPT.replace("IDS", repr(ids.tolist()))
    script = script.replace("NEW_TOKENS", str(NEW_TOKENS)).replace("PAD", str(PAD))
    script_path = tmp_path / f"{name}.py"
    script_path.write_text(script)
    out_path = tmp_path / f"{name}.safetensors"
    args = [sys.executable, str(script_path), str(folder), str(out_path)]
    if resave is not None:
        args.append(str(resave))
    result = subprocess.run(
        args, cwd=tmp_path, env=fresh_process_env(tmp_path), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return load_file(out_path)


@pytest.fixture(scope="module", params=["mixed", "every-kind", "hourglass"])
def saved(request, tmp_path_factory):
    """A mixed-layer model (softmax kinds only, every kind, or every kind with an hourglass), its folder and its
    own outputs for fixed ids (11 tokens: not a multiple of the shorten factor 3)."""
    folder = tmp_path_factory.mktemp("sonett_model")
    if request.param == "mixed":
        model = tiny_model("mixed", seed=3)
    elif request.param == "hourglass":
        hierarchy = {"shorten_factor": 3, "start_layer": 1, "end_layer": 4}
        model = tiny_model("full", seed=3, layer_types=HOURGLASS_KINDS, num_hidden_layers=6, hierarchy=hierarchy)
        with torch.no_grad():  # a new hourglass adds nothing (zero upsampling); make the shortened path count
            model.model.hourglass.upsample_proj.weight.normal_(0.0, 0.2)
    else:
        model = tiny_model("full", seed=3, layer_types=EVERY_KIND, num_hidden_layers=len(EVERY_KIND))
    model.save_pretrained(folder)
    ids = random_ids(2, 11, seed=50)
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.model(ids).last_hidden_state
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
    return {
        "model": model,
        "folder": folder,
        "ids": ids,
        "logits": logits,
        "hidden": hidden,
        "generated": generated,
    }


def check_folder(folder):
    names = {p.name for p in folder.iterdir()}
    for name in REMOTE_FILES:
        assert name in names, f"{name} missing from {sorted(names)}"
        assert not ABSOLUTE_IMPORT.search((folder / name).read_text()), f"{name} imports the package"
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], sorted(names)
    assert not [p for p in folder.iterdir() if p.is_dir()], "remote code must be one flat folder"
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_sonett.SonettConfig"
    assert auto_map["AutoModel"] == "modeling_sonett.SonettModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_sonett.SonettForCausalLM"


def test_saved_folder_has_remote_code_weights_and_auto_map(saved):
    check_folder(saved["folder"])
    weights = load_file(saved["folder"] / "model.safetensors")
    state = saved["model"].state_dict()
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name
    assert "model.embed_tokens.weight" in weights


def test_same_process_load_gives_identical_outputs(saved):
    config = AutoConfig.from_pretrained(saved["folder"])
    assert isinstance(config, SonettConfig)
    assert config.layer_types == saved["model"].config.layer_types
    model = AutoModelForCausalLM.from_pretrained(saved["folder"]).eval()
    assert type(model) is SonettForCausalLM
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = saved["ids"]
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
    assert torch.equal(logits, saved["logits"])
    assert torch.equal(generated, saved["generated"])

    base = AutoModel.from_pretrained(saved["folder"]).eval()
    assert type(base) is SonettModel
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, saved["hidden"])


def test_untied_model_round_trips(tmp_path):
    model = tiny_model("sliding", seed=4, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = SonettForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_fresh_process_without_package_loads_remote_code(saved, tmp_path):
    resaved = tmp_path / "resaved"
    remote = run_fresh(tmp_path, saved["folder"], saved["ids"], "first", resave=resaved)
    assert (remote["logits"] - saved["logits"]).abs().max().item() <= 1e-6
    assert (remote["hidden"] - saved["hidden"]).abs().max().item() <= 1e-6
    assert torch.equal(remote["generated"], saved["generated"])
    module_dirs = list((tmp_path / "hf" / "modules" / "transformers_modules").iterdir())
    assert module_dirs, "remote code must be loaded from the HF_HOME module cache"

    # A remote-loaded model, saved again, is still a complete remote-code folder.
    check_folder(resaved)
    again = run_fresh(tmp_path, resaved, saved["ids"], "second")
    assert (again["logits"] - saved["logits"]).abs().max().item() <= 1e-6
    assert torch.equal(again["generated"], saved["generated"])

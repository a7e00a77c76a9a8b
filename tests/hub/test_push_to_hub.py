"""scripts/push_to_hub.py end to end: push a tiny Sonett folder with the real huggingface_hub client over HTTP to the
Hub-compatible test server (tests/hub_server.py), then load it by repo id in a fresh process where the package is not
importable, and compare logits and greedy generations with the in-process model. Also: --revision branches,
--private, --dry-run (no request at all), refused folders, and that the token never reaches any output.

An opt-in test pushes to the real Hub when SONETT_REAL_HUB_TOKEN is set."""

import json
import os
import re
import shutil
import textwrap
import uuid
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from helpers_hub import CORPUS, PUSH_SCRIPT, TOKEN, online_env, run_pushes, run_python
from helpers_model import tiny_model
from helpers_remote import EVERY_KIND, NO_PACKAGE_PREAMBLE
from hub_server import GITATTRIBUTES, HubServer
from safetensors.torch import load_file

import sonett
from sonett import SonettConfig
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.hub.model_card import TEMPLATE_PATH, render_model_card
from sonett.hub.saving import write_model_folder
from sonett.hub.upload import (
    FolderNotReadyError,
    NoHubTokenError,
    card_for_repo,
    format_size,
    list_upload_files,
    push_folder_to_hub,
    validate_model_folder,
)

ROOT = Path(__file__).resolve().parents[2]
REPO = "tester/sonett-push"
PRIVATE_REPO = "tester/sonett-private"
BRANCH = "experiment"
PROMPT = "def add(a, b):\n    return a + b\n"
NEW_TOKENS = 8
# Fresh interpreter, package not importable, empty HF_HOME: load each (repo, revision) by id, write the outputs.
LOAD_SCRIPT = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import json

    import torch
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, out_path = json.loads(sys.argv[1]), sys.argv[2]
    tensors, texts = {}, {}
    for name, (repo_id, revision) in spec["loads"].items():
        model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = tokenizer(spec["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids, max_new_tokens=spec["new_tokens"], do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        tensors.update({f"{name}.ids": ids, f"{name}.logits": logits, f"{name}.generated": generated})
        texts[name] = tokenizer.decode(generated[0])
    try:
        HfApi().model_info(spec["private_repo"], token=False)
        texts["anonymous_private"] = "visible"
    except RepositoryNotFoundError:
        texts["anonymous_private"] = "not found"
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_path)
    with open(out_path + ".json", "w") as f:
        json.dump(texts, f)
    """
)


def run_load(spec: dict, env: dict, cwd: Path) -> tuple[dict, dict, str]:
    script = cwd / "load_from_hub.py"
    script.write_text(LOAD_SCRIPT)
    out_path = cwd / "loaded.safetensors"
    result = run_python([str(script), json.dumps(spec), str(out_path)], env, cwd)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return load_file(out_path), json.loads(Path(f"{out_path}.json").read_text()), output


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=2)


def write_folder(path: Path, tokenizer, seed: int, validation_loss: float, repo_id: str | None) -> dict:
    """A tiny every-kind Sonett written like training writes it, plus its own outputs on PROMPT."""
    model = tiny_model(
        "full", seed=seed, layer_types=EVERY_KIND, num_hidden_layers=len(EVERY_KIND), vocab_size=len(tokenizer)
    )
    results = {"training_data": "a unit-test corpus", "steps": 0, "validation_loss": validation_loss}
    write_model_folder(model, tokenizer, path, results, repo_id=repo_id)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return {
        "folder": path,
        "ids": ids,
        "logits": logits,
        "generated": generated,
        "text": tokenizer.decode(generated[0]),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("push_models")
    return {
        # v1's card names its folder, as training's does; the push points it at the repository.
        "v1": write_folder(root / "sonett-v1", tokenizer, seed=3, validation_loss=1.5, repo_id=None),
        "v2": write_folder(root / "sonett-v2", tokenizer, seed=4, validation_loss=2.5, repo_id=REPO),
    }


@pytest.fixture(scope="module")
def pushed(models, tmp_path_factory):
    """Four pushes through the script, then one fresh-process load of main, the branch and the private repo."""
    work = tmp_path_factory.mktemp("push_run")
    v1, v2 = str(models["v1"]["folder"]), str(models["v2"]["folder"])
    with HubServer() as hub:
        env = online_env(work / "push_home", hub.url, TOKEN)
        codes, push_output = run_pushes(
            [
                [v1, REPO, "--verbose"],
                [v2, REPO, "--revision", BRANCH, "--commit-message", "second model", "--verbose"],
                [v1, REPO, "--private"],  # the repository exists and is public: refused
                [v1, PRIVATE_REPO.split("/")[1], "--private", "--verbose"],  # no namespace: the token's user
            ],
            env,
            work,
        )
        spec = {
            "loads": {"main": [REPO, None], "branch": [REPO, BRANCH], "private": [PRIVATE_REPO, None]},
            "private_repo": PRIVATE_REPO,
            "prompt": PROMPT,
            "new_tokens": NEW_TOKENS,
        }
        load_env = online_env(work / "load_home", hub.url, TOKEN)
        tensors, texts, load_output = run_load(spec, load_env, work)
        yield {
            "codes": codes,
            "push_output": push_output,
            "load_output": load_output,
            "tensors": tensors,
            "texts": texts,
            "repos": hub.state.repos,
            "requests": list(hub.state.requests),
            "unrouted": list(hub.state.unrouted),
            "load_home": Path(load_env["HF_HOME"]),
        }


def local_files(folder: Path) -> dict[str, bytes]:
    return {f.path_in_repo: f.local_path.read_bytes() for f in list_upload_files(folder)}


def test_pushes_succeed_and_the_server_holds_the_folder_byte_for_byte(pushed, models):
    assert pushed["codes"] == [0, 0, 1, 0], pushed["push_output"][-4000:]
    main, local = pushed["repos"][REPO].files("main"), local_files(models["v1"]["folder"])
    card = local["README.md"].decode()
    assert 'from_pretrained("sonett-v1", trust_remote_code=True)' in card
    local["README.md"] = card.replace('"sonett-v1"', f'"{REPO}"').encode()
    assert main == {**local, ".gitattributes": GITATTRIBUTES}
    private_card = pushed["repos"][PRIVATE_REPO].files("main")["README.md"].decode()
    assert f'AutoTokenizer.from_pretrained("{PRIVATE_REPO}", trust_remote_code=True)' in private_card
    for name in (
        "model.safetensors",
        "config.json",
        "modeling_sonett.py",
        "tokenizer.json",
        "README.md",
        "training_results.json",
    ):
        assert name in main, sorted(main)
    size = format_size(sum(len(data) for data in local.values()))
    assert f"uploaded {len(local)} files ({size}) to {REPO}@main" in pushed["push_output"]
    assert pushed["unrouted"] == [], "the clients used a route the test Hub lacks"


def test_fresh_process_loads_by_repo_id_with_identical_logits_and_generation(pushed, models):
    tensors, v1 = pushed["tensors"], models["v1"]
    assert torch.equal(tensors["main.ids"], v1["ids"])
    assert (tensors["main.logits"] - v1["logits"]).abs().max().item() <= 1e-6
    assert torch.equal(tensors["main.generated"], v1["generated"])
    assert pushed["texts"]["main"] == v1["text"]
    assert list((pushed["load_home"] / "modules" / "transformers_modules").iterdir()), "remote code was not cached"
    assert (pushed["load_home"] / "hub" / "models--tester--sonett-push").is_dir()


def test_revision_pushes_to_a_branch_that_main_does_not_have(pushed, models):
    repo = pushed["repos"][REPO]
    assert set(repo.branches) == {"main", BRANCH}
    assert repo.messages[repo.branches[BRANCH]] == "second model"
    assert repo.messages[repo.branches["main"]] == "Upload sonett-v1"
    branch, main = repo.files(BRANCH), repo.files("main")
    assert branch["model.safetensors"] == (models["v2"]["folder"] / "model.safetensors").read_bytes()
    assert main["model.safetensors"] != branch["model.safetensors"]
    assert "2.5000" in branch["README.md"].decode() and "2.5000" not in main["README.md"].decode()
    tensors, v2 = pushed["tensors"], models["v2"]
    assert (tensors["branch.logits"] - v2["logits"]).abs().max().item() <= 1e-6
    assert torch.equal(tensors["branch.generated"], v2["generated"])
    assert (tensors["main.logits"] - v2["logits"]).abs().max().item() > 1e-2


def test_private_is_recorded_and_a_public_repo_is_not_silently_reused(pushed, models):
    assert pushed["repos"][PRIVATE_REPO].private is True
    assert pushed["repos"][REPO].private is False
    assert "already exists and is public" in pushed["push_output"]
    assert pushed["texts"]["anonymous_private"] == "not found"
    assert torch.equal(pushed["tensors"]["private.generated"], models["v1"]["generated"])


def test_token_never_appears_in_any_output(pushed):
    assert "Authorization" in pushed["push_output"] or "curl" in pushed["push_output"]  # HF_DEBUG logged requests
    for name in ("push_output", "load_output"):
        assert TOKEN not in pushed[name], name
        assert TOKEN[3:] not in pushed[name], name


def test_training_checkpoints_and_logs_stay_local(models, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(models["v1"]["folder"], folder)
    (folder / "checkpoints" / "step_10.partial").mkdir(parents=True)
    (folder / "checkpoints" / "step_10.partial" / "optimizer.bin").write_bytes(b"state")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out").write_bytes(b"log")
    uploaded = {f.path_in_repo for f in validate_model_folder(folder)}  # the unfinished checkpoint is not refused
    assert uploaded == {f.path_in_repo for f in list_upload_files(models["v1"]["folder"])}


def test_dry_run_lists_the_files_and_sends_nothing(models, tmp_path):
    folder = models["v1"]["folder"]
    with HubServer() as hub:
        env = online_env(tmp_path / "home", hub.url, TOKEN)
        result = run_python(
            [str(PUSH_SCRIPT), str(folder), REPO, "--dry-run", "--private", "--revision", BRANCH], env, tmp_path
        )
        assert hub.state.requests == []
    assert result.returncode == 0, result.stderr[-4000:]
    files = list_upload_files(folder)
    assert f"would upload {len(files)} files" in result.stdout and f"{REPO}@{BRANCH}" in result.stdout
    for f in files:
        size, note = f.size, ""
        if f.path_in_repo == "README.md":  # listed as uploaded: the usage example loads the repository
            size, note = len(card_for_repo(f.local_path.read_text(), REPO).encode()), f"  (usage example loads {REPO})"
            assert size != f.size
        line = f"  {f.path_in_repo:<40} {format_size(size):>10}{note}\n"
        assert line in result.stdout, (line, result.stdout)
    assert TOKEN not in result.stdout + result.stderr


def test_the_script_refuses_a_broken_folder_with_its_fix(models, tmp_path):
    folder = shutil.copytree(models["v1"]["folder"], tmp_path / "broken")
    (folder / "config.json").unlink()
    result = run_python(
        [str(PUSH_SCRIPT), str(folder), REPO], online_env(tmp_path / "home", "http://127.0.0.1:9", TOKEN), tmp_path
    )
    assert result.returncode == 1
    assert "error: Cannot upload" in result.stderr and "config.json is missing" in result.stderr
    assert "Traceback" not in result.stderr


# ---- only the folder's own files, and never a credential, leave the machine ----------------------------------------
# (The allow-list of tests/hub/test_hardening_upload.py refuses these folders; they were skipped with a warning before.)

SECRETS = {
    ".env": f"HF_TOKEN={TOKEN}\n",
    ".env.local": f"HF_TOKEN={TOKEN}\n",
    "token": TOKEN,
    "hub.token": TOKEN,
    ".huggingface/token": TOKEN,
    ".git-credentials": f"https://user:{TOKEN}@huggingface.co\n",
    ".netrc": f"machine huggingface.co login user password {TOKEN}\n",
    "id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "id_ed25519.pub": "ssh-ed25519 AAAA\n",
    "server.pem": "-----BEGIN CERTIFICATE-----\n",
    "signing.key": "-----BEGIN PRIVATE KEY-----\n",
    "nested/.env": f"HF_TOKEN={TOKEN}\n",
}


def folder_with_secrets(models, path: Path) -> Path:
    """A copy of v1 with credential files (each holding or standing for TOKEN) and a link to one of them."""
    folder = shutil.copytree(models["v1"]["folder"], path)
    for name, content in SECRETS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    (folder / "settings.txt").symlink_to(folder / ".env")  # an innocent name for a secret inside the folder
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").symlink_to(folder / "token")  # an allowed name for a secret
    return folder


def folder_with_outside_links(models, path: Path, outside: Path) -> Path:
    folder = shutil.copytree(models["v1"]["folder"], path)
    outside.mkdir()
    (outside / "notes.txt").write_text(f"private notes {TOKEN}")
    (folder / "notes.txt").symlink_to(outside / "notes.txt")  # a file outside the folder
    (folder / "shared").symlink_to(outside, target_is_directory=True)  # a folder outside the folder
    (folder / "escape.txt").symlink_to(Path("..") / outside.name / "notes.txt")  # a relative `..` link
    return folder


def test_secrets_stay_out_of_the_listing_and_refuse_the_push_naming_each(models, tmp_path):
    folder = folder_with_secrets(models, tmp_path / "folder")
    assert {f.path_in_repo for f in list_upload_files(folder)} == {
        f.path_in_repo for f in list_upload_files(models["v1"]["folder"])
    } - {"generation_config.json"}
    with pytest.raises(FolderNotReadyError) as error:
        validate_model_folder(folder)
    message = str(error.value)
    for name in SECRETS:
        assert name in message, name
    assert "generation_config.json -> token" in message and "settings.txt" in message
    assert "never uploaded" in message and "Move them out of the folder" in message
    assert TOKEN not in message


def test_links_that_leave_the_folder_are_refused_with_the_fix(models, tmp_path):
    folder = folder_with_outside_links(models, tmp_path / "folder", tmp_path / "outside")
    with pytest.raises(FolderNotReadyError) as error:
        push_folder_to_hub(folder, REPO)  # refused before any network use (this process is offline)
    message = str(error.value)
    assert "Symbolic links lead outside the folder" in message and "Copy the file into the folder" in message
    for name in ("notes.txt ->", "shared ->", "escape.txt ->"):
        assert name in message, message
    assert message.count("\n- ") == 1, message
    assert {f.path_in_repo for f in list_upload_files(folder)} == {
        f.path_in_repo for f in list_upload_files(models["v1"]["folder"])
    }
    assert TOKEN not in message


def test_a_push_sends_no_secret_and_no_outside_file_and_prints_no_token(models, tmp_path):
    secrets = folder_with_secrets(models, tmp_path / "secrets")
    linked = folder_with_outside_links(models, tmp_path / "linked", tmp_path / "outside")
    with HubServer() as hub:
        env = online_env(tmp_path / "home", hub.url, TOKEN)
        codes, output = run_pushes([[str(secrets), "tester/secrets"], [str(linked), "tester/linked"]], env, tmp_path)
        repos = hub.state.repos
    assert codes == [1, 1], output[-4000:]
    assert "tester/secrets" not in repos and "tester/linked" not in repos  # refused before the repository was made
    assert "Files that hold credentials are in the folder" in output
    assert "Symbolic links lead outside the folder" in output
    assert TOKEN not in output and TOKEN[3:] not in output


def break_missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def break_missing_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def break_partial_file(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model.safetensors.partial")
    shutil.copy(folder / "model.safetensors.partial", folder / "model.safetensors")


def break_truncated_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def break_missing_auto_map_module(folder: Path) -> None:
    (folder / "modeling_sonett.py").unlink()


def break_missing_imported_module(folder: Path) -> None:
    (folder / "cache_sonett.py").unlink()


def break_no_auto_map(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))


def break_card_naming_a_local_base(folder: Path) -> None:
    # (a missing card is no longer a problem: the push generates one, tests/hub/test_push_anything.py)
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("---\n", f"---\nbase_model: {folder.parent}/base\n", 1))


def break_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    ("breakage", "problem", "fix"),
    [
        (break_missing_config, "config.json is missing", "save_pretrained"),
        (break_missing_weights, "No weights: neither model.safetensors", "save_pretrained"),
        (break_partial_file, "half-written: model.safetensors.partial", "wait for the writer"),
        (break_truncated_weights, "model.safetensors cannot be opened as safetensors", "save the model again"),
        (break_missing_auto_map_module, "modeling_sonett.py is missing but config.json auto_map", "import sonett"),
        (break_missing_imported_module, "cache_sonett.py is missing but", "import sonett"),
        (break_no_auto_map, "config.json has no auto_map", "import sonett"),
        (break_card_naming_a_local_base, "metadata names its base model by a local path", "--base_model OWNER/NAME"),
        (break_missing_shard, "names the shard model-00002-of-00002.safetensors, which is missing", "save the model"),
    ],
)
def test_refused_folders_name_the_problem_and_the_fix(models, tmp_path, breakage, problem, fix):
    folder = shutil.copytree(models["v1"]["folder"], tmp_path / "folder")
    validate_model_folder(folder)  # the intact copy passes
    breakage(folder)
    with pytest.raises(FolderNotReadyError) as error:
        push_folder_to_hub(folder, REPO)  # refused before any network use (this process is offline)
    message = str(error.value)
    assert problem in message and fix in message, message
    assert message.count("\n- ") == 1, message  # exactly this one problem is reported


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(FolderNotReadyError, match="is not a folder"):
        validate_model_folder(tmp_path / "nowhere")


def test_push_without_any_token_is_refused_before_the_network(models, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    with pytest.raises(NoHubTokenError, match="set the HF_TOKEN environment variable or run `hf auth login`"):
        push_folder_to_hub(models["v1"]["folder"], REPO)


@pytest.mark.skipif(
    not os.environ.get("SONETT_REAL_HUB_TOKEN"),
    reason="opt-in: set SONETT_REAL_HUB_TOKEN to a write token to push a tiny private model to huggingface.co",
)
def test_real_hub_round_trip(models, tmp_path):
    token = os.environ["SONETT_REAL_HUB_TOKEN"]
    name = f"sonett-push-test-{uuid.uuid4().hex[:8]}"
    codes, output = run_pushes(
        [[str(models["v1"]["folder"]), name, "--private"]], online_env(tmp_path / "p", None, token), tmp_path
    )
    assert codes == [0], output[-4000:]
    repo_id = re.search(rf"to (\S+/{name})@main", output).group(1)
    try:
        spec = {"loads": {"main": [repo_id, None]}, "private_repo": repo_id, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
        tensors, texts, load_output = run_load(spec, online_env(tmp_path / "l", None, token), tmp_path)
        assert (tensors["main.logits"] - models["v1"]["logits"]).abs().max().item() <= 1e-6
        assert torch.equal(tensors["main.generated"], models["v1"]["generated"])
        assert texts["anonymous_private"] == "not found"
        assert token not in output + load_output
    finally:
        delete = "import sys; from huggingface_hub import HfApi; HfApi().delete_repo(sys.argv[1], missing_ok=True)"
        run_python(["-c", delete, repo_id], online_env(tmp_path / "d", None, token), tmp_path)


# ---- the model card that every pushed folder carries ---------------------------------------------------------------


def card_front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_text_card_covers_model_training_metrics_use_and_loading():
    config = tiny_model("full", layer_types=EVERY_KIND, num_hidden_layers=len(EVERY_KIND)).config
    results = {
        "training_data": "Python standard library source",
        "steps": 800,
        "tokens_seen": 3276800,
        "learning_rate": 0.003,
        "validation_loss": 3.43712,
        "validation_perplexity": 31.0967,
        "validation_tokens": 33915,
        "loss_history": [{"step": 1, "loss": 8.3}],
        "arguments": {"seed": 0},
    }
    card = render_model_card(config, 1660400, results, "sonett-tiny", repo_id="someone/sonett-tiny")
    meta = card_front_matter(card)
    assert meta["pipeline_tag"] == "text-generation" and "custom_code" in meta["tags"]
    assert "| parameters | 1,660,400 |" in card
    assert "| layers | 4 (1 linear_attention + 1 sliding_attention + 1 memory_attention + 1 full_attention) |" in card
    assert "- Data: Python standard library source" in card
    assert "- Steps: 800, tokens seen: 3,276,800, batch: n/a tokens per optimiser step" in card
    assert "peak learning rate 0.0030" in card
    assert "| validation loss | 3.4371 |\n| validation perplexity | 31.0967 |\n| validation tokens | 33,915 |" in card
    assert "loss history" not in card and "arguments" not in card and "| steps |" not in card
    assert "None: every layer runs on the full-length sequence." in card
    assert "None: this is a text-only model." in card
    assert 'AutoModelForCausalLM.from_pretrained("someone/sonett-tiny", trust_remote_code=True)' in card
    assert "## Intended use\n\nResearch on hybrid attention" in card and "## Limitations" in card
    assert "{{" not in card and "{%" not in card


def test_card_lists_only_the_layer_kinds_present_and_reads_intended_use_from_results():
    config = tiny_model("sliding").config
    card = render_model_card(config, 10, {"intended_use": "Only for tests."}, "s")
    assert "- `sliding_attention`: softmax attention over the last 4 tokens." in card
    assert "`linear_attention`:" not in card and "`full_attention`:" not in card
    assert "## Intended use\n\nOnly for tests.\n" in card
    assert "No measured results were recorded with this model." in card
    assert "| context used in training | n/a |" in card


def test_vision_card_describes_the_encoder_and_loads_with_the_multimodal_classes():
    vision = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
    config = SonettConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        vision_config=vision,
        cross_attention_layers=[0, 2],
        image_token_id=3,
    )
    results = {"digits_accuracy": 0.9554, "shapes_accuracy": 0.765, "gates": {"1": [0.3]}}
    card = render_model_card(config, 2708214, results, "sonett-vision", repo_id="someone/v")
    assert card_front_matter(card)["pipeline_tag"] == "image-text-to-text"
    assert "| image size / patch size | 16 / 4 pixels (patchify stem) |" in card
    assert "| encoder width / layers / heads | 32 / 2 / 4 |" in card
    assert "| visual tokens per image | 16 |" in card
    assert "| gated cross-attention at decoder layers | 0, 2 |" in card
    assert "| digits accuracy | 0.9554 |\n| shapes accuracy | 0.7650 |" in card and "gates" not in card
    assert 'AutoModelForImageTextToText.from_pretrained("someone/v", trust_remote_code=True)' in card
    assert 'AutoProcessor.from_pretrained("someone/v", trust_remote_code=True)' in card


def test_hourglass_card_has_a_hierarchy_section():
    hierarchy = {"shorten_factor": 2, "start_layer": 1, "end_layer": 3}
    config = tiny_model("full", layer_types=EVERY_KIND, num_hidden_layers=4, hierarchy=hierarchy).config
    card = render_model_card(config, 10, {}, "hg")
    assert "hourglass" in card_front_matter(card)["tags"]
    expected = "layers 1-2 run on the sequence shortened 2x (hourglass, linear pooling, repeat upsampling)"
    assert f"Hourglass shortening: {expected}." in card and f"; {expected})" in card


def test_the_template_ships_inside_the_package_and_can_be_replaced(tmp_path):
    assert TEMPLATE_PATH.parent == Path(sonett.__file__).parent / "hub" and TEMPLATE_PATH.is_file()
    config = tiny_model("sliding").config
    custom = tmp_path / "card.md"
    custom.write_text("# {{ model_name }}: {{ parameters }} parameters, {{ layer_mix }}\n")
    assert render_model_card(config, 1234, {}, "mine", template_path=custom) == (
        "# mine: 1,234 parameters, 2 sliding_attention\n"
    )
    custom.write_text("{{ no_such_value }}")
    with pytest.raises(ValueError, match=r"card.md failed to render: 'no_such_value' is undefined\. Fix the template"):
        render_model_card(config, 1, {}, "mine", template_path=custom)
    with pytest.raises(FileNotFoundError, match="Model card template not found"):
        render_model_card(config, 1, {}, "mine", template_path=tmp_path / "missing.md")

"""Issue 15, item 3: what an upload may contain. A model folder uploads only the files a model folder holds (weights,
configs, tokenizer, Sonett's own code unchanged, card, results, plots); credential files, unknown files, planted or
edited code, hard links and links to hidden files are refused by name; every uploaded text file is scanned for tokens;
absolute local paths never reach training_results.json, the card or the Hub."""

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers_hub import CORPUS, TOKEN, online_env, run_pushes
from helpers_model import tiny_model
from hub_server import GITATTRIBUTES, HubServer

from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.hub.saving import add_quality_results, write_model_folder
from sonett.hub.upload import (
    SCAN_CHUNK_BYTES,
    FolderNotReadyError,
    list_upload_files,
    push_folder_to_hub,
    relative_local_paths,
    validate_model_folder,
)

REPO = "tester/hardened"

# The credential files the issue found uploaded; each must stay out of the listing and make the push refuse.
CREDENTIAL_FILES = [
    ".aws/credentials",
    ".docker/config.json",
    ".kaggle/kaggle.json",
    ".config/gcloud/application_default_credentials.json",
    "application_default_credentials.json",
    ".npmrc",
    ".pgpass",
    "_netrc",
    ".envrc",
    ".env/secrets",  # a folder named .env
    "credentials.json",
    "service_account.json",
    "hf_token.txt",
    "token.json",
    "client.p12",
    "client.pfx",
]

# Fake secrets that have the shape of real ones (none is a live credential).
FAKE_SECRETS = {
    "a Hugging Face token": TOKEN,
    "an AWS access key id": "AKIAIOSFODNN7EXAMPLE",
    "a GitHub token": "ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8",
    "an OpenAI-style secret key": "sk-proj-" + "Zx9Yw8Vu7T" * 4,
    "a private key": "-----BEGIN RSA PRIVATE KEY-----",
}


@pytest.fixture
def folder(model_folder, tmp_path):
    return Path(shutil.copytree(model_folder, tmp_path / "model"))


def listing(folder: Path, **kwargs) -> set[str]:
    return {f.path_in_repo for f in list_upload_files(folder, **kwargs)}


def refusal(folder: Path, **kwargs) -> str:
    with pytest.raises(FolderNotReadyError) as error:
        push_folder_to_hub(folder, REPO, dry_run=True, **kwargs)
    return str(error.value)


def problems(message: str) -> int:
    return message.count("\n- ")


# ---- the allow-list: only what a model folder holds ----------------------------------------------------------------


@pytest.mark.parametrize("name", CREDENTIAL_FILES)
def test_a_credential_file_stays_out_of_the_listing_and_refuses_the_push(model_folder, folder, name):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(f"secret {TOKEN}\n")
    assert listing(folder) == listing(model_folder)
    for allow in ((), ("*",)):  # no pattern admits a credential file
        message = refusal(folder, allow_extra_files=allow)
        assert name in message and "credentials" in message and "Move them out of the folder" in message, message
        assert problems(message) == 1, message
        assert TOKEN not in message


def test_unknown_files_are_refused_by_name_and_admitted_only_by_an_explicit_pattern(model_folder, folder):
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "extra").mkdir()
    (folder / "extra" / "data.csv").write_text("a,b\n")
    assert listing(folder) == listing(model_folder)
    message = refusal(folder)
    for name in ("notes.txt", "pytorch_model.bin", "extra/data.csv"):
        assert name in message, message
    assert "--allow_extra_files" in message and problems(message) == 1, message
    message = refusal(folder, allow_extra_files=["notes.txt", "extra/*"])
    assert "pytorch_model.bin" in message and "notes.txt" not in message and "extra/data.csv" not in message
    files = validate_model_folder(folder, allow_extra_files=["notes.txt", "extra/*", "*.bin"])
    admitted = {"notes.txt", "extra/data.csv", "pytorch_model.bin"}
    assert {f.path_in_repo for f in files} == listing(model_folder) | admitted


def test_results_plots_and_chat_templates_are_allowed(model_folder, folder):
    extras = ["eval_results.json", "results.json", "loss_curves.png", "plots/loss.svg", "docs/sample.png"]
    extras += ["additional_chat_templates/tool_use.jinja", "special_tokens_map.json"]
    for name in extras:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}\n" if name.endswith(".json") else "<svg/>\n")
    assert {f.path_in_repo for f in validate_model_folder(folder)} == listing(model_folder) | set(extras)


def test_a_planted_python_file_is_refused_even_with_a_pattern(folder):
    (folder / "tokenization_x.py").write_text("import os\nos.system('touch /tmp/pwned')\n")
    message = refusal(folder, allow_extra_files=["*.py"])
    assert "tokenization_x.py" in message and "not one of the sonett package's code files" in message, message
    assert problems(message) == 1, message


def test_an_edited_code_file_is_refused_unless_explicitly_allowed(folder):
    with (folder / "modeling_sonett.py").open("a") as handle:
        handle.write("\nimport os  # planted\n")
    message = refusal(folder)
    assert "modeling_sonett.py differs from the installed sonett package's copy" in message, message
    assert "--allow_modified_code" in message and problems(message) == 1, message
    files = validate_model_folder(folder, allow_modified_code=True)
    assert "modeling_sonett.py" in {f.path_in_repo for f in files}


def test_a_hard_link_is_refused_naming_the_file(folder, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"api": "private notes"}\n')
    os.link(outside, folder / "eval_results.json")  # an allowed name that is the same file as one outside
    message = refusal(folder)
    assert "eval_results.json" in message and "hard link" in message and "cp " in message, message
    assert problems(message) == 1, message


def test_a_link_to_a_hidden_file_inside_the_folder_is_refused(folder):
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "notes.txt").write_text(f"token {TOKEN}\n")  # checkpoints/ is never uploaded
    (folder / "eval_results.json").symlink_to(folder / "checkpoints" / "notes.txt")
    message = refusal(folder)
    assert "eval_results.json -> checkpoints/notes.txt" in message, message
    assert TOKEN not in message


# ---- token patterns in every uploaded text file ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FAKE_SECRETS))
@pytest.mark.parametrize("name", ["README.md", "training_results.json", "chat_template.jinja"])
def test_a_pasted_secret_is_refused_naming_file_and_line(folder, kind, name):
    secret = FAKE_SECRETS[kind]
    lines = (folder / name).read_text().splitlines() if (folder / name).is_file() else []
    if name.endswith(".json"):
        text = json.dumps({"note": secret, **json.loads("\n".join(lines))}, indent=2) + "\n"
    else:
        text = "\n".join([*lines, f"pasted here: {secret}", ""])
    (folder / name).write_text(text)
    line = text.splitlines().index(next(row for row in text.splitlines() if secret in row)) + 1
    message = refusal(folder)
    assert f"{name} line {line}: {kind} (" in message, message
    assert secret not in message and problems(message) == 1, message


def test_a_token_across_a_read_chunk_is_found_and_its_line_counted(folder):
    card = (folder / "README.md").read_text()
    head = card + "x" * (SCAN_CHUNK_BYTES - len(card.encode()) - 10) + "\n"  # the token starts 9 bytes before
    (folder / "README.md").write_text(head + TOKEN + "\n")
    message = refusal(folder)
    assert f"README.md line {head.count(chr(10)) + 1}: a Hugging Face token" in message, message


# ---- absolute local paths ------------------------------------------------------------------------------------------


def test_training_results_and_card_hold_no_absolute_local_path(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    folder = repo / "runs" / "tiny"
    elsewhere = tmp_path / "elsewhere"
    (repo / "tok").mkdir(parents=True)
    monkeypatch.chdir(repo)
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=2)
    model = tiny_model("full", vocab_size=len(tokenizer))
    results = {
        "training_data": f"/home/alice/corpus/train.txt, {elsewhere}/extra.txt",
        "steps": 5,
        "validation_loss": 3.0,
        "arguments": {"output_dir": str(folder), "tokenizer": str(repo / "tok"), "config": "/work/p/preset.json"},
        "resumed_from": str(folder / "checkpoints" / "step_5"),
    }
    write_model_folder(model, tokenizer, folder, results, repo_id=str(folder))
    add_quality_results(
        folder,
        [
            {
                "evaluation": "passkey",
                "model": "1.00",
                "llama": "0.50",
                "target": "",
                "command": f"python scripts/compare.py passkey --sonett_model {folder}",
            }
        ],
    )
    written = json.loads((folder / "training_results.json").read_text())
    card = (folder / "README.md").read_text()
    for text in (json.dumps(written), card):
        assert str(tmp_path) not in text and "/home/alice" not in text and "/work/" not in text
    assert written["training_data"] == "train.txt, extra.txt"
    assert written["arguments"] == {"output_dir": "runs/tiny", "tokenizer": "tok", "config": "preset.json"}
    assert written["resumed_from"] == "runs/tiny/checkpoints/step_5"
    assert written["quality"][0]["command"] == "python scripts/compare.py passkey --sonett_model runs/tiny"
    assert "- Data: train.txt, extra.txt" in card and 'from_pretrained("runs/tiny", trust_remote_code=True)' in card
    assert results["arguments"]["output_dir"] == str(folder)  # the caller's dict is not changed
    # Outside the working directory, a path in the folder becomes relative to the folder.
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert relative_local_paths({"a": [str(folder / "logs")]}, folder) == {"a": ["logs"]}
    assert relative_local_paths("see /v1/chat/completions or n/a", folder) == "see /v1/chat/completions or n/a"


def test_an_old_folder_uploads_its_results_and_card_with_relative_paths(folder):
    old = {"arguments": {"output_dir": str(folder)}, "training_data": "/home/alice/corpus/train.txt", "steps": 3}
    (folder / "training_results.json").write_text(json.dumps(old, indent=2) + "\n")
    with (folder / "README.md").open("a") as handle:
        handle.write(f"\nTrained from /home/alice/corpus/train.txt into {folder}.\n")
    result = push_folder_to_hub(folder, REPO, dry_run=True)
    sent = {f.path_in_repo: f.content for f in result.files if f.content is not None}
    assert set(sent) == {"README.md", "training_results.json"}
    assert json.loads(sent["training_results.json"]) == {
        "arguments": {"output_dir": "."},
        "training_data": "train.txt",
        "steps": 3,
    }
    card = sent["README.md"].decode()
    assert "Trained from train.txt into ." in card and "/home/alice" not in card and str(folder) not in card
    assert str(folder) in (folder / "README.md").read_text()  # the local files are left as they are


def test_an_absolute_local_path_in_another_uploaded_file_is_refused(folder):
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(template + "{# from /home/alice/templates/chat.jinja #}\n")
    message = refusal(folder)
    line = template.count("\n") + 1
    assert f"chat_template.jinja line {line}: an absolute local path (/home/alice/templates/chat.jinja)" in message
    assert "relative" in message and problems(message) == 1, message


# ---- end to end: the Hub receives exactly the allowed files --------------------------------------------------------


def test_the_hub_receives_exactly_the_allowed_files(model_folder, folder, tmp_path):
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "eval_results.json").write_text('{"accuracy": 0.5}\n')
    (folder / "notes.md").write_text("trained on a laptop\n")  # admitted with --allow_extra_files
    (folder / "checkpoints" / "step_1").mkdir(parents=True)  # local run state: never uploaded
    (folder / "checkpoints" / "step_1" / "optimizer.bin").write_bytes(b"state")
    leaky = Path(shutil.copytree(model_folder, tmp_path / "leaky"))
    (leaky / ".aws").mkdir()
    (leaky / ".aws" / "credentials").write_text(f"aws_secret_access_key = {TOKEN}\n")
    pasted = Path(shutil.copytree(model_folder, tmp_path / "pasted"))
    with (pasted / "README.md").open("a") as handle:
        handle.write(f"\nLog in with {TOKEN}\n")
    with HubServer() as hub:
        env = online_env(tmp_path / "home", hub.url, TOKEN)
        argvs = [[str(folder), REPO, "--allow_extra_files", "notes.md"], [str(leaky), "tester/leaky"]]
        codes, output = run_pushes([*argvs, [str(pasted), "tester/pasted"]], env, tmp_path)
        repos = hub.state.repos
    assert codes == [0, 1, 1], output[-4000:]
    code = {path.name for path in model_folder.glob("*_sonett.py")}
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md", "training_results.json"}
    expected |= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", *code}
    expected |= {"plots/loss.png", "eval_results.json", "notes.md", ".gitattributes"}
    received = repos[REPO].files("main")
    assert set(received) == expected
    assert received[".gitattributes"] == GITATTRIBUTES
    assert "tester/leaky" not in repos and ".aws/credentials" in output
    assert "tester/pasted" not in repos and "README.md line" in output and "a Hugging Face token" in output
    assert TOKEN not in output and TOKEN[3:] not in output

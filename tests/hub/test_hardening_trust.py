"""No code from data (issue 15, item 1): the tooling loads every tokenizer and model folder without remote code.

A planted `tokenization_x.py` with an `auto_map` in `tokenizer_config.json` (or a `config.json` whose `auto_map`
names a planted module) writes a marker file when imported. Every loader of the tooling refuses such a folder with
`UntrustedCodeError` naming the file, and the marker is never written: resuming from a checkpoint, `--tokenizer`,
evaluation, fine-tuning, chat (local folders and Hub ids), vision training, the passkey comparison, serving, the
harness and the scripts. A saved model folder holds the package's shipped code files only; a shipped file whose
text differs from the package's is never run, only named in a warning.
"""

import argparse
import dataclasses
import io
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_chat import bigram_chat_model, chat_tokenizer, save_chat_folder
from helpers_training import write_micro_run_files
from hub_server import HubServer, Repo
from transformers import AutoTokenizer

import sonett.training.checkpointing as checkpointing
from sonett.evaluation.comparison import PasskeyArguments, compare_passkey
from sonett.evaluation.scoring import load_model, load_model_only
from sonett.hub.loading import SHIPPED_CODE_FILES, UntrustedCodeError, check_model_folder
from sonett.hub.saving import save_model_and_tokenizer
from sonett.model.modeling_sonett import SonettForCausalLM
from sonett.training.finetuning import load_base_model
from sonett.training.pretraining import PretrainArguments, pretrain
from sonett.training.vision import VisionArguments, build_processor

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "modeling" / "sonett" / "model"

TOKENIZER_CODE = """from pathlib import Path
Path({marker!r}).write_text("tokenizer code ran")
from transformers import PreTrainedTokenizerFast


class XTokenizer(PreTrainedTokenizerFast):
    pass
"""
MODEL_CODE = """from pathlib import Path
Path({marker!r}).write_text("model code ran")
"""


def plant_tokenizer_code(folder: Path, marker: Path, auto_map: bool = True, module: bool = True) -> None:
    """`tokenization_x.py` (writes `marker` when imported) and an `auto_map` naming it in tokenizer_config.json."""
    if module:
        (folder / "tokenization_x.py").write_text(TOKENIZER_CODE.format(marker=str(marker)))
    if auto_map:
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["auto_map"] = {"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}
        config_file.write_text(json.dumps(config))


def plant_model_code(folder: Path, marker: Path) -> None:
    """A config.json of an unknown model type whose `auto_map` names `evil.py` (writes `marker` when imported)."""
    (folder / "evil.py").write_text(MODEL_CODE.format(marker=str(marker)))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "crafted"
    config["auto_map"] = {"AutoConfig": "evil.CraftedConfig", "AutoModelForCausalLM": "evil.CraftedForCausalLM"}
    config_file.write_text(json.dumps(config))


PLANTS = {"tokenizer": plant_tokenizer_code, "model": plant_model_code}


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A Sonett model folder written as training writes one (`write_model_folder`)."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    save_chat_folder(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A tokenizer-only folder, as a checkpoint's `tokenizer/` holds it."""
    folder = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    chat_tokenizer().save_pretrained(folder)
    return folder


def copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


# --- resume and --tokenizer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-step pretraining run with a checkpoint: its arguments."""
    files = write_micro_run_files(tmp_path_factory.mktemp("trust-files"))
    output_dir = tmp_path_factory.mktemp("trust-run") / "run"
    args = PretrainArguments(
        output_dir=str(output_dir), max_steps=1, eval_steps=0, checkpointing_steps=1, cpu=True, **files
    )
    pretrain(args)
    return args


def test_the_final_model_folder_holds_only_the_packages_code(trained_run):
    folder = Path(trained_run.output_dir)
    written = {p.name for p in folder.rglob("*.py")}
    assert "modeling_sonett.py" in written
    assert written <= SHIPPED_CODE_FILES
    for name in written:
        assert (folder / name).read_bytes() == (PACKAGE / name).read_bytes(), name


def test_resuming_from_a_checkpoint_with_planted_tokenizer_code_is_refused(trained_run, tmp_path):
    output_dir = copy(Path(trained_run.output_dir), tmp_path / "run")
    checkpoint = output_dir / checkpointing.CHECKPOINTS_DIR / "step_1"
    marker = tmp_path / "code-ran"
    plant_tokenizer_code(checkpoint / checkpointing.TOKENIZER_DIR, marker)
    state_file = checkpoint / checkpointing.STATE_FILE
    state = json.loads(state_file.read_text())
    for name in ("tokenizer/tokenizer_config.json", "tokenizer/tokenization_x.py"):  # sizes match the planted files
        state["files"][name] = (checkpoint / name).stat().st_size
    state_file.write_text(json.dumps(state))
    for name in SHIPPED_CODE_FILES:  # a resumed run that finishes writes the folder again
        (output_dir / name).unlink(missing_ok=True)

    resumed = dataclasses.replace(trained_run, output_dir=str(output_dir), max_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(UntrustedCodeError, match=r"tokenization_x\.py.*auto_map|auto_map.*tokenization_x\.py"):
        pretrain(resumed)
    assert not marker.exists()
    assert not list(output_dir.glob("*.py"))  # nothing was written, the planted module least of all


@pytest.mark.parametrize(
    "auto_map, module", [(True, True), (True, False), (False, True)], ids=["auto_map+module", "auto_map", "module"]
)
def test_a_tokenizer_folder_with_code_is_refused_for_training(tokenizer_folder, tmp_path, auto_map, module):
    tokenizer = copy(tokenizer_folder, tmp_path / "tokenizer")
    marker = tmp_path / "code-ran"
    plant_tokenizer_code(tokenizer, marker, auto_map=auto_map, module=module)
    files = write_micro_run_files(tmp_path / "files")
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, eval_steps=0, cpu=True, tokenizer=str(tokenizer), **files
    )
    expected = "auto_map" if auto_map else r"tokenization_x\.py"
    with pytest.raises(UntrustedCodeError, match=expected) as error:
        pretrain(args)
    assert str(tokenizer) in str(error.value)
    assert "A tokenizer is data" in str(error.value)
    assert not marker.exists()
    assert not (tmp_path / "run" / "tokenization_x.py").exists()


# --- every other loader of the tooling --------------------------------------------------------------------------


def _chat_script(folder: Path) -> None:
    """scripts/chat.py FOLDER, with /quit on its input."""
    argv, stdin = sys.argv, sys.stdin
    sys.argv, sys.stdin = [str(ROOT / "scripts" / "chat.py"), str(folder)], io.StringIO("/quit\n")
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv, sys.stdin = argv, stdin


def _stability_script(folder: Path) -> None:
    script = runpy.run_path(str(ROOT / "scripts" / "stability_generation.py"))
    script["load_model_and_tokenizer"](argparse.Namespace(model=str(folder)))


def _finetune_samples(folder: Path) -> None:
    from sonett.cli.finetune import show_samples  # `sonett finetune` (scripts/finetune.py is its wrapper)

    show_samples(str(folder), validation=None)


def _passkey(folder: Path) -> None:
    args = PasskeyArguments(
        sonett_model=str(folder), models=["sonett"], steps=1, lengths=[64], train_length=64, min_train_length=None
    )
    compare_passkey(args, chat_tokenizer())


def _serve(folder: Path) -> None:
    pytest.importorskip("fastapi")
    from sonett.inference.serving import build_app

    build_app(str(folder), device="cpu")


def _harness(folder: Path) -> None:
    from sonett.evaluation.harness import run_harness, write_task

    docs = [{"context": "a picture of a", "choices": [" cat", " dog"], "label": 0}]
    write_task(folder.parent / "tasks", "trust_check", docs, "multiple_choice")
    run_harness(folder, ["trust_check"], include_path=folder.parent / "tasks", limit=1)


LOADERS = {
    "evaluation.load_model": lambda folder: load_model(str(folder), "cpu"),
    "evaluation.load_model_only": lambda folder: load_model_only(str(folder), "cpu"),
    "finetuning.load_base_model": lambda folder: load_base_model(str(folder)),
    "vision_training.build_processor": lambda folder: build_processor(str(folder), VisionArguments()),
    "comparison.compare_passkey": _passkey,
    "serving.build_app": _serve,
    "harness.run_harness": _harness,
    "scripts/chat.py": _chat_script,
    "scripts/stability_generation.py": _stability_script,
}


@pytest.mark.parametrize("plant", list(PLANTS))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_a_model_folder_with_planted_code(chat_folder, tmp_path, loader, plant):
    folder = copy(chat_folder, tmp_path / "model")
    marker = tmp_path / "code-ran"
    PLANTS[plant](folder, marker)
    planted = "tokenization_x" if plant == "tokenizer" else "evil"
    with pytest.raises(UntrustedCodeError, match=rf"{planted}\.py") as error:
        LOADERS[loader](folder)
    assert str(folder) in str(error.value)
    assert not marker.exists()


# Runs scripts/chat.py on each Hub repository id of argv[1:]; prints the exception each load ends with.
HUB_CHAT_DRIVER = """
import io, runpy, sys
script, repos = sys.argv[1], sys.argv[2:]
for repo in repos:
    sys.argv, sys.stdin = [script, repo], io.StringIO("/quit\\n")
    try:
        runpy.run_path(script, run_name="__main__")
        print("### loaded", repo)
    except Exception as error:
        print("###", repo, type(error).__name__, str(error).replace("\\n", " "))
"""


def test_chat_refuses_hub_repositories_that_name_planted_code(chat_folder, tmp_path):
    """A Hub id is checked after loading (config and tokenizer auto_map); the planted modules never run."""
    markers = {plant: tmp_path / f"{plant}-code-ran" for plant in PLANTS}
    with HubServer() as hub:
        for plant, plant_code in PLANTS.items():
            folder = copy(chat_folder, tmp_path / plant)
            plant_code(folder, markers[plant])
            repo = hub.state.repos.setdefault(f"tester/{plant}", Repo(f"tester/{plant}", private=False))
            files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
            hub.state.commit(repo, "main", files, "planted")
        driver = tmp_path / "driver.py"
        driver.write_text(HUB_CHAT_DRIVER)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT / "modeling"))
        command = [sys.executable, str(driver), str(ROOT / "scripts" / "chat.py"), "tester/tokenizer", "tester/model"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "### tester/tokenizer UntrustedCodeError" in output and "tokenization_x.XTokenizer" in output, output
    assert "### tester/model UntrustedCodeError" in output and "needs its own Python code" in output, output
    assert not any(marker.exists() for marker in markers.values())


def test_the_finetune_samples_refuse_an_adapter_folder_with_planted_tokenizer_code(tokenizer_folder, tmp_path):
    adapter = copy(tokenizer_folder, tmp_path / "adapter")  # the tokenizer files of a saved adapter
    marker = tmp_path / "code-ran"
    plant_tokenizer_code(adapter, marker)
    with pytest.raises(UntrustedCodeError, match=r"tokenization_x\.py"):
        _finetune_samples(adapter)
    assert not marker.exists()


def test_changed_shipped_code_is_never_run_and_is_named_in_a_warning(chat_folder, tmp_path, caplog):
    """A folder whose shipped files differ from the package's (an older version, or an edit) loads with the
    package's classes; its own modeling_sonett.py never runs, and a warning names it."""
    folder = copy(chat_folder, tmp_path / "model")
    marker = tmp_path / "code-ran"
    with open(folder / "modeling_sonett.py", "a") as f:
        f.write("\n" + MODEL_CODE.format(marker=str(marker)))
    with caplog.at_level(logging.WARNING, logger="sonett.hub.loading"):
        model, _ = load_model(str(folder), "cpu")
    assert type(model) is SonettForCausalLM
    assert not marker.exists()
    assert "modeling_sonett.py" in caplog.text and "differ" in caplog.text


# --- saving ---------------------------------------------------------------------------------------------------


def test_saving_a_tokenizer_that_runs_folder_code_is_refused(chat_folder, tokenizer_folder, tmp_path):
    """A library user who loaded a planted tokenizer with trust_remote_code=True cannot save its module into a
    model folder through `save_model_and_tokenizer` (the path of training, finetune --merge and vision)."""
    planted = copy(tokenizer_folder, tmp_path / "planted")
    plant_tokenizer_code(planted, tmp_path / "ran-on-purpose")
    tokenizer = AutoTokenizer.from_pretrained(planted, trust_remote_code=True)  # the user's explicit choice
    model = SonettForCausalLM.from_pretrained(chat_folder)
    output = tmp_path / "out"
    with pytest.raises(UntrustedCodeError, match=r"XTokenizer.*trust_remote_code"):
        save_model_and_tokenizer(model, tokenizer, output)
    assert not (output / "tokenization_x.py").exists()


def test_saving_into_a_folder_that_holds_foreign_code_is_refused(chat_folder, tmp_path):
    model = SonettForCausalLM.from_pretrained(chat_folder)
    output = tmp_path / "out"
    output.mkdir()
    (output / "evil.py").write_text("")
    with pytest.raises(UntrustedCodeError, match=r"evil\.py"):
        save_model_and_tokenizer(model, chat_tokenizer(), output)
    assert not (output / "model.safetensors").exists()


def test_a_saved_vision_folder_passes_the_model_folder_check(tmp_path):
    """The auto_map entries Sonett itself writes (config, processor, nested image processor) are accepted."""
    from sonett import SonettForConditionalGeneration, SonettImageProcessor, SonettProcessor

    tokenizer = chat_tokenizer()
    text = bigram_chat_model(tokenizer)
    vision = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
    model = SonettForConditionalGeneration.from_text_model(
        text, cross_attention_layers=[1], vision_config=vision, image_token_id=tokenizer.image_token_id
    )
    folder = save_model_and_tokenizer(model, SonettProcessor(SonettImageProcessor(), tokenizer), tmp_path / "vision")
    assert "processing_sonett.py" in {p.name for p in folder.glob("*.py")}
    check_model_folder(folder)


def test_saving_a_model_whose_config_names_other_code_is_refused(chat_folder, tmp_path):
    model = SonettForCausalLM.from_pretrained(chat_folder)
    model.config.auto_map = {**model.config.auto_map, "AutoModelForMaskedLM": "evil.Model"}
    with pytest.raises(UntrustedCodeError, match=r"AutoModelForMaskedLM to 'evil\.Model'.*evil\.py"):
        save_model_and_tokenizer(model, chat_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()

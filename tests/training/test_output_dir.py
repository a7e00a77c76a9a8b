"""Output folders: `runs/<preset name>` by default, and no existing model folder is written over without
`--overwrite_output_dir` (pretraining, the vision recipe, fine-tuning's adapter and `--merge` folders)."""

import hashlib
from pathlib import Path

import pytest
from test_training import write_micro_run_files
from transformers import TrainingArguments

from sonett.training.arguments import PretrainArguments, check_output_dir
from sonett.training.finetuning import FinetuneArguments, finetune
from sonett.training.pretraining import pretrain
from sonett.training.vision import VisionArguments, train_vision


def fingerprint(folder: Path) -> dict[str, str]:
    files = (path for path in folder.rglob("*") if path.is_file())
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def fake_model_folder(folder: Path, name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text('{"model_type": "sonett"}\n')
    return folder


def assert_refused(error: pytest.ExceptionInfo, folder: Path) -> None:
    message = str(error.value)
    assert str(folder) in message and "--output_dir" in message and "--overwrite_output_dir" in message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("sonett-tiny", "runs/sonett-tiny"),
        ("sonett-tiny-constant", "runs/sonett-tiny-constant"),
        ("my/presets/wide.json", "runs/wide"),
    ],
)
def test_output_dir_defaults_to_runs_and_the_preset_name(config, expected):
    assert PretrainArguments(config=config, report_to="none").output_dir == expected
    assert PretrainArguments(config=config, output_dir="elsewhere", report_to="none").output_dir == "elsewhere"


def test_vision_output_dir_follows_the_text_model():
    assert VisionArguments().output_dir == "runs/sonett-tiny-vision"
    assert VisionArguments(text_model="runs/sonett-small").output_dir == "runs/sonett-small-vision"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "adapter_config.json", "pytorch_model.bin"])
def test_check_output_dir_refuses_any_model_folder(tmp_path, name):
    folder = fake_model_folder(tmp_path / "model", name)
    with pytest.raises(FileExistsError, match=name) as error:
        check_output_dir(folder, overwrite=False)
    assert_refused(error, folder)
    check_output_dir(folder, overwrite=True)
    check_output_dir(tmp_path / "absent", overwrite=False)
    check_output_dir(fake_model_folder(tmp_path / "logs-only", "events.txt"), overwrite=False)


def test_pretraining_keeps_a_model_folder_unless_told_and_resumes_in_it(tmp_path):
    files = write_micro_run_files(tmp_path / "data")
    folder = tmp_path / "run"
    args = PretrainArguments(output_dir=str(folder), max_steps=2, eval_steps=0, checkpointing_steps=2, **files)
    pretrain(args)
    before = fingerprint(folder)

    with pytest.raises(FileExistsError) as error:  # refused before any work: nothing in the folder changed
        pretrain(PretrainArguments(output_dir=str(folder), max_steps=1, eval_steps=0, **files))
    assert_refused(error, folder)
    assert fingerprint(folder) == before

    # resuming from a checkpoint inside the folder is not an overwrite
    resumed = pretrain(
        PretrainArguments(output_dir=str(folder), max_steps=3, eval_steps=0, resume_from_checkpoint="latest", **files)
    )
    assert resumed["steps"] == 3 and resumed["resumed_from"].endswith("step_2")

    # --overwrite_output_dir starts afresh, and the earlier run's checkpoints go with it (`latest` cannot pick them)
    fresh = pretrain(
        PretrainArguments(output_dir=str(folder), max_steps=1, eval_steps=0, overwrite_output_dir=True, **files)
    )
    assert fresh["steps"] == 1 and not (folder / "checkpoints").exists()
    assert fingerprint(folder)["model.safetensors"] != before["model.safetensors"]


def test_a_fresh_run_does_not_mix_with_an_earlier_runs_checkpoints(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints" / "step_4").mkdir(parents=True)  # an interrupted run: checkpoints, no model yet
    with pytest.raises(FileExistsError, match=r"step_4.*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        pretrain(PretrainArguments(output_dir=str(folder), report_to="none"))
    assert (folder / "checkpoints" / "step_4").is_dir()


def test_overwrite_and_resume_together_is_a_clear_error():
    with pytest.raises(ValueError, match="--overwrite_output_dir and --resume_from_checkpoint"):
        PretrainArguments(overwrite_output_dir=True, resume_from_checkpoint="latest", report_to="none")


def test_the_vision_recipe_keeps_an_existing_model_folder(tmp_path):
    text = fake_model_folder(tmp_path / "text")
    output = fake_model_folder(tmp_path / "vision", "model.safetensors")
    before = fingerprint(output)
    with pytest.raises(FileExistsError) as error:
        train_vision(VisionArguments(text_model=str(text), output_dir=str(output)))
    assert_refused(error, output)
    assert fingerprint(output) == before


@pytest.mark.parametrize("existing", ["adapter", "merged"])
def test_finetuning_keeps_an_existing_adapter_or_merged_folder(tmp_path, existing):
    output = tmp_path / "lora"
    if existing == "adapter":
        refused = fake_model_folder(output, "adapter_config.json")
    else:
        refused = fake_model_folder(output / "merged")
    before = fingerprint(output)
    training_args = TrainingArguments(output_dir=str(output), report_to="none")
    with pytest.raises(FileExistsError) as error:
        finetune(FinetuneArguments(base_model=str(tmp_path / "absent"), merge=True), training_args)
    assert_refused(error, refused)
    assert fingerprint(output) == before

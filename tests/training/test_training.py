"""The pretraining loop end to end: it learns, writes a complete Hub-ready folder that reloads through the Auto
classes with the exact validation loss the run reported; checkpoints resume bit for bit (loaded and streamed data),
half-written or mismatched checkpoints are refused, trackers write the logged losses, and the optimiser settings
(gate learning rate, activation checkpointing, bf16) do what they say."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import is_tensorboard_available
from helpers_training import MICRO_PRESET, write_micro_run_files
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sonett.data.corpus import pack_into_blocks, split_by_document, stdlib_corpus
from sonett.model.modeling_sonett import SonettForCausalLM
from sonett.presets import build_config, config_from_preset, load_preset
from sonett.training.optimization import MEMORY_GATE, parameter_groups
from sonett.training.pretraining import (
    PretrainArguments,
    list_checkpoints,
    make_accelerator,
    prepare_data,
    pretrain,
    read_checkpoint,
    resolve_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL_RUN = dict(
    max_documents=40,
    vocab_size=512,
    block_size=64,
    batch_size=8,
    max_steps=30,
    warmup_steps=5,
    eval_steps=15,
    eval_blocks=8,
    learning_rate=5e-3,
    validation_fraction=0.1,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "sonett-test"
    args = PretrainArguments(output_dir=str(output_dir), **SMALL_RUN)
    return args, pretrain(args)


def test_training_reduces_the_loss(run):
    _, results = run
    losses = [entry["loss"] for entry in results["loss_history"]]
    assert len(losses) == SMALL_RUN["max_steps"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert results["validation_perplexity"] == pytest.approx(math.exp(results["validation_loss"]))
    assert "validation_loss" in results["loss_history"][SMALL_RUN["eval_steps"] - 1]


def test_folder_is_hub_ready(run):
    args, results = run
    folder = Path(args.output_dir)
    names = {p.name for p in folder.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "training_results.json",
        "configuration_sonett.py",
        "modeling_sonett.py",
        "cache_sonett.py",
        "attention_sonett.py",
        "layers_sonett.py",
    }
    assert expected <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForQuestionAnswering",
    }
    assert config["vocab_size"] == SMALL_RUN["vocab_size"]
    card = (folder / "README.md").read_text()
    assert "$" not in card.split("```")[0]
    assert f"{results['validation_perplexity']:.4f}" in card
    assert "trust_remote_code=True" in card
    assert json.loads((folder / "training_results.json").read_text())["steps"] == SMALL_RUN["max_steps"]


def test_reloaded_folder_reproduces_the_reported_validation_loss(run):
    args, results = run
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    corpus = stdlib_corpus(max_documents=SMALL_RUN["max_documents"])
    validation = split_by_document(corpus, SMALL_RUN["validation_fraction"], key="path")["validation"]
    blocks = pack_into_blocks(validation, tokenizer, SMALL_RUN["block_size"])
    ids = torch.tensor(blocks["input_ids"][: SMALL_RUN["eval_blocks"]])
    with torch.no_grad():
        logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(results["validation_loss"], abs=1e-4)


@pytest.mark.parametrize("path", sorted((ROOT / "configuration").glob("sonett-*.json")), ids=lambda p: p.stem)
def test_every_preset_is_a_valid_config(path):
    config = config_from_preset(load_preset(str(path)))
    assert len(config.layer_types) == config.num_hidden_layers
    kinds = {"full_attention", "sliding_attention", "linear_attention", "memory_attention"}
    if path.stem.endswith("-constant"):
        assert "full_attention" not in config.layer_types
        assert set(config.layer_types) == kinds - {"full_attention"}
    else:
        assert set(config.layer_types) == kinds


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="sonett-tiny"):
        load_preset("no-such-preset")


def test_build_config_takes_vocab_and_special_ids_from_the_tokenizer(run):
    args, _ = run
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir, trust_remote_code=True)
    config = build_config(load_preset("sonett-tiny"), tokenizer)
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)


def test_train_script_runs_and_prints_a_sample(tmp_path):
    """The command line, with bf16 autocast, activation checkpointing and checkpoints (a fresh process, so the
    Accelerate state can take another precision than the in-process runs)."""
    output_dir = tmp_path / "cli-run"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--output_dir", str(output_dir)]
    options = {**SMALL_RUN, "max_steps": 4, "eval_steps": 0, "mixed_precision": "bf16", "checkpointing_steps": 2}
    for key, value in {**options, "activation_checkpointing": True, "report_to": "none"}.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation perplexity:" in result.stdout
    assert f"checkpoints:           step_2, step_4 in {output_dir / 'checkpoints'}" in result.stdout
    sample = result.stdout.split("sample (reloaded with AutoModelForCausalLM.from_pretrained):\n", 1)[1]
    assert sample.startswith("def read_config(path):")
    results = json.loads((output_dir / "training_results.json").read_text())
    assert results["precision"] == "bf16" and results["arguments"]["activation_checkpointing"] is True
    assert math.isfinite(results["validation_loss"])


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    run = {**write_micro_run_files(tmp_path), "max_steps": 3, "eval_steps": 0}
    plain = pretrain(PretrainArguments(output_dir=str(tmp_path / "plain"), **run))
    checkpointed = pretrain(PretrainArguments(output_dir=str(tmp_path / "ac"), activation_checkpointing=True, **run))
    assert checkpointed["loss_history"] == plain["loss_history"]
    assert checkpointed["validation_loss"] == plain["validation_loss"]


def test_pretrain_on_local_jsonl_with_another_text_column(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": text}) for text in stdlib_corpus(max_documents=30)["text"]) + "\n")
    args = PretrainArguments(
        output_dir=str(tmp_path / "out"),
        data_files=[str(corpus)],
        text_column="body",
        **{**SMALL_RUN, "max_steps": 3, "eval_steps": 0, "max_documents": None},
    )
    results = pretrain(args)
    assert results["steps"] == 3
    assert results["training_data"] == str(corpus)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --- resumable checkpoints, trackers, streaming, input checks -------------------------------------------------


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """8 steps (3 steps an epoch, accumulation 2) with a checkpoint every 2 steps, the newest 3 kept."""
    folder = tmp_path_factory.mktemp("checkpointed")
    report_to = "tensorboard" if is_tensorboard_available() else "none"
    args = PretrainArguments(
        output_dir=str(folder / "full"),
        max_steps=8,
        gradient_accumulation_steps=2,
        eval_steps=4,
        checkpointing_steps=2,
        checkpoints_total_limit=3,
        **{**write_micro_run_files(folder), "report_to": report_to},
    )
    return args, pretrain(args)


def test_checkpoint_limit_keeps_the_newest(checkpointed_run):
    args, _ = checkpointed_run
    root = Path(args.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6", "step_8"]  # step_2 pruned, no leftovers
    assert [p.name for p in list_checkpoints(root)] == ["step_4", "step_6", "step_8"]
    state = read_checkpoint(root / "step_4")
    # an epoch is 5 micro-batches: steps of 2, 2 and 1 micro-batches; step 4 is the first step of epoch 1
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (4, 1, 2)
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(state["files"])
    assert "tokenizer/tokenizer.json" in state["files"]


@pytest.mark.parametrize("checkpoint", ["step_4", "step_6"], ids=["mid-epoch", "end-of-epoch"])
def test_resumed_run_continues_with_the_exact_losses_and_weights(checkpointed_run, tmp_path, checkpoint):
    args, full = checkpointed_run
    path = Path(args.output_dir) / "checkpoints" / checkpoint
    resumed_args = dataclasses.replace(
        args, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(path), report_to="none"
    )
    resumed = pretrain(resumed_args)
    assert resumed["resumed_from"] == str(path)
    assert [entry["step"] for entry in resumed["loss_history"]] == list(range(1, 9))
    assert resumed["loss_history"] == full["loss_history"]  # the steps after the checkpoint recomputed, bit for bit
    assert resumed["validation_loss"] == full["validation_loss"]
    full_weights, resumed_weights = _weights(Path(args.output_dir)), _weights(tmp_path / "resumed")
    assert full_weights.keys() == resumed_weights.keys()
    for name, tensor in full_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


@pytest.mark.skipif(not is_tensorboard_available(), reason="needs tensorboard (pip install tensorboard)")
def test_tensorboard_events_hold_the_logged_losses(checkpointed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args, full = checkpointed_run
    event_files = list((Path(args.output_dir) / "logs" / "pretrain").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0]))
    events.Reload()
    train = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in train] == list(range(1, 9))
    expected = [entry["loss"] for entry in full["loss_history"]]
    assert [value for _, value in train] == pytest.approx(expected, rel=1e-6)
    evaluation = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert evaluation[4] == pytest.approx(full["loss_history"][3]["validation_loss"], rel=1e-6)
    assert evaluation[8] == pytest.approx(full["validation_loss"], rel=1e-6)


def test_bad_checkpoints_are_refused_with_the_reason(checkpointed_run, tmp_path):
    args, _ = checkpointed_run
    source = Path(args.output_dir) / "checkpoints" / "step_8"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nowhere"), tmp_path)
    with pytest.raises(FileNotFoundError, match="found no checkpoint.*--checkpointing_steps"):
        resolve_checkpoint("latest", tmp_path / "checkpoints")
    root = tmp_path / "checkpoints"
    shutil.copytree(source, root / "step_8.partial")  # a save interrupted before its rename
    with pytest.raises(FileNotFoundError, match=r"half-written \(interrupted saves\): \['step_8.partial'\]"):
        resolve_checkpoint("latest", root)
    with pytest.raises(ValueError, match="half-written checkpoint"):
        resolve_checkpoint(str(root / "step_8.partial"), root)
    shutil.copytree(source, root / "step_6")
    assert resolve_checkpoint("latest", root) == root / "step_6"  # the complete one, the partial is skipped
    (root / "step_6" / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match="step_6 is damaged: optimizer.bin is missing"):
        resolve_checkpoint("latest", root)
    shutil.copytree(source, root / "step_7")
    weights = root / "step_7" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model.safetensors has 100 bytes, \d+ were written"):
        resolve_checkpoint(str(root / "step_7"), root)
    (root / "step_7" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint: it has no trainer_state.json"):
        resolve_checkpoint(str(root / "step_7"), root)


def test_resuming_with_other_settings_is_refused(checkpointed_run, tmp_path):
    args, _ = checkpointed_run
    checkpoint = Path(args.output_dir) / "checkpoints" / "step_8"
    changed = dataclasses.replace(
        args, output_dir=str(tmp_path / "out"), batch_size=2, seed=1, resume_from_checkpoint=str(checkpoint)
    )
    with pytest.raises(ValueError, match=r"batch_size \(4 -> 2\), seed \(0 -> 1\).*original settings"):
        pretrain(changed)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"checkpointing_steps": -1}, "checkpointing_steps must be 0 or more"),
        ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be at least 1"),
        ({"gate_lr_multiplier": 0.0}, "gate_lr_multiplier must be positive"),
    ],
)
def test_bad_arguments_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        PretrainArguments(**overrides)


def test_report_to_defaults_to_tensorboard_when_installed():
    assert PretrainArguments().report_to == ("tensorboard" if is_tensorboard_available() else "none")
    if not is_tensorboard_available():
        with pytest.raises(ValueError, match="pip install tensorboard"):
            PretrainArguments(report_to="tensorboard")


def test_missing_data_file_fails_before_training(tmp_path):
    args = PretrainArguments(output_dir=str(tmp_path / "out"), data_files=[str(tmp_path / "absent.txt")])
    with pytest.raises(FileNotFoundError, match=r"absent\.txt.*--data_files"):
        pretrain(args)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_parameter_groups_spare_norms_spans_and_gates_from_decay():
    config = config_from_preset({**MICRO_PRESET, "vocab_size": 300, "adaptive_span": True})
    model = SonettForCausalLM(config)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, gates = parameter_groups(model, 0.1, gate_lr=0.5, gate_roles=(MEMORY_GATE,))
    assert (decay["weight_decay"], no_decay["weight_decay"], gates["weight_decay"], gates["lr"]) == (0.1, 0, 0, 0.5)
    assert [names[id(p)] for p in gates["params"]] == ["model.layers.2.mixer.gate"]
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.layers.1.mixer.span_logit" in no_decay_names
    assert {n for n in names.values() if "norm" in n} <= no_decay_names
    assert all(p.dim() >= 2 and "norm" not in names[id(p)] for p in decay["params"])
    assert len(parameter_groups(model, 0.1)) == 2  # without gate_lr: no gate group (the vision recipe's call)


def test_gate_lr_multiplier_scales_only_the_gate_learning_rate(tmp_path):
    files = {**write_micro_run_files(tmp_path), "warmup_steps": 0, "learning_rate": 1e-2}
    args = PretrainArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, eval_steps=0, gate_lr_multiplier=10.0, **files
    )
    pretrain(args)
    trained = load_file(tmp_path / "out" / "model.safetensors")
    # AdamW's first step moves each parameter by about its learning rate (lr * g / (|g| + eps)); the memory
    # gates start at 0 and the norm weights at 1
    assert trained["model.layers.2.mixer.gate"].abs() == pytest.approx(torch.full((2,), 0.1), rel=1e-3)
    assert (trained["model.norm.weight"] - 1).abs() == pytest.approx(torch.full((32,), 0.01), rel=1e-3)


def test_streaming_run_resumes_exactly(tmp_path):
    args = PretrainArguments(
        output_dir=str(tmp_path / "full"),
        streaming=True,
        shuffle_buffer=8,
        max_steps=6,
        eval_steps=0,
        checkpointing_steps=3,
        **write_micro_run_files(tmp_path),
    )
    full = pretrain(args)
    loaded = prepare_data(dataclasses.replace(args, streaming=False), make_accelerator(args), MICRO_PRESET)
    assert full["validation_tokens"] == len(loaded.valid_blocks) * (args.block_size - 1)  # same held-out blocks
    resumed = pretrain(
        dataclasses.replace(
            args, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "full/checkpoints/step_3")
        )
    )
    assert resumed["loss_history"] == full["loss_history"]
    assert resumed["validation_loss"] == full["validation_loss"]

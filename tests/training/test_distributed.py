"""Distributed training: two data-parallel CPU processes (gloo, started by `accelerate launch` with the repository's
own config) train exactly as one process with the same global batch (docs/design.md, invariant 9), and every Accelerate
config in configuration/accelerate/ is one `accelerate launch` accepts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from helpers_training import write_micro_run_files
from safetensors.torch import load_file

import sonett.model.modeling_sonett as modeling_sonett
from sonett.model.modeling_sonett import SonettForCausalLM
from sonett.training.pretraining import PretrainArguments, pretrain

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configuration" / "accelerate"
CPU_CONFIG = CONFIGS / "cpu_two_processes.yaml"


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    run = {
        **write_micro_run_files(tmp_path, documents=120),
        "max_steps": 4,
        "gradient_accumulation_steps": 2,
        "eval_steps": 2,
        "eval_blocks": 7,  # not a multiple of 2 processes x 2 blocks: the last batch is evened out, then trimmed
    }
    one = pretrain(PretrainArguments(output_dir=str(tmp_path / "one"), cpu=True, **{**run, "batch_size": 4}))

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG)]
    # `-m sonett train`: the command as installed (accelerate's --module); scripts/train.py runs the same main
    command += ["-m", "sonett", "train", "--cpu", "--output_dir", str(tmp_path / "two")]
    for key, value in {**run, "batch_size": 2}.items():
        command += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "training_results.json").read_text())

    assert one["hardware"].startswith("1 x cpu") and two["hardware"].startswith("2 x cpu")
    assert two["batch_tokens"] == one["batch_tokens"] == 4 * 32 * 2  # global batch x block x accumulation
    assert two["tokens_seen"] == one["tokens_seen"]
    for single, double in zip(one["loss_history"], two["loss_history"], strict=True):
        assert double["loss"] == pytest.approx(single["loss"], abs=1e-5)
        assert double["lr"] == pytest.approx(single["lr"], abs=1e-12)
    assert two["loss_history"][1]["validation_loss"] == pytest.approx(
        one["loss_history"][1]["validation_loss"], abs=1e-5
    )
    assert two["validation_tokens"] == one["validation_tokens"] == 7 * 31
    assert two["validation_loss"] == pytest.approx(one["validation_loss"], abs=1e-5)
    weights_one, weights_two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=0, msg=name)
    assert one["loss_history"][-1]["loss"] < one["loss_history"][0]["loss"]  # it did train


EXPECTED = {
    "single_gpu": DistributedType.NO,
    "multi_gpu": DistributedType.MULTI_GPU,
    "multi_node": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "deepspeed_zero2": DistributedType.DEEPSPEED,
    "deepspeed_zero3": DistributedType.DEEPSPEED,
    "cpu_two_processes": DistributedType.MULTI_GPU,  # the torchrun launcher; the script's --cpu keeps it on gloo
}


def test_the_expected_accelerate_configs_exist():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_is_accepted_by_accelerate_launch(name):
    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "train.py"]))
    assert args.num_processes == config.num_processes >= 1
    assert args.dynamo_backend.lower() == "no"
    assert config.mixed_precision == ("no" if name == "cpu_two_processes" else "bf16")
    if name == "fsdp":
        layer = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert layer in SonettForCausalLM._no_split_modules
        assert isinstance(getattr(modeling_sonett, layer), type)
        assert args.use_fsdp and config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("deepspeed"):
        assert args.use_deepspeed and config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero3_save_16bit_model"] is True  # the final folder needs gathered weights
    if name == "multi_node":
        assert (config.num_machines, config.main_process_ip, config.main_process_port) == (2, "MAIN_PROCESS_IP", 29500)
    if name == "cpu_two_processes":
        assert (args.multi_gpu, args.cpu, config.num_processes, config.num_machines) == (True, False, 2, 1)

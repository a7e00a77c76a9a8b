"""Crash safety of the pretraining loop.

- A real SIGKILL in the middle of a save leaves `latest` on the previous complete checkpoint, and the resumed run
  continues with the uninterrupted run's losses and weights; a crash between any two lines of a save never leaves a
  damaged `step_N` folder, and every file and folder is fsynced before the rename.
- SIGINT and SIGTERM save a checkpoint of the current step and exit with 128 + the signal number, on one process
  and on two (`accelerate launch` forwards the signal to its workers); the resumed runs match.
- A step whose loss or gradient norm is NaN/inf is never applied (`--nan_policy skip` / `stop`, the skip limit),
  with gradient accumulation and with two processes that skip together.
- Resuming unpickles every file with `torch.load(weights_only=True)`; a checkpoint file that would run code is
  refused.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers_training import MICRO_PRESET, write_micro_run_files
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

import sonett.training.checkpointing as checkpointing
import sonett.training.pretraining as training
from sonett.model.modeling_sonett import SonettForCausalLM
from sonett.presets import config_from_preset
from sonett.training.checkpointing import (
    STATE_FILE,
    TrainState,
    UnsafeCheckpointError,
    load_checkpoint,
    save_checkpoint,
    weights_only_torch_load,
)
from sonett.training.pretraining import (
    NonFiniteLossError,
    PretrainArguments,
    TrainingInterrupted,
    list_checkpoints,
    pretrain,
    resolve_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
CPU_CONFIG = ROOT / "configuration" / "accelerate" / "cpu_two_processes.yaml"
MAX_STEPS = 8
# 8 optimizer steps of 2 accumulated micro-batches (an epoch is 5 micro-batches: steps of 2, 2, 1), a checkpoint
# every 3 steps
RUN = dict(
    max_steps=MAX_STEPS, gradient_accumulation_steps=2, eval_steps=0, checkpointing_steps=3, report_to="none", cpu=True
)

# Runs scripts/train.py, pausing in one checkpoint save until the test creates the file `go` (or kills the process):
# CRASH_TEST_PAUSE=before_rename pauses when step_N.partial is complete but not yet renamed, after_save pauses
# after step_N was saved. CRASH_TEST_NAN_MICRO=k makes the loss of the k-th training micro-batch NaN (on rank
# CRASH_TEST_NAN_RANK only).
WRAPPER = """
import os, runpy, sys, time
from pathlib import Path

import sonett.training.checkpointing as checkpointing
import sonett.training.pretraining as training

control = Path(os.environ["CRASH_TEST_CONTROL"])
rank = os.environ.get("RANK", "0")


def pause():
    (control / f"paused.{rank}").touch()
    while not (control / "go").exists():
        time.sleep(0.02)


pause_step = int(os.environ.get("CRASH_TEST_STEP", "0"))
if os.environ.get("CRASH_TEST_PAUSE") == "before_rename":
    publish = checkpointing._publish

    def paused_publish(partial, final):
        if final.name == f"step_{pause_step}":
            pause()
        publish(partial, final)

    checkpointing._publish = paused_publish
elif os.environ.get("CRASH_TEST_PAUSE") == "after_save":
    save = training.save_checkpoint

    def paused_save(accelerator, tokenizer, state, args):
        path = save(accelerator, tokenizer, state, args)
        if state.step == pause_step:
            pause()
        return path

    training.save_checkpoint = paused_save

nan_micro = int(os.environ.get("CRASH_TEST_NAN_MICRO", "0"))
if nan_micro and rank == os.environ.get("CRASH_TEST_NAN_RANK", rank):
    build = training.build_model
    seen = [0]

    def nan_hook(module, inputs, output):
        if module.training:
            seen[0] += 1
            if seen[0] == nan_micro:
                output.loss = output.loss * float("nan")
        return output

    def build_with_nan(architecture, config):
        model = build(architecture, config)
        model.register_forward_hook(nan_hook)
        return model

    training.build_model = build_with_nan

sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flags += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return flags


def _start(folder: Path, options: dict, env: dict, launcher: list[str] | None = None) -> subprocess.Popen:
    """scripts/train.py under the wrapper, in its own session; stdout and stderr go to folder/stdout, stderr."""
    (folder / "control").mkdir(parents=True, exist_ok=True)
    wrapper = folder / "wrapper.py"
    wrapper.write_text(WRAPPER)
    command = [*(launcher or [sys.executable]), str(wrapper), str(TRAIN_SCRIPT), *_flags(options)]
    env = {**os.environ, "CRASH_TEST_CONTROL": str(folder / "control"), **env}
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        return subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=folder, start_new_session=True)


def _wait_until(process: subprocess.Popen, folder: Path, done) -> None:
    """Poll until `done()` holds; fail with the child's stderr if the child ends first."""
    while not done():
        if process.poll() is not None:
            pytest.fail(f"the training process ended ({process.returncode}) early:\n{_stderr(folder)[-4000:]}")
        time.sleep(0.05)


def _stderr(folder: Path) -> str:
    return (folder / "stderr").read_text()


def _losses(history: list[dict]) -> list[tuple]:
    return [(entry["step"], entry["loss"], entry["lr"], entry["grad_norm"]) for entry in history]


def _assert_same_weights(expected_folder: Path, actual_folder: Path) -> None:
    expected, actual = load_file(expected_folder / "model.safetensors"), load_file(actual_folder / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_micro_run_files(tmp_path_factory.mktemp("crash-files"))


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The uninterrupted run (one process): its arguments and results."""
    args = PretrainArguments(output_dir=str(tmp_path_factory.mktemp("reference") / "run"), **{**files, **RUN})
    results = pretrain(args)
    assert all("grad_norm" in entry and entry["grad_norm"] > 0 for entry in results["loss_history"])
    return args, results


def _resume(args: PretrainArguments, output_dir: Path) -> dict:
    return pretrain(dataclasses.replace(args, output_dir=str(output_dir), resume_from_checkpoint="latest"))


# --- SIGKILL ----------------------------------------------------------------------------------------------------


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_resumes_exactly(reference, files, tmp_path):
    args, full = reference
    output_dir = tmp_path / "run"
    process = _start(
        tmp_path,
        {"output_dir": str(output_dir), **files, **RUN},
        {"CRASH_TEST_PAUSE": "before_rename", "CRASH_TEST_STEP": "6"},
    )
    _wait_until(process, tmp_path, lambda: (tmp_path / "control" / "paused.0").exists())
    partial = output_dir / "checkpoints" / "step_6.partial"
    assert (partial / STATE_FILE).is_file()  # the save is complete but for its rename
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    root = output_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_6.partial"]
    assert resolve_checkpoint("latest", root) == root / "step_3"
    resumed = _resume(args, output_dir)
    assert resumed["resumed_from"] == str(root / "step_3")
    assert _losses(resumed["loss_history"]) == _losses(full["loss_history"])
    assert resumed["validation_loss"] == full["validation_loss"]
    _assert_same_weights(Path(args.output_dir), output_dir)
    assert [p.name for p in list_checkpoints(root)] == ["step_3", "step_6"]
    assert not partial.exists()  # the next save cleared the leftover


class _Tokenizer:
    """Stands in for a tokenizer: `save_pretrained` writes one file."""

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "tokenizer.json").write_text("{}")


@pytest.fixture
def prepared(tmp_path):
    """A prepared micro model, optimizer and scheduler after one step, and the run arguments of `tmp_path/run`."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = SonettForCausalLM(config_from_preset({**MICRO_PRESET, "vocab_size": 300}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ids = torch.randint(0, 300, (2, 16))
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    scheduler.step()
    args = PretrainArguments(output_dir=str(tmp_path / "run"), report_to="none")
    return accelerator, args


class _CrashError(Exception):
    pass


def _save_crashing_at_line(accelerator, state, args, line: int) -> bool:
    """Save, raising `_CrashError` at the `line`-th line executed in sonett/checkpointing.py. True if it crashed."""
    executed = 0
    target = checkpointing.__file__

    def in_checkpointing(frame, event, arg):
        nonlocal executed
        if event == "line":
            executed += 1
            if executed == line:
                raise _CrashError
        return in_checkpointing

    def on_call(frame, event, arg):
        return in_checkpointing if frame.f_code.co_filename == target else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        save_checkpoint(accelerator, _Tokenizer(), state, args)
    except _CrashError:
        return True
    finally:
        sys.settrace(previous)
    return False


def _marker(folder: Path) -> str:
    return json.loads((folder / STATE_FILE).read_text())["history"][0]["marker"]


def test_a_crash_between_any_two_lines_of_a_save_never_leaves_a_damaged_checkpoint(prepared, tmp_path):
    """A save of step 3 over an older step_3 (a rerun into the same output_dir), pruning to the newest 2: a crash
    at every line in turn; after each, every step_N folder is complete and `latest` is the old or the new step_3 or
    (while the old one is being replaced) step_2, and the next save cleans up."""
    accelerator, args = prepared
    template = tmp_path / "template"
    for step in (1, 2, 3):
        save_checkpoint(
            accelerator,
            _Tokenizer(),
            TrainState(step=step, history=[{"marker": "old"}]),
            dataclasses.replace(args, output_dir=str(template)),
        )
    new_state = TrainState(step=3, history=[{"marker": "new"}])
    limited = dataclasses.replace(args, checkpoints_total_limit=2)
    root = Path(args.output_dir) / "checkpoints"
    seen = set()
    line = 0
    while True:
        line += 1
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template / "checkpoints", root)
        if not _save_crashing_at_line(accelerator, new_state, limited, line):
            break
        for folder in list_checkpoints(root):  # every step_N folder is complete
            checkpointing.read_checkpoint(folder)
        assert {p.name for p in list_checkpoints(root)} <= {"step_1", "step_2", "step_3"}
        latest = resolve_checkpoint("latest", root)
        state = (latest.name, _marker(latest), (root / "step_1").exists())
        assert state[:2] in {("step_3", "old"), ("step_2", "old"), ("step_3", "new")}
        seen.add(state)
        save_checkpoint(accelerator, _Tokenizer(), new_state, limited)  # the next save recovers
        assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]
        assert _marker(root / "step_3") == "new"
    assert line > 40  # every line of the save was a crash point
    # the crashes hit every phase: before the replace, inside it, after the rename but before the pruning
    assert {("step_3", "old", True), ("step_2", "old", True), ("step_3", "new", True), ("step_3", "new", False)} <= seen
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]


def test_every_file_and_folder_is_fsynced_before_the_rename(prepared, monkeypatch):
    accelerator, args = prepared
    synced, renames = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        stat = os.fstat(fd)
        synced.append((stat.st_dev, stat.st_ino))
        real_fsync(fd)

    def replace(source, target):
        source, target = Path(source), Path(target)
        if source.name.endswith(".partial"):
            paths = [source, *source.rglob("*")]
            renames.append({p.relative_to(source) for p in paths if (p.stat().st_dev, p.stat().st_ino) not in synced})
        real_replace(source, target)
        synced.clear()  # what follows the rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = save_checkpoint(accelerator, _Tokenizer(), TrainState(step=1), args)
    assert renames == [set()]  # one rename, after every file and folder was fsynced
    written = set(json.loads((final / STATE_FILE).read_text())["files"])
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "tokenizer/tokenizer.json"} <= written
    parent = final.parent.stat()
    assert (parent.st_dev, parent.st_ino) in synced  # the rename itself made durable


# --- SIGINT and SIGTERM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_the_current_step_and_the_resumed_run_is_exact(reference, files, tmp_path, signum):
    """The signal arrives during the step-3 save; the run stops after step 4 (not a checkpointing step) with a
    checkpoint of it, exits with 128 + the signal number and says how to resume."""
    args, full = reference
    output_dir = tmp_path / "run"
    process = _start(
        tmp_path,
        {"output_dir": str(output_dir), **files, **RUN},
        {"CRASH_TEST_PAUSE": "after_save", "CRASH_TEST_STEP": "3"},
    )
    _wait_until(process, tmp_path, lambda: (tmp_path / "control" / "paused.0").exists())
    process.send_signal(signum)
    name = signal.Signals(signum).name
    _wait_until(process, tmp_path, lambda: f"got {name}: finishing" in _stderr(tmp_path))
    (tmp_path / "control" / "go").touch()
    assert process.wait() == 128 + signum
    stderr = _stderr(tmp_path)
    root = output_dir / "checkpoints"
    assert f"Stopped by {name} after optimizer step 4; saved checkpoint {root / 'step_4'}" in stderr
    assert "--resume_from_checkpoint latest" in stderr
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]
    assert not (output_dir / "model.safetensors").exists()  # stopped, not finished

    resumed = _resume(args, output_dir)
    assert resumed["resumed_from"] == str(root / "step_4")
    assert _losses(resumed["loss_history"]) == _losses(full["loss_history"])
    assert resumed["validation_loss"] == full["validation_loss"]
    _assert_same_weights(Path(args.output_dir), output_dir)


def test_a_stop_in_process_raises_training_interrupted(files, tmp_path, monkeypatch):
    """`pretrain` called from Python: the stop is a KeyboardInterrupt carrying the step, checkpoint and exit code;
    it saves even with checkpointing off, and the handlers are restored afterwards."""
    build = training.build_model

    def build_and_signal(architecture, config):  # a SIGTERM during the forward of the 3rd micro-batch (step 2)
        model = build(architecture, config)
        calls = [0]

        def hook(module, inputs, output):
            calls[0] += module.training
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(training, "build_model", build_and_signal)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    args = PretrainArguments(output_dir=str(tmp_path / "run"), **{**files, **RUN, "checkpointing_steps": 0})
    with pytest.raises(TrainingInterrupted) as stopped:
        pretrain(args)
    assert isinstance(stopped.value, KeyboardInterrupt)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    assert (stopped.value.step, stopped.value.checkpoint, stopped.value.exit_code) == (2, checkpoint, 143)
    assert [p.name for p in list_checkpoints(checkpoint.parent)] == ["step_2"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_two_processes_skip_together_and_stop_together(reference, files, tmp_path):
    """`accelerate launch`, 2 processes: rank 1 alone gets a NaN loss in step 2, and both skip it; a Ctrl-C (SIGINT
    to the launcher's process group; the launcher forwards it to each worker) during the step-3 save stops both after
    step 4 with one checkpoint. The resumed 2-process run matches one process with the same
    global batch, given the same skipped step."""
    args, _ = reference
    output_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG)]
    options = {"output_dir": str(output_dir), **files, **RUN, "batch_size": 2}
    env = {
        "CRASH_TEST_PAUSE": "after_save",
        "CRASH_TEST_STEP": "3",
        "CRASH_TEST_NAN_MICRO": "3",  # the first micro-batch of step 2
        "CRASH_TEST_NAN_RANK": "1",
        "OMP_NUM_THREADS": "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600",  # the launcher's grace period for the workers to save
    }
    process = _start(tmp_path, options, env, launcher)
    control = tmp_path / "control"
    _wait_until(process, tmp_path, lambda: (control / "paused.0").exists() and (control / "paused.1").exists())
    os.killpg(process.pid, signal.SIGINT)
    _wait_until(process, tmp_path, lambda: _stderr(tmp_path).count("got SIGINT: finishing") == 2)
    (control / "go").touch()
    process.wait()
    stderr = _stderr(tmp_path)
    assert process.returncode != 0, stderr[-4000:]
    root = output_dir / "checkpoints"
    assert stderr.count(f"Stopped by SIGINT after optimizer step 4; saved checkpoint {root / 'step_4'}") == 2
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]
    saved = checkpointing.read_checkpoint(root / "step_4")
    assert (saved["step"], saved["num_processes"]) == (4, 2)
    assert [entry.get("skipped", False) for entry in saved["history"]] == [False, True, False, False]
    assert "step 2: non-finite loss nan" in stderr

    command = [*launcher, str(TRAIN_SCRIPT), *_flags({**options, "resume_from_checkpoint": "latest"})]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads((output_dir / "training_results.json").read_text())

    one_args = dataclasses.replace(args, output_dir=str(tmp_path / "one"), batch_size=4)
    with _NanAtMicroBatch(3):
        one = pretrain(one_args)
    assert two["skipped_steps"] == one["skipped_steps"] == 1
    for single, double in zip(one["loss_history"], two["loss_history"], strict=True):
        assert double.get("skipped") == single.get("skipped")
        if not single.get("skipped"):
            assert double["loss"] == pytest.approx(single["loss"], abs=1e-5)
            assert double["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
        assert double["lr"] == pytest.approx(single["lr"], abs=1e-12)
    weights_one, weights_two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(output_dir / "model.safetensors"),
    )
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=0, msg=name)


# --- non-finite steps -------------------------------------------------------------------------------------------


class _NanAtMicroBatch:
    """Within the block, `pretrain`'s model makes the k-th training micro-batch non-finite: its loss NaN
    (`kind="loss"`), or its loss finite and its gradients infinite (`kind="grad"`); `every_after` repeats it for
    every later micro-batch. `models` collects the models built."""

    def __init__(self, micro_batch: int, kind: str = "loss", every_after: bool = False) -> None:
        self.micro_batch, self.kind, self.every_after = micro_batch, kind, every_after
        self.models: list[torch.nn.Module] = []

    def __enter__(self):
        self.build = training.build_model
        training.build_model = self._build
        return self

    def __exit__(self, *exc_info):
        training.build_model = self.build

    def _build(self, architecture, config):
        model = self.build(architecture, config)
        calls = [0]

        def hook(module, inputs, output):
            if not module.training:
                return output
            calls[0] += 1
            if calls[0] == self.micro_batch or (self.every_after and calls[0] > self.micro_batch):
                if self.kind == "loss":
                    output.loss = output.loss * float("nan")
                else:
                    output.logits.register_hook(lambda grad: grad * float("inf"))
            return output

        model.register_forward_hook(hook)
        self.models.append(model)
        return model


def _all_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_and_never_reaches_the_weights(reference, tmp_path, kind):
    """The second of the two accumulated micro-batches of step 2 gets a NaN loss, or a finite loss with infinite
    gradients: the whole step is skipped (weights, optimizer state and learning rate stay as after step 1), it is
    logged, and training goes on."""
    args, full = reference
    run_args = dataclasses.replace(args, output_dir=str(tmp_path / "run"), max_steps=4, checkpointing_steps=1)
    with _NanAtMicroBatch(4, kind) as injected:
        results = pretrain(run_args)
    history = results["loss_history"]
    assert [entry.get("skipped", False) for entry in history] == [False, True, False, False]
    assert results["skipped_steps"] == 1
    if kind == "loss":
        assert math.isnan(history[1]["loss"])
    else:
        assert history[1]["loss"] == full["loss_history"][1]["loss"]  # the loss was fine, the gradients not
    assert not math.isfinite(history[1]["grad_norm"])
    assert _losses(history[:1]) == _losses(full["loss_history"][:1])
    assert history[1]["lr"] == history[0]["lr"] != history[2]["lr"]  # the warmup waited for the skipped step
    root = tmp_path / "run" / "checkpoints"
    _assert_same_weights(root / "step_1", root / "step_2")
    with weights_only_torch_load():
        before, after = torch.load(root / "step_1" / "optimizer.bin"), torch.load(root / "step_2" / "optimizer.bin")
    assert before["state"].keys() == after["state"].keys()
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after["state"][index][key]), (index, key)
    assert _all_finite(injected.models[0])
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "model.safetensors").values())
    assert history[-1]["loss"] < history[0]["loss"]  # it went on training


def test_nan_policy_stop_raises_naming_the_step_and_the_fixes(reference, tmp_path):
    args, _ = reference
    run_args = dataclasses.replace(args, output_dir=str(tmp_path / "run"), nan_policy="stop")
    with _NanAtMicroBatch(5) as injected, pytest.raises(NonFiniteLossError) as error:
        pretrain(run_args)
    message = str(error.value)
    assert message.startswith("Optimizer step 3 had a non-finite loss or gradient norm (loss nan")
    for fix in ("--learning_rate", "--mixed_precision bf16", "--max_grad_norm", "--nan_policy skip"):
        assert fix in message
    assert _all_finite(injected.models[0])


def test_too_many_skips_in_a_row_stop_the_run(reference, tmp_path):
    args, _ = reference
    run_args = dataclasses.replace(args, output_dir=str(tmp_path / "run"), nan_skip_limit=3)
    with _NanAtMicroBatch(3, every_after=True) as injected, pytest.raises(NonFiniteLossError) as error:
        pretrain(run_args)
    assert str(error.value).startswith(
        "3 optimizer steps in a row (the last: step 4) were skipped, the limit of --nan_skip_limit 3."
    )
    assert _all_finite(injected.models[0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"nan_policy": "ignore"}, "nan_policy must be one of"), ({"nan_skip_limit": 0}, "nan_skip_limit must be")],
)
def test_bad_nan_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        PretrainArguments(**overrides)


# --- safe loading -----------------------------------------------------------------------------------------------


def test_resuming_unpickles_every_file_with_weights_only(prepared, monkeypatch):
    accelerator, args = prepared
    folder = save_checkpoint(accelerator, _Tokenizer(), TrainState(step=1), args)
    calls = []
    real_load = torch.load

    def spy(f, *positional, **kwargs):
        calls.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *positional, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(accelerator, folder)
    assert {name for name, _ in calls} == {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
    assert all(weights_only is True for _, weights_only in calls)
    with weights_only_torch_load(), pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        torch.load(folder / "optimizer.bin", weights_only=False)  # e.g. accelerate's load_custom_state


class _RunsCode:
    """Unpickled by a full unpickler, this creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_checkpoint_file_that_would_run_code_is_refused(prepared, tmp_path, name):
    accelerator, args = prepared
    folder = save_checkpoint(accelerator, _Tokenizer(), TrainState(step=1), args)
    marker = tmp_path / "code-ran"
    torch.save(_RunsCode(marker), folder / name)
    state = json.loads((folder / STATE_FILE).read_text())
    state["files"][name] = (folder / name).stat().st_size  # sizes match: only the unpickling can refuse it
    (folder / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(UnsafeCheckpointError, match=rf"{name} holds pickled Python objects.*Unsupported global"):
        load_checkpoint(accelerator, resolve_checkpoint("latest", folder.parent))
    assert not marker.exists()
    torch.load(folder / name, weights_only=False)  # the payload is real: a full unpickler runs it
    assert marker.exists()

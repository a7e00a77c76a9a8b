"""Resumable, crash-safe checkpoints of the pretraining loop (`sonett.training.pretraining.pretrain`).

A checkpoint is a folder `output_dir/checkpoints/step_N` holding `accelerator.save_state` (weights, optimizer,
scheduler, RNG states), the tokenizer and `trainer_state.json` (step, data position, history, every file and its
size). Guarantees:

- **Atomic.** Everything is written into `step_N.partial`; `trainer_state.json` comes last; every file and folder is
  fsynced; only then is the folder renamed to `step_N` and the parent folder fsynced. A folder named `step_N` is
  therefore complete at every instant, even after a SIGKILL or a power loss at any moment of a save. Folders that
  are replaced or pruned are first renamed to `*.deleting`, then deleted. `--resume_from_checkpoint latest` ignores
  `.partial` and `.deleting` folders and checks every file's size against `trainer_state.json`.
- **Same inputs.** Each checkpoint stores the sha256 of the model config as used (the preset's values, comments
  dropped) and of every data file (`inputs`). Resuming after the preset was edited in place or a data file changed is
  refused, naming the config fields or the file (size and hash before and after), unless `--allow_changed_inputs`
  (then a warning names what changed). A checkpoint written before the hashes were stored resumes with a warning.
- **Checked state.** A `trainer_state.json` that is not valid JSON, lacks a key the loop reads or holds a value of
  the wrong type or range is a damaged checkpoint, like a missing file.
- **Safe to load.** Resuming unpickles the optimizer, scheduler and RNG files with `torch.load(weights_only=True)`
  only (tensors, numbers, strings, containers and numpy arrays), so a checkpoint file cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from sonett.extras import requires_extra

with requires_extra("train"):
    from accelerate import Accelerator
    from accelerate.utils import load as accelerate_load

from sonett.model.cache_sonett import fsync_path
from sonett.training.arguments import PretrainArguments

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
TOKENIZER_DIR = "tokenizer"
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; renamed to step_N when complete
DELETING_SUFFIX = ".deleting"  # a checkpoint being deleted (renamed first, so no step_N is ever half-deleted)
CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
RNG_STATE_FILE = "random_states_{}.pkl"  # accelerate's per-process RNG file
HASH_BLOCK_BYTES = 1 << 20  # data files are hashed in blocks of this size, so a large file costs no memory
# Arguments a resumed run must share with the run that saved the checkpoint, or the data order / optimisation differ.
RESUME_MUST_MATCH = (
    "architecture",
    "config",
    "data_files",
    "dataset_name",
    "text_column",
    "streaming",
    "shuffle_buffer",
    "tokenizer",
    "tokenizer_max_documents",
    "vocab_size",
    "block_size",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "gate_lr_multiplier",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "validation_fraction",
    "max_documents",
    "activation_checkpointing",
    "seed",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickled Python object other than plain tensors, numbers and containers."""


@dataclass
class TrainState:
    """Where a run stands: optimizer steps, the data position, and what it measured so far."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process has taken from the current epoch
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)
    inputs: dict | None = None  # the content hashes of the config and data this run trains on (`input_fingerprint`)


def _checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """The `step_N` folders under `root`, oldest first (`.partial` and `.deleting` folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)), key=_checkpoint_step)


class _DamagedStateError(Exception):
    """What is wrong with a checkpoint's state file (turned into the checkpoint's "damaged" ValueError)."""


def _value(container: dict, key: str, kind: type | tuple[type, ...], where: str, minimum: int | None = None):
    """`container[key]`, checked to be of type `kind` (a bool is no number) and at least `minimum`."""
    if key not in container:
        raise _DamagedStateError(f"{where} has no {key!r}")
    value = container[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _DamagedStateError(f"{where}: {key!r} is {type(value).__name__}, not {names}")
    if minimum is not None and value < minimum:
        raise _DamagedStateError(f"{where}: {key!r} is {value}, not {minimum} or more")
    return value


def _check_files(saved: object) -> dict[str, int]:
    """The `files` entry of a parsed state file: relative paths inside the checkpoint -> sizes."""
    if not isinstance(saved, dict):
        raise _DamagedStateError(f"{STATE_FILE} is not a JSON object")
    files = _value(saved, "files", dict, STATE_FILE)
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise _DamagedStateError(f"{STATE_FILE}: 'files' names {name!r}, a path outside the checkpoint")
        _value(files, name, int, f"{STATE_FILE} 'files'", minimum=0)
    return files


def _check_state(saved: dict) -> None:
    """Every key of a parsed state file that `pretrain` reads, with its type and range."""
    for name in ("step", "epoch", "batches_in_epoch", "tokens_seen"):
        _value(saved, name, int, STATE_FILE, minimum=0)
    for index, entry in enumerate(_value(saved, "history", list, STATE_FILE)):
        where = f"{STATE_FILE} 'history'[{index}]"
        if not isinstance(entry, dict):
            raise _DamagedStateError(f"{where} is {type(entry).__name__}, not dict")
        for key, kind in (("step", int), ("loss", (int, float))):
            if key in entry:
                _value(entry, key, kind, where)
    _value(saved, "num_processes", int, STATE_FILE, minimum=1)
    _value(_value(saved, "arguments", dict, STATE_FILE), "max_steps", int, f"{STATE_FILE} 'arguments'", minimum=1)
    inputs = saved.get("inputs")
    if inputs is not None:  # absent in checkpoints written before the hashes were stored
        where = f"{STATE_FILE} 'inputs'"
        if not isinstance(inputs, dict):
            raise _DamagedStateError(f"{where} is {type(inputs).__name__}, not dict")
        config = _value(inputs, "config", dict, where)
        _value(config, "sha256", str, f"{where} 'config'")
        _value(config, "values", dict, f"{where} 'config'")
        for index, entry in enumerate(_value(inputs, "data_files", list, where)):
            entry_where = f"{where} 'data_files'[{index}]"
            if not isinstance(entry, dict):
                raise _DamagedStateError(f"{entry_where} is {type(entry).__name__}, not dict")
            _value(entry, "path", str, entry_where)
            _value(entry, "size", int, entry_where, minimum=0)
            _value(entry, "sha256", str, entry_where)


def read_checkpoint(path: str | Path) -> dict:
    """The `trainer_state.json` of a complete checkpoint folder.

    Raises ValueError when the folder is half-written: a `.partial` folder an interrupted save left behind, no
    state file, or a file the state lists that is missing or has another size; and when it is damaged: a state
    file that is not valid JSON or lacks a key `pretrain` reads, or holds a value of the wrong type or range.
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(
            f"{path} is a half-written checkpoint (a save was interrupted); resume from a complete step_N folder "
            "and delete this one."
        )
    if path.name.endswith(DELETING_SUFFIX):
        raise ValueError(
            f"{path} is a checkpoint that was being deleted (pruned or replaced); resume from a complete step_N "
            "folder and delete this one."
        )
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ValueError(
            f"{path} is not a complete checkpoint: it has no {STATE_FILE} (half-written, or not written by "
            "sonett.training.pretraining.pretrain)."
        )
    damaged = f"Checkpoint {path} is damaged: {{}}. Resume from another checkpoint."
    try:
        saved = json.loads(state_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(damaged.format(f"{STATE_FILE} is not valid JSON ({error})")) from None
    try:
        files = _check_files(saved)
    except _DamagedStateError as error:
        raise ValueError(damaged.format(error)) from None
    problems = []
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, {size} were written")
    if problems:
        raise ValueError(damaged.format("; ".join(problems)))
    try:
        _check_state(saved)
    except _DamagedStateError as error:
        raise ValueError(damaged.format(error)) from None
    return saved


def resolve_checkpoint(spec: str, root: str | Path) -> Path:
    """The checkpoint folder `--resume_from_checkpoint spec` names, checked complete.

    Args:
        spec: `latest` (the newest `step_N` under `root`) or a checkpoint folder.
        root: the run's checkpoint folder, `output_dir/checkpoints`.
    """
    root = Path(root)
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(
                f"Checkpoint folder {spec} does not exist; give a step_N folder under an output_dir/checkpoints, "
                "or `latest`."
            )
        read_checkpoint(path)
        return path
    checkpoints = list_checkpoints(root)
    partial = sorted(p.name for p in root.glob(f"*{PARTIAL_SUFFIX}")) if root.is_dir() else []
    if not checkpoints:
        found = f"; half-written (interrupted saves): {partial}" if partial else ""
        raise FileNotFoundError(
            f"--resume_from_checkpoint latest found no checkpoint in {root}{found}. Save some with "
            "--checkpointing_steps N, or start without --resume_from_checkpoint."
        )
    latest = checkpoints[-1]
    if partial:
        logger.warning("ignoring half-written checkpoints %s in %s; resuming from %s", partial, root, latest.name)
    read_checkpoint(latest)
    return latest


def check_resumable(saved: dict, args: PretrainArguments, num_processes: int) -> None:
    """Raise unless `args` continue the run that saved `saved`: same data, order and optimisation settings."""
    before = saved["arguments"]
    differing = [
        f"{name} ({before.get(name)!r} -> {getattr(args, name)!r})"
        for name in RESUME_MUST_MATCH
        if before.get(name) != getattr(args, name)
    ]
    if saved["num_processes"] != num_processes:
        differing.append(f"number of processes ({saved['num_processes']} -> {num_processes})")
    if differing:
        raise ValueError(
            "The checkpoint was saved by a run with other settings, so resuming would not continue it: "
            f"{', '.join(differing)}. Resume with the original settings."
        )
    if before["max_steps"] != args.max_steps:
        logger.warning(
            "max_steps changed from %d to %d: the cosine schedule changes", before["max_steps"], args.max_steps
        )


# ---------------------------------------------------------------------------------------------------------------
# Content hashes of the inputs


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes, read in blocks of `HASH_BLOCK_BYTES`: constant memory for any size."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def local_dataset_files(dataset_name: str | None) -> list[str]:
    """Every file under `dataset_name` when it names a local folder (which `load_dataset` reads), sorted; else []."""
    if not dataset_name or not Path(dataset_name).is_dir():
        return []  # a Hub dataset is compared by name (check_resumable)
    return sorted(str(path) for path in Path(dataset_name).rglob("*") if path.is_file())


def input_fingerprint(config_values: dict, data_files: list[str]) -> dict:
    """What a run trains: the model config values as used and every data file, by content.

    Args:
        config_values: the preset's values that make the model config (comment keys dropped).
        data_files: the local data files, including those of a local `--dataset_name` folder
            (`local_dataset_files`); a missing one is left out: the corpus loader refuses it.

    Returns:
        `{"config": {"sha256", "values"}, "data_files": [{"path", "size", "sha256"}, ...]}`, stored in every
        checkpoint (`trainer_state.json` `inputs`) and compared on resume (`check_inputs`).
    """
    canonical = json.dumps(config_values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    files = [
        {"path": name, "size": Path(name).stat().st_size, "sha256": file_sha256(name)}
        for name in data_files
        if Path(name).is_file()
    ]
    config = {"sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(), "values": config_values}
    return {"config": config, "data_files": files}


def _short(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def changed_inputs(before: dict, now: dict) -> list[str]:
    """What differs between two `input_fingerprint`s: the config fields (old -> new), each changed data file."""
    changes = []
    if before["config"]["sha256"] != now["config"]["sha256"]:
        old, new = before["config"]["values"], now["config"]["values"]
        unset = object()
        fields = [
            f"{key} ({_short(old.get(key, '<unset>'))} -> {_short(new.get(key, '<unset>'))})"
            for key in sorted(set(old) | set(new))
            if old.get(key, unset) != new.get(key, unset)
        ]
        changes.append(f"the model config: {', '.join(fields) or 'its values'}")
    saved_files = {entry["path"]: entry for entry in before["data_files"]}
    now_files = {entry["path"] for entry in now["data_files"]}
    for entry in now["data_files"]:
        was = saved_files.get(entry["path"])
        if was is None:  # only a local dataset folder can gain files: other name lists are refused earlier
            changes.append(f"data file {entry['path']} (added, {entry['size']:,} bytes)")
        elif (was["sha256"], was["size"]) != (entry["sha256"], entry["size"]):
            changes.append(
                f"data file {entry['path']} ({was['size']:,} bytes, sha256 {was['sha256'][:16]} -> "
                f"{entry['size']:,} bytes, sha256 {entry['sha256'][:16]})"
            )
    changes += [f"data file {path} (removed)" for path in saved_files if path not in now_files]
    return changes


def check_inputs(saved: dict, inputs: dict, allow_changed: bool, checkpoint: str | Path) -> None:
    """Raise unless the config and data files have the contents they had when checkpoint `saved` was written.

    With `allow_changed`, a change is logged as a warning instead. A checkpoint written before the hashes were
    stored (no `inputs`) resumes with a warning: its inputs cannot be compared.
    """
    if saved.get("inputs") is None:
        logger.warning(
            "checkpoint %s has no content hashes of the model config and data files (written by an older version): "
            "resuming without checking that they are unchanged; the checkpoints of this run will have them",
            checkpoint,
        )
        return
    changes = changed_inputs(saved["inputs"], inputs)
    if not changes:
        return
    what = "; ".join(changes)
    if allow_changed:
        logger.warning(
            "--allow_changed_inputs: resuming from %s although these changed since it was saved: %s. The run no "
            "longer continues the one that saved the checkpoint.",
            checkpoint,
            what,
        )
        return
    raise ValueError(
        f"The inputs changed since checkpoint {checkpoint} was saved: {what}. Resuming would train on other inputs "
        "than the run that saved it, and its model folder would describe a model that was not trained that way. "
        "Restore the original files, or start a new run in another --output_dir, or pass --allow_changed_inputs "
        "to continue on the changed inputs anyway."
    )


# ---------------------------------------------------------------------------------------------------------------
# Durable writes


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first, `folder` itself last."""
    paths = sorted(folder.rglob("*"))
    for path in paths:
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in paths if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def _delete(folder: Path) -> None:
    """Delete a checkpoint folder: rename it to `*.deleting` first, so a crash never leaves a half-deleted step_N."""
    doomed = folder.with_name(folder.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    fsync_path(folder.parent)
    shutil.rmtree(doomed)


def _publish(partial: Path, final: Path) -> None:
    """Rename the complete, fsynced `partial` folder to `final` (replacing an older `final`) and make it durable."""
    if final.exists():  # left by an earlier run into the same output_dir
        _delete(final)
    os.replace(partial, final)
    fsync_path(final.parent)


def _remove_leftovers(root: Path) -> None:
    """Delete the `.partial` and `.deleting` folders that interrupted saves and deletions left in `root`."""
    for leftover in sorted(root.glob(f"*{PARTIAL_SUFFIX}")) + sorted(root.glob(f"*{DELETING_SUFFIX}")):
        logger.info("removing %s, left by an interrupted save", leftover)
        shutil.rmtree(leftover)


def save_checkpoint(
    accelerator: Accelerator,
    tokenizer: PreTrainedTokenizerBase,
    state: TrainState,
    args: PretrainArguments,
) -> Path:
    """Save a resumable checkpoint to `output_dir/checkpoints/step_N`, atomically and durably; prune old ones.

    Every process writes into `step_N.partial` (`accelerator.save_state`: weights, optimizer, scheduler, RNG
    states); the main process adds the tokenizer, fsyncs every file, writes `trainer_state.json` (which lists every
    file and its size) last, fsyncs it and the folders, and renames the folder to `step_N`. Then only the newest
    `checkpoints_total_limit` checkpoints are kept. The checkpoint folder must lie on a file system all processes
    share.
    """
    root = Path(args.output_dir) / CHECKPOINTS_DIR
    final = root / f"step_{state.step}"
    partial = root / f"step_{state.step}{PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        if not root.is_dir():
            root.mkdir(parents=True)
            fsync_path(root.parent)
        _remove_leftovers(root)
        partial.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokenizer.save_pretrained(partial / TOKENIZER_DIR)
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        saved = {**asdict(state), "num_processes": accelerator.num_processes, "arguments": asdict(args), "files": files}
        with open(partial / STATE_FILE, "w") as handle:
            handle.write(json.dumps(saved, indent=1) + "\n")
        _fsync_tree(partial)
        _publish(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(root)[: -args.checkpoints_total_limit]:
                _delete(old)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------
# Safe loading


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block, every `torch.load` call uses `weights_only=True` (torch's restricted unpickler).

    A call that asks for `weights_only=False` (a library code path that wants full unpickling) is refused with
    `UnsafeCheckpointError`; a file holding other objects fails with `UnsafeCheckpointError` naming the file.
    """
    original = torch.load

    def load(f, *args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise UnsafeCheckpointError(
                f"Refusing to unpickle {f} with torch.load(weights_only=False), which can run code stored in the "
                "file. Resume only from checkpoints that sonett.training.pretraining.pretrain wrote with its own "
                "backend "
                "(DDP, FSDP); report the code path that asked for it."
            )
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            lines = str(error).splitlines()
            reason = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
            raise UnsafeCheckpointError(
                f"{f} holds pickled Python objects other than tensors, numbers, strings and containers, so it is "
                "not loaded (it could run code). Delete this checkpoint if you did not write it yourself, and "
                "resume from another one; if it comes from another library version, resume with the versions "
                f"in constraints.txt. torch said: {reason.strip()}"
            ) from error

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> None:
    """Load `accelerator.save_state`'s files of checkpoint `path` into the prepared objects, unpickling safely.

    Every unpickled file goes through `torch.load(weights_only=True)`. accelerate would skip an RNG file it cannot
    load with only an INFO log (the resumed run would then silently differ); it is checked first here.
    """
    path = Path(path)
    rng_file = path / RNG_STATE_FILE.format(accelerator.process_index)
    with weights_only_torch_load():
        if not rng_file.is_file():
            raise FileNotFoundError(
                f"{rng_file} is missing, so the resumed run could not continue the random streams; resume from a "
                "checkpoint saved with the same number of processes."
            )
        accelerate_load(rng_file)  # raises UnsafeCheckpointError instead of accelerate's silent skip
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})


__all__ = [
    "CHECKPOINTS_DIR",
    "PARTIAL_SUFFIX",
    "RESUME_MUST_MATCH",
    "STATE_FILE",
    "TOKENIZER_DIR",
    "TrainState",
    "UnsafeCheckpointError",
    "changed_inputs",
    "check_inputs",
    "check_resumable",
    "file_sha256",
    "input_fingerprint",
    "list_checkpoints",
    "load_checkpoint",
    "local_dataset_files",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "weights_only_torch_load",
]

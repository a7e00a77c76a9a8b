"""Pretraining loop for Sonett on Accelerate.

One function, `pretrain`, takes a `PretrainArguments` and runs: corpus -> tokenizer -> packed blocks ->
model from a preset -> AdamW (parameter groups) with a cosine schedule -> periodic validation, tracker logs and
checkpoints -> a Hub-ready folder. It runs unchanged on one CPU, one GPU or many processes under
`accelerate launch` (DDP, FSDP, DeepSpeed; configs in `configuration/accelerate/`).

Checkpoints (`output_dir/checkpoints/step_N`) hold `accelerator.save_state`, the tokenizer and
`trainer_state.json` (step, data position, loss history, the files written). A run resumed from one sees the same
data in the same order, so its losses equal those of the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, is_tensorboard_available, set_seed
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from .configuration_sonett import SonettConfig
from .data import (
    Corpus,
    EpochShuffleSampler,
    first_documents,
    load_corpus,
    pack_into_blocks,
    split_by_document,
    take_blocks,
)
from .hub import count_parameters, write_model_folder
from .modeling_sonett import SonettForCausalLM
from .tokenizer_training import train_bpe_tokenizer

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[2] / "configuration"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
TOKENIZER_DIR = "tokenizer"
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; renamed to step_N when complete
CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
MIXED_PRECISION = ("no", "bf16", "fp16")
STREAMING_TOKENIZER_DOCUMENTS = 20_000
# Arguments a resumed run must share with the run that saved the checkpoint, or the data order / optimisation differ.
RESUME_MUST_MATCH = (
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


@dataclass
class PretrainArguments:
    """Settings of one pretraining run; every field is also a `scripts/train.py` flag."""

    config: str = field(default="sonett-tiny", metadata={"help": "a preset name in configuration/ or a JSON file"})
    output_dir: str = field(default="runs/sonett-tiny", metadata={"help": "the Hub-ready model folder to write"})
    data_files: list[str] = field(
        default_factory=list, metadata={"help": "local .txt/.jsonl/.json/.parquet files (default: the stdlib source)"}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset name (online); split `train`"})
    text_column: str = field(default="text", metadata={"help": "the column holding the documents"})
    streaming: bool = field(
        default=False, metadata={"help": "read the corpus lazily (IterableDataset) for corpora larger than memory"}
    )
    shuffle_buffer: int = field(default=10_000, metadata={"help": "with --streaming: blocks in the shuffle buffer"})
    tokenizer: str | None = field(default=None, metadata={"help": "a tokenizer folder; default: train a BPE"})
    tokenizer_max_documents: int | None = field(
        default=None,
        metadata={
            "help": f"train the BPE on at most this many documents (all; {STREAMING_TOKENIZER_DOCUMENTS:,} "
            "with --streaming)"
        },
    )
    vocab_size: int = 4096
    block_size: int = 256
    batch_size: int = field(default=16, metadata={"help": "blocks per process per micro-batch"})
    gradient_accumulation_steps: int = 1
    max_steps: int = field(default=800, metadata={"help": "optimizer steps"})
    learning_rate: float = 3e-3
    gate_lr_multiplier: float = field(
        default=1.0, metadata={"help": "learning-rate factor for gate parameters (memory and cross-attention gates)"}
    )
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    eval_steps: int = field(default=200, metadata={"help": "validate every N steps (0: only at the end)"})
    eval_blocks: int = 256
    validation_fraction: float = 0.02
    max_documents: int | None = None
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (autocast)"})
    activation_checkpointing: bool = False
    checkpointing_steps: int = field(default=0, metadata={"help": "save a resumable checkpoint every N steps (0: off)"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "`latest` (in output_dir/checkpoints) or a checkpoint folder"}
    )
    report_to: str = field(
        default="auto", metadata={"help": "tracker: tensorboard, none, another Accelerate tracker, or auto"}
    )
    cpu: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        positive = ("block_size", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_blocks")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("eval_steps", "checkpointing_steps", "warmup_steps", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}.")
        if self.gate_lr_multiplier <= 0:
            raise ValueError(f"gate_lr_multiplier must be positive, got {self.gate_lr_multiplier}.")
        if self.report_to == "auto":
            self.report_to = "tensorboard" if is_tensorboard_available() else "none"
        if self.report_to == "tensorboard" and not is_tensorboard_available():
            raise ValueError("--report_to tensorboard needs the tensorboard package: pip install tensorboard.")


def load_preset(name_or_path: str) -> dict:
    """A preset as a dict: a JSON file path, or a name in `configuration/` (e.g. `sonett-tiny`)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("sonett-*.json"))
        raise FileNotFoundError(f"No preset {name_or_path!r}; give a JSON file or one of {available}.")
    return json.loads(path.read_text())


def config_from_preset(preset: dict, **overrides) -> SonettConfig:
    """A `SonettConfig` from a preset dict (comment keys starting with `_` dropped), with `overrides` applied."""
    values = {k: v for k, v in preset.items() if not k.startswith("_") and k != "model_type"}
    return SonettConfig(**{**values, **overrides})


def build_config(preset: dict, tokenizer: PreTrainedTokenizerBase) -> SonettConfig:
    """The model config of a preset, with the vocabulary and special ids of `tokenizer`."""
    return config_from_preset(
        preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


GATE_PARAMETERS = ("attn_gate", "mlp_gate")  # the tanh gates of the cross-attention blocks
MEMORY_GATE_PARAMETERS = (".mixer.gate",)  # the per-head memory/local mixing gate of memory_attention layers
NO_DECAY_PARAMETERS = ("span_logit",)  # learned attention spans (adaptive span)


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    gate_lr: float | None = None,
    *,
    gate_names: tuple[str, ...] = GATE_PARAMETERS,
) -> list[dict]:
    """AdamW groups of the trainable parameters: decay on matrices; none on norms, biases, spans and other vectors.

    With `gate_lr`, the parameters whose names end with one of `gate_names` (default: the cross-attention tanh gates,
    which start at 0 and must open) get their own group at that learning rate, without weight decay.
    """
    decay, no_decay, gates = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if gate_lr is not None and name.endswith(gate_names):
            gates.append(param)
        elif param.dim() >= 2 and "norm" not in name and not name.endswith(NO_DECAY_PARAMETERS):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": gate_lr})
    return groups


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> tuple[float, int]:
    """Mean next-token loss over every predicted token of `loader`, and the number of those tokens.

    Batches hold `input_ids` and `labels` (batch, seq); per-row sums are gathered with `gather_for_metrics`, so
    the rows Accelerate repeats to even out the last batch across processes are counted once.
    """
    model.eval()
    total_loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    total_tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits.float()  # (batch, seq, vocab)
        targets = batch["labels"][:, 1:]  # (batch, seq - 1)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        row_loss = losses.double().sum(dim=1)  # (batch,)
        row_tokens = (targets != -100).sum(dim=1).double()  # (batch,)
        row_loss, row_tokens = accelerator.gather_for_metrics((row_loss, row_tokens))
        total_loss += row_loss.sum()
        total_tokens += row_tokens.sum()
    model.train()
    return float(total_loss / total_tokens), int(total_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class TrainState:
    """Where a run stands: optimizer steps, the data position, and what it measured so far."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process has taken from the current epoch
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)


def _checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """The `step_N` folders under `root`, oldest first (half-written `.partial` folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)), key=_checkpoint_step)


def read_checkpoint(path: str | Path) -> dict:
    """The `trainer_state.json` of a complete checkpoint folder.

    Raises ValueError when the folder is half-written: a `.partial` folder an interrupted save left behind, no
    state file, or a file the state lists that is missing or has another size.
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(
            f"{path} is a half-written checkpoint (a save was interrupted); resume from a complete step_N folder "
            "and delete this one."
        )
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ValueError(
            f"{path} is not a complete checkpoint: it has no {STATE_FILE} (half-written, or not written by "
            "sonett.training.pretrain)."
        )
    saved = json.loads(state_file.read_text())
    problems = []
    for name, size in saved["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, {size} were written")
    if problems:
        raise ValueError(f"Checkpoint {path} is damaged: {'; '.join(problems)}. Resume from another checkpoint.")
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


def save_checkpoint(
    accelerator: Accelerator,
    tokenizer: PreTrainedTokenizerBase,
    state: TrainState,
    args: PretrainArguments,
) -> Path:
    """Save a resumable checkpoint to `output_dir/checkpoints/step_N`, atomically, and prune old ones.

    Every process writes into `step_N.partial` (`accelerator.save_state`: weights, optimizer, scheduler, RNG
    states); the main process adds the tokenizer and `trainer_state.json` (which lists every file and its size) and
    renames the folder to `step_N`. Then only the newest `checkpoints_total_limit` checkpoints are kept. The
    checkpoint folder must lie on a file system all processes share.
    """
    root = Path(args.output_dir) / CHECKPOINTS_DIR
    final = root / f"step_{state.step}"
    partial = root / f"step_{state.step}{PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokenizer.save_pretrained(partial / TOKENIZER_DIR)
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        saved = {
            **asdict(state),
            "num_processes": accelerator.num_processes,
            "arguments": asdict(args),
            "files": files,
        }
        (partial / STATE_FILE).write_text(json.dumps(saved, indent=1) + "\n")
        if final.exists():  # left by an earlier run into the same output_dir
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(root)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class PretrainData:
    """The tokenizer, the packed training blocks (loaded or streamed) and the validation blocks (in memory)."""

    tokenizer: PreTrainedTokenizerBase
    train_blocks: Corpus
    valid_blocks: Dataset
    description: str


def _tokenizer(
    args: PretrainArguments, accelerator: Accelerator, train: Corpus, preset: dict, checkpoint: Path | None
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, the one `--tokenizer` names, or a BPE trained on the training documents."""
    if checkpoint is not None:
        return AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR, trust_remote_code=True)
    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=True)
    limit = args.tokenizer_max_documents
    if limit is None and args.streaming:
        limit = STREAMING_TOKENIZER_DOCUMENTS
    if limit is None:
        texts = train[args.text_column]
    else:
        texts = (row[args.text_column] for row in first_documents(train, limit))
    with accelerator.main_process_first():
        return train_bpe_tokenizer(
            texts, vocab_size=args.vocab_size, model_max_length=preset.get("max_position_embeddings", 4096)
        )


def prepare_data(
    args: PretrainArguments, accelerator: Accelerator, preset: dict, checkpoint: Path | None = None
) -> PretrainData:
    """Load, split (whole documents held out by hash), tokenize and pack the corpus the arguments describe."""
    corpus = load_corpus(args.data_files or None, args.dataset_name, args.text_column, streaming=args.streaming)
    corpus = first_documents(corpus, args.max_documents)
    splits = split_by_document(corpus, args.validation_fraction, key="path", text_column=args.text_column)
    tokenizer = _tokenizer(args, accelerator, splits["train"], preset, checkpoint)
    with accelerator.main_process_first():
        train_blocks = pack_into_blocks(splits["train"], tokenizer, args.block_size, args.text_column)
        valid_blocks = pack_into_blocks(splits["validation"], tokenizer, args.block_size, args.text_column)
        valid_blocks = take_blocks(valid_blocks, args.eval_blocks)
    if args.streaming:
        train_blocks = train_blocks.shuffle(seed=args.seed, buffer_size=max(args.shuffle_buffer, 1))
    if args.data_files:
        description = ", ".join(args.data_files)
    else:
        description = args.dataset_name or "Python standard library source"
    return PretrainData(tokenizer, train_blocks, valid_blocks, description)


def make_train_loader(blocks: Corpus, args: PretrainArguments) -> DataLoader:
    """Micro-batches of `batch_size` blocks: a fresh seeded order per epoch (loaded) or the shuffled stream."""
    if isinstance(blocks, Dataset):
        if len(blocks) < args.batch_size:
            raise ValueError(
                f"The training split has {len(blocks)} blocks, fewer than one batch of {args.batch_size}; "
                "lower --batch_size or --block_size, or add data."
            )
        sampler = EpochShuffleSampler(len(blocks), args.seed)
        # the loader's own generator (it draws a worker seed per epoch) keeps the global RNG out of the data order
        generator = torch.Generator().manual_seed(args.seed)
        return DataLoader(
            blocks, args.batch_size, sampler=sampler, collate_fn=_collate, drop_last=True, generator=generator
        )
    return DataLoader(blocks, batch_size=args.batch_size, collate_fn=_collate, drop_last=True)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def make_accelerator(args: PretrainArguments) -> Accelerator:
    """An Accelerator for the run: precision, accumulation, trackers logging to `output_dir/logs`.

    The scheduler is stepped by hand once per optimizer step, so `max_steps` and `warmup_steps` count optimizer
    steps whatever the number of processes.
    """
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs"))
    return Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        step_scheduler_with_optimizer=False,
    )


def _tracker_config(args: PretrainArguments) -> dict:
    """The arguments as scalars and strings, which every tracker accepts as hyperparameters."""
    values = {}
    for item in fields(args):
        value = getattr(args, item.name)
        values[item.name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return values


def _final_model(accelerator: Accelerator, model: torch.nn.Module, config: SonettConfig) -> SonettForCausalLM | None:
    """The trained model, whole, on the main process (None elsewhere); sharded models (FSDP, ZeRO) are gathered."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = accelerator.get_state_dict(model)  # a collective: every process takes part
        if not accelerator.is_main_process:
            return None
        whole = SonettForCausalLM(config)
        whole.load_state_dict({k: v.float() for k, v in state_dict.items()})
        return whole
    return accelerator.unwrap_model(model) if accelerator.is_main_process else None


def pretrain(args: PretrainArguments) -> dict:
    """Run one pretraining job and write its folder to `args.output_dir`. Returns the measured results."""
    started = time.perf_counter()
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    preset = load_preset(args.config)
    checkpoint, state = None, TrainState()
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir) / CHECKPOINTS_DIR)
        saved = read_checkpoint(checkpoint)
        check_resumable(saved, args, accelerator.num_processes)
        state = TrainState(**{item.name: saved[item.name] for item in fields(TrainState)})
        logger.info("resuming from %s at step %d", checkpoint, state.step)
    data = prepare_data(args, accelerator, preset, checkpoint)

    config = build_config(preset, data.tokenizer)
    model = SonettForCausalLM(config)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    num_parameters = count_parameters(model)
    logger.info("model: %s parameters, layers %s", f"{num_parameters:,}", config.layer_types)

    loader = make_train_loader(data.train_blocks, args)
    valid_loader = DataLoader(data.valid_blocks, batch_size=args.batch_size, collate_fn=_collate)
    gate_lr = args.learning_rate * args.gate_lr_multiplier
    groups = parameter_groups(model, args.weight_decay, gate_lr, gate_names=GATE_PARAMETERS + MEMORY_GATE_PARAMETERS)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed clips inside its own step
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    model, optimizer, loader, valid_loader, scheduler = accelerator.prepare(
        model, optimizer, loader, valid_loader, scheduler
    )
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
    if args.report_to != "none":
        accelerator.init_trackers("pretrain", config=_tracker_config(args))

    model.train()
    tokens_at_start = state.tokens_seen
    progress = tqdm(
        total=args.max_steps, initial=state.step, desc="pretrain", disable=not accelerator.is_local_main_process
    )
    train_started = time.perf_counter()
    micro_losses: list[torch.Tensor] = []
    while state.step < args.max_steps:
        loader.set_epoch(state.epoch)
        epoch_loader = (
            accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        )
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            state.tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            loss_value = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            micro_losses = []
            lr = scheduler.get_last_lr()[0]
            state.history.append({"step": state.step, "loss": loss_value, "lr": lr})
            logs = {"train/loss": loss_value, "train/learning_rate": lr}
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
            if args.eval_steps and state.step % args.eval_steps == 0 and state.step < args.max_steps:
                valid_loss, _ = evaluate_loss(model, valid_loader, accelerator)
                state.history[-1]["validation_loss"] = valid_loss
                logs["eval/loss"] = valid_loss
                logger.info("step %d: validation loss %.4f", state.step, valid_loss)
            accelerator.log(logs, step=state.step)
            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, data.tokenizer, state, args)
            if state.step >= args.max_steps:
                break
        else:  # the epoch ran out
            if state.batches_in_epoch == 0:
                raise ValueError("The training data gave no batch; lower --batch_size or --block_size, or add data.")
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()
    train_runtime = time.perf_counter() - train_started

    valid_loss, valid_tokens = evaluate_loss(model, valid_loader, accelerator)
    accelerator.log({"eval/loss": valid_loss, "eval/perplexity": math.exp(valid_loss)}, step=state.step)
    tokens_this_run = state.tokens_seen - tokens_at_start
    results = {
        "training_data": data.description,
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "batch_tokens": args.batch_size
        * args.block_size
        * args.gradient_accumulation_steps
        * accelerator.num_processes,
        "block_size": args.block_size,
        "learning_rate": args.learning_rate,
        "hardware": f"{accelerator.num_processes} x {accelerator.device.type} ({platform.machine()})",
        "precision": args.mixed_precision if args.mixed_precision != "no" else "fp32",
        "train_runtime": f"{train_runtime:.0f} s",
        "train_tokens_per_second": round(tokens_this_run / train_runtime, 1) if tokens_this_run else 0.0,
        "validation_loss": valid_loss,
        "validation_perplexity": math.exp(valid_loss),
        "validation_tokens": valid_tokens,
        "final_train_loss": state.history[-1]["loss"],
        "parameters": num_parameters,
        "arguments": asdict(args),
        "loss_history": state.history,
    }
    if checkpoint is not None:
        results["resumed_from"] = str(checkpoint)
    accelerator.wait_for_everyone()
    final = _final_model(accelerator, model, config)
    if final is not None:
        final.config.use_cache = True
        write_model_folder(final, data.tokenizer, args.output_dir, results, repo_id=args.output_dir)
    accelerator.wait_for_everyone()
    # Only the trackers end here: `accelerator.end_training()` would also destroy the process group under the
    # caller's feet, while the prepared model and loaders still hold it (a gloo run then hung at exit now and then).
    for tracker in accelerator.trackers:
        tracker.finish()
    results["total_runtime_seconds"] = round(time.perf_counter() - started, 1)
    return results


__all__ = [
    "PretrainArguments",
    "TrainState",
    "build_config",
    "check_resumable",
    "config_from_preset",
    "evaluate_loss",
    "list_checkpoints",
    "load_preset",
    "make_accelerator",
    "make_train_loader",
    "parameter_groups",
    "prepare_data",
    "pretrain",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

"""Pretraining loop for Sonett on Accelerate.

One function, `pretrain`, takes a `PretrainArguments` and runs: corpus -> tokenizer -> packed blocks ->
model from a preset -> AdamW (parameter groups) with a cosine schedule -> periodic validation, tracker logs and
checkpoints -> a Hub-ready folder. It runs unchanged on one CPU, one GPU or many processes under
`accelerate launch` (DDP, FSDP, DeepSpeed; configs in `configuration/accelerate/`).

Checkpoints (`output_dir/checkpoints/step_N`, written atomically by `sonett.training.checkpointing`) hold
`accelerator.save_state`, the tokenizer and `trainer_state.json` (step, data position, loss history, the files
written). A run resumed from one sees the same data in the same order, so its losses equal those of the
uninterrupted run.

Crash safety: SIGINT and SIGTERM during training stop the run after the current optimizer step, on every process
at the same step, with a checkpoint (`TrainingInterrupted`; `sonett train` exits with 128 + the signal number).
A step whose loss or gradient norm is not finite is never applied: `--nan_policy skip` steps over it (at most
`--nan_skip_limit` in a row), `--nan_policy stop` raises `NonFiniteLossError`.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sonett.extras import requires_extra

with requires_extra("train"):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from datasets import Dataset

from sonett.data.corpus import (
    Corpus,
    EpochShuffleSampler,
    first_documents,
    load_corpus,
    pack_into_blocks,
    split_by_document,
    split_long_documents,
    take_blocks,
)
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.evaluation.baselines import llama_config_matching
from sonett.hub.loading import load_tokenizer
from sonett.hub.saving import count_parameters, write_baseline_folder, write_model_folder
from sonett.model.configuration_sonett import SonettConfig
from sonett.model.modeling_sonett import SonettForCausalLM
from sonett.presets import build_config, load_preset, preset_values
from sonett.training.arguments import STREAMING_TOKENIZER_DOCUMENTS, PretrainArguments, check_output_dir
from sonett.training.checkpointing import (
    CHECKPOINTS_DIR,
    PARTIAL_SUFFIX,
    RESUME_MUST_MATCH,
    STATE_FILE,
    TOKENIZER_DIR,
    TrainState,
    UnsafeCheckpointError,
    check_inputs,
    check_resumable,
    input_fingerprint,
    list_checkpoints,
    load_checkpoint,
    local_dataset_files,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from sonett.training.optimization import create_optimizer, create_scheduler, parameter_groups

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    """The checkpoint's tokenizer, the one `--tokenizer` names, or a BPE trained on the training documents.

    A loaded tokenizer is data: no code of its folder runs, and a folder with code is refused (`sonett.hub.loading`).
    """
    if checkpoint is not None:
        return load_tokenizer(checkpoint / TOKENIZER_DIR, tokenizer_only=True)
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    limit = args.tokenizer_max_documents
    if limit is None and args.streaming:
        limit = STREAMING_TOKENIZER_DOCUMENTS
    if limit is None:
        texts = train[args.text_column]
    else:
        texts = (row[args.text_column] for row in first_documents(train, limit))
    with accelerator.main_process_first():
        return train_bpe_tokenizer(
            split_long_documents(texts),  # bounded memory for over-long documents, the same tokenizer
            vocab_size=args.vocab_size,
            model_max_length=preset.get("max_position_embeddings", 4096),
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
        train_blocks = pack_into_blocks(
            splits["train"], tokenizer, args.block_size, args.text_column, name="training split"
        )
        valid_blocks = pack_into_blocks(
            splits["validation"],
            tokenizer,
            args.block_size,
            args.text_column,
            name=f"validation split (the documents held out by --validation_fraction {args.validation_fraction})",
            remedy="raise --validation_fraction to hold out more documents, lower --block_size, or add data",
        )
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


def build_model(architecture: str, config: SonettConfig) -> PreTrainedModel:
    """A freshly initialised causal LM: Sonett of `config`, or the parameter-matched Llama baseline of it."""
    if architecture == "llama":
        return LlamaForCausalLM(llama_config_matching(config))
    return SonettForCausalLM(config)


def _final_model(
    accelerator: Accelerator, model: torch.nn.Module, architecture: str, config: SonettConfig
) -> PreTrainedModel | None:
    """The trained model, whole, on the main process (None elsewhere); sharded models (FSDP, ZeRO) are gathered."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = accelerator.get_state_dict(model)  # a collective: every process takes part
        if not accelerator.is_main_process:
            return None
        whole = build_model(architecture, config)
        whole.load_state_dict({k: v.float() for k, v in state_dict.items()})
        return whole
    return accelerator.unwrap_model(model) if accelerator.is_main_process else None


# ---------------------------------------------------------------------------------------------------------------
# Crash safety: stop signals and non-finite steps


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM after saving a checkpoint of its last optimizer step.

    A KeyboardInterrupt, so `except Exception` does not swallow a requested stop. `exit_code` is 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM), the status a shell reports for a process that signal ended;
    `sonett train` exits with it.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + int(signum)
        super().__init__(
            f"Stopped by {self.signal_name} after optimizer step {step}; saved checkpoint {checkpoint}. Continue "
            "with the same command plus --resume_from_checkpoint latest."
        )


class NonFiniteLossError(RuntimeError):
    """An optimizer step's loss or gradient norm was NaN or infinite, and `nan_policy` says to stop."""


class _StopSignals:
    """While active (main thread only), SIGINT and SIGTERM only record a request to stop after the current step.

    Repeated signals change nothing: a worker may get one from a job scheduler (Slurm's scancel signals every
    process) and again from `accelerate launch`, which forwards SIGINT and SIGTERM to its workers. SIGKILL aborts
    without saving; the last complete checkpoint stays usable.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("pretrain runs outside the main thread: SIGINT/SIGTERM end it without a checkpoint")
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received:
            logger.warning("got %s again: still stopping after the current optimizer step (SIGKILL aborts)", name)
        else:
            logger.warning("got %s: finishing the current optimizer step, then saving a checkpoint and stopping", name)
        self.received.append(signum)

    def flags(self) -> list[float]:
        """One 0/1 flag per signal of `STOP_SIGNALS`: whether this process received it."""
        return [float(signum in self.received) for signum in STOP_SIGNALS]


@dataclass
class _StepOutcome:
    """What one optimizer step did, the same on every process."""

    loss: float  # mean over the micro-batches and the processes
    grad_norm: float | None  # pre-clip total gradient norm (None where DeepSpeed does not report one)
    skipped: bool  # not applied: the loss or the gradient norm was not finite
    stop_signal: int | None  # a stop signal that some process received (SIGTERM wins over SIGINT)


def _as_float(value: torch.Tensor | float | None) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _nonfinite_message(step: int, loss: float, grad_norm: float | None, args: PretrainArguments) -> str:
    return (
        f"Optimizer step {step} had a non-finite loss or gradient norm (loss {loss}, gradient norm {grad_norm}); it "
        "was not applied, so the weights stay finite. Lower --learning_rate (or raise --warmup_steps), train in "
        "bf16 rather than fp16 (--mixed_precision bf16), clip harder with a smaller --max_grad_norm "
        f"(now {args.max_grad_norm}), or check the data of this step. To step over such batches, resume with "
        "--resume_from_checkpoint latest --nan_policy skip."
    )


def _optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_losses: list[torch.Tensor],
    signals: _StopSignals,
    args: PretrainArguments,
) -> _StepOutcome:
    """Clip; agree across processes in one all-reduce (loss, stop flags, gradient finiteness); then step or skip.

    `micro_losses` holds the scalar loss of each micro-batch of this step. A non-finite step is never applied: the
    optimizer and the scheduler do not step and the gradients are zeroed. Under fp16, non-finite gradients with a
    finite loss are left to the GradScaler (it skips the step and lowers the scale).
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    device = accelerator.device
    norm_tensor = norm if isinstance(norm, torch.Tensor) else torch.tensor(0.0 if norm is None else float(norm))
    step_loss = torch.stack(micro_losses).mean().float()
    agreed = torch.cat(
        [
            step_loss.reshape(1).to(device),
            torch.tensor(signals.flags(), device=device),
            (~torch.isfinite(norm_tensor.detach().float())).float().reshape(1).to(device),
        ]
    )  # (2 + len(STOP_SIGNALS),)
    agreed = accelerator.reduce(agreed, reduction="sum")
    loss = (agreed[0] / accelerator.num_processes).item()
    received = [signum for signum, count in zip(STOP_SIGNALS, agreed[1:-1].tolist()) if count > 0]
    scaler = accelerator.scaler
    skipped = not math.isfinite(loss) or (agreed[-1].item() > 0 and scaler is None)
    if not skipped:
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
    elif scaler is not None:
        scaler.update()  # instead of the step (after clip_grad_norm_'s unscale_): lowers the loss scale
    optimizer.zero_grad()
    stop = signal.SIGTERM if signal.SIGTERM in received else (received[0] if received else None)
    return _StepOutcome(loss, _as_float(norm), skipped, stop)


def _refuse_nonfinite_loss_before_deepspeed_step(
    accelerator: Accelerator, loss: torch.Tensor, step: int, args: PretrainArguments
) -> None:
    """DeepSpeed steps inside `backward`, so a non-finite loss is caught before it, on every process alike."""
    bad = accelerator.reduce((~torch.isfinite(loss.detach())).float(), reduction="sum")
    if bad.item() > 0:
        raise NonFiniteLossError(_nonfinite_message(step, float("nan"), None, args))


def _count_skip(state: TrainState, args: PretrainArguments, outcome: _StepOutcome) -> None:
    """Apply `nan_policy` to the skipped step that ends `state.history`: log it, or raise NonFiniteLossError."""
    if args.nan_policy == "stop":
        raise NonFiniteLossError(_nonfinite_message(state.step, outcome.loss, outcome.grad_norm, args))
    in_a_row = 0
    for entry in reversed(state.history):
        if not entry.get("skipped"):
            break
        in_a_row += 1
    if in_a_row >= args.nan_skip_limit:
        raise NonFiniteLossError(
            f"{in_a_row} optimizer steps in a row (the last: step {state.step}) were skipped, the limit of "
            f"--nan_skip_limit {args.nan_skip_limit}. "
            + _nonfinite_message(state.step, outcome.loss, outcome.grad_norm, args)
        )
    logger.warning(
        "step %d: non-finite loss %s or gradient norm %s; skipped the optimizer step (%d in a row, limit %d)",
        state.step,
        outcome.loss,
        outcome.grad_norm,
        in_a_row,
        args.nan_skip_limit,
    )


def _claim_output_dir(args: PretrainArguments, accelerator: Accelerator) -> None:
    """Refuse to start a fresh run in an `output_dir` that holds a model or an earlier run's checkpoints, unless
    `--overwrite_output_dir` (which deletes those checkpoints, so `latest` cannot pick one of them). Resuming from a
    checkpoint is no overwrite."""
    if args.resume_from_checkpoint:
        return
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    checkpoints = Path(args.output_dir) / CHECKPOINTS_DIR
    earlier = list_checkpoints(checkpoints)
    if earlier and not args.overwrite_output_dir:
        raise FileExistsError(
            f"{args.output_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier)}). Continue "
            "it with --resume_from_checkpoint latest, choose another folder with --output_dir, or pass "
            "--overwrite_output_dir to start afresh (deleting those checkpoints)."
        )
    if earlier and accelerator.is_main_process:
        logger.warning("deleting the earlier run's checkpoints in %s (--overwrite_output_dir)", checkpoints)
        shutil.rmtree(checkpoints)
    accelerator.wait_for_everyone()


def pretrain(args: PretrainArguments) -> dict:
    """Run one pretraining job and write its folder to `args.output_dir`. Returns the measured results."""
    started = time.perf_counter()
    accelerator = make_accelerator(args)
    _claim_output_dir(args, accelerator)
    set_seed(args.seed)
    preset = load_preset(args.config)
    hashing_started = time.perf_counter()
    data_files = list(args.data_files) + local_dataset_files(args.dataset_name)
    inputs = input_fingerprint(preset_values(preset), data_files)  # stored in every checkpoint
    logger.info(
        "hashed the config and %d data files (%s bytes) in %.1f s",
        len(inputs["data_files"]),
        f"{sum(entry['size'] for entry in inputs['data_files']):,}",
        time.perf_counter() - hashing_started,
    )
    checkpoint, state = None, TrainState(inputs=inputs)
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, Path(args.output_dir) / CHECKPOINTS_DIR)
        saved = read_checkpoint(checkpoint)
        check_resumable(saved, args, accelerator.num_processes)
        check_inputs(saved, inputs, args.allow_changed_inputs, checkpoint)
        resumed = {item.name: saved[item.name] for item in fields(TrainState) if item.name != "inputs"}
        state = TrainState(**resumed, inputs=inputs)
        logger.info("resuming from %s at step %d", checkpoint, state.step)
    data = prepare_data(args, accelerator, preset, checkpoint)

    config = build_config(preset, data.tokenizer)
    model = build_model(args.architecture, config)
    if args.activation_checkpointing:
        if args.architecture == "llama":
            model.gradient_checkpointing_enable()
        else:
            model.activation_checkpointing_enable()
    num_parameters = count_parameters(model)
    if args.architecture == "llama":
        logger.info("model: %s parameters, Llama baseline of %s", f"{num_parameters:,}", args.config)
    else:
        logger.info("model: %s parameters, layers %s", f"{num_parameters:,}", config.layer_types)

    loader = make_train_loader(data.train_blocks, args)
    valid_loader = DataLoader(data.valid_blocks, batch_size=args.batch_size, collate_fn=_collate)
    groups = parameter_groups(model, args.weight_decay, gate_lr=args.learning_rate * args.gate_lr_multiplier)
    optimizer = create_optimizer(groups, args.learning_rate)
    scheduler = create_scheduler(optimizer, args.warmup_steps, args.max_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed clips inside its own step
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    model, optimizer, loader, valid_loader, scheduler = accelerator.prepare(
        model, optimizer, loader, valid_loader, scheduler
    )
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint)
    if args.report_to != "none":
        accelerator.init_trackers("pretrain", config=_tracker_config(args))

    model.train()
    tokens_at_start = state.tokens_seen
    progress = tqdm(
        total=args.max_steps, initial=state.step, desc="pretrain", disable=not accelerator.is_local_main_process
    )
    train_started = time.perf_counter()
    micro_losses: list[torch.Tensor] = []
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and args.nan_policy == "skip":
        logger.warning("DeepSpeed steps inside backward: a non-finite loss stops the run (as --nan_policy stop)")
    try:
        with _StopSignals() as signals:
            while state.step < args.max_steps:
                loader.set_epoch(state.epoch)
                epoch_loader = (
                    accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
                )
                for batch in epoch_loader:
                    with accelerator.accumulate(model):
                        loss = model(**batch).loss
                        if deepspeed:
                            _refuse_nonfinite_loss_before_deepspeed_step(accelerator, loss, state.step + 1, args)
                        accelerator.backward(loss)
                        micro_losses.append(loss.detach())
                        if accelerator.sync_gradients:
                            outcome = _optimizer_step(
                                accelerator, model, optimizer, scheduler, micro_losses, signals, args
                            )
                    state.batches_in_epoch += 1
                    state.tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
                    if not accelerator.sync_gradients:
                        continue
                    state.step += 1
                    micro_losses = []
                    lr = scheduler.get_last_lr()[0]
                    entry = {"step": state.step, "loss": outcome.loss, "lr": lr, "grad_norm": outcome.grad_norm}
                    if outcome.skipped:
                        entry["skipped"] = True
                    state.history.append(entry)
                    if outcome.skipped:
                        _count_skip(state, args, outcome)
                    logs = {"train/loss": outcome.loss, "train/learning_rate": lr}
                    if outcome.grad_norm is not None:
                        logs["train/grad_norm"] = outcome.grad_norm
                    progress.update(1)
                    progress.set_postfix(loss=f"{outcome.loss:.3f}", lr=f"{lr:.2e}")
                    evaluate = args.eval_steps and state.step % args.eval_steps == 0 and state.step < args.max_steps
                    if evaluate and outcome.stop_signal is None:  # a requested stop saves without evaluating
                        valid_loss, _ = evaluate_loss(model, valid_loader, accelerator)
                        state.history[-1]["validation_loss"] = valid_loss
                        logs["eval/loss"] = valid_loss
                        logger.info("step %d: validation loss %.4f", state.step, valid_loss)
                    accelerator.log(logs, step=state.step)
                    periodic = args.checkpointing_steps and state.step % args.checkpointing_steps == 0
                    if periodic or outcome.stop_signal is not None:
                        saved_to = save_checkpoint(accelerator, data.tokenizer, state, args)
                    if outcome.stop_signal is not None:
                        stopped = TrainingInterrupted(outcome.stop_signal, state.step, saved_to)
                        logger.warning("%s", stopped)
                        raise stopped
                    if state.step >= args.max_steps:
                        break
                else:  # the epoch ran out
                    if state.batches_in_epoch == 0:
                        raise ValueError(
                            "The training data gave no batch; lower --batch_size or --block_size, or add data."
                        )
                    state.epoch += 1
                    state.batches_in_epoch = 0
            if signals.received:
                logger.warning("a stop was requested after the last step: finishing the run")
    except (TrainingInterrupted, NonFiniteLossError):
        for tracker in accelerator.trackers:
            tracker.finish()
        raise
    finally:
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
        "skipped_steps": sum(1 for entry in state.history if entry.get("skipped")),
        "parameters": num_parameters,
        "architecture": args.architecture,
        "arguments": asdict(args),
        "loss_history": state.history,
    }
    if checkpoint is not None:
        results["resumed_from"] = str(checkpoint)
    accelerator.wait_for_everyone()
    final = _final_model(accelerator, model, args.architecture, config)
    if final is not None:
        final.config.use_cache = True
        if args.architecture == "llama":
            write_baseline_folder(final, data.tokenizer, args.output_dir, results)
        else:
            write_model_folder(final, data.tokenizer, args.output_dir, results, repo_id=args.output_dir)
    accelerator.wait_for_everyone()
    # Only the trackers end here: `accelerator.end_training()` would also destroy the process group under the
    # caller's feet, while the prepared model and loaders still hold it (a gloo run then hung at exit now and then).
    for tracker in accelerator.trackers:
        tracker.finish()
    results["total_runtime_seconds"] = round(time.perf_counter() - started, 1)
    return results


__all__ = [
    "CHECKPOINTS_DIR",
    "PARTIAL_SUFFIX",
    "RESUME_MUST_MATCH",
    "STATE_FILE",
    "TOKENIZER_DIR",
    "NonFiniteLossError",
    "PretrainArguments",
    "TrainState",
    "TrainingInterrupted",
    "UnsafeCheckpointError",
    "build_model",
    "check_resumable",
    "evaluate_loss",
    "list_checkpoints",
    "make_accelerator",
    "make_train_loader",
    "prepare_data",
    "pretrain",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

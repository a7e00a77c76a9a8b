"""Train any causal LM on a synthetic task (MQAR, passkey) with the pretraining recipe's optimiser settings.

The loop is the plain single-process form of `sonett.training.pretraining.pretrain`: AdamW (betas 0.9/0.95, decay on
matrices only, the gates in their own group; `sonett.training.optimization`), a cosine schedule with warmup and
gradient clipping. Batches come from a function of the step, so runs are reproducible and any model sees exactly the
same examples.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sonett.training.optimization import create_optimizer, create_scheduler, parameter_groups

logger = logging.getLogger(__name__)

# batch_for_step(step) -> (input_ids (batch, seq), labels (batch, seq)); labels -100 where nothing is scored
BatchFunction = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TaskTrainingArguments:
    """Optimiser settings of a synthetic-task run (shared by every model of a comparison)."""

    steps: int = 2000
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    gate_lr_multiplier: float = 1.0
    log_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}.")
        if self.learning_rate <= 0 or self.gate_lr_multiplier <= 0:
            raise ValueError("learning_rate and gate_lr_multiplier must be positive.")


@dataclass
class TaskTrainingResult:
    """What a run measured: loss history [{step, loss}], tokens per second and the wall time."""

    history: list[dict]
    tokens_per_second: float
    seconds: float


def train_on_task(
    model: torch.nn.Module,
    batch_for_step: BatchFunction,
    args: TaskTrainingArguments,
    description: str = "train",
    on_log: Callable[[int, float], None] | None = None,
) -> TaskTrainingResult:
    """Train `model` in place for `args.steps` optimizer steps on `batch_for_step(step)`.

    The loss is the model's own (mean over the positions whose label is not -100). A non-finite loss stops the
    run with an error naming the step.
    """
    torch.manual_seed(args.seed)
    groups = parameter_groups(model, args.weight_decay, gate_lr=args.learning_rate * args.gate_lr_multiplier)
    optimizer = create_optimizer(groups, args.learning_rate)  # betas 0.9/0.95, eps 1e-8
    scheduler = create_scheduler(optimizer, args.warmup_steps, args.steps)
    device = next(model.parameters()).device
    model.train()
    history, tokens, window = [], 0, []
    started = time.perf_counter()
    for step in tqdm(range(args.steps), desc=description, mininterval=5):
        input_ids, labels = batch_for_step(step)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device), use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"{description}: the loss is {loss.item()} at step {step}; lower the learning rate or --max_grad_norm."
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += input_ids.numel()
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean = sum(window) / len(window)
            history.append({"step": step + 1, "loss": mean})
            window = []
            if on_log is not None:
                on_log(step + 1, mean)
    seconds = time.perf_counter() - started
    model.eval()
    return TaskTrainingResult(history=history, tokens_per_second=tokens / seconds, seconds=seconds)


__all__ = ["BatchFunction", "TaskTrainingArguments", "TaskTrainingResult", "train_on_task"]

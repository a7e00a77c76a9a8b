"""Pretraining loop for Sonett on Accelerate.

One function, `pretrain`, takes a `PretrainArguments` and runs: corpus -> tokenizer -> packed blocks ->
model from a preset -> AdamW with a cosine schedule -> periodic validation -> a Hub-ready folder.
It runs unchanged on one CPU, one GPU or many processes under `accelerate launch`.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from .configuration_sonett import SonettConfig
from .data import load_corpus, pack_into_blocks, split_by_document
from .hub import count_parameters, write_model_folder
from .modeling_sonett import SonettForCausalLM
from .tokenizer_training import train_bpe_tokenizer

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[2] / "configuration"


@dataclass
class PretrainArguments:
    """Settings of one pretraining run; every field is also a `scripts/train.py` flag."""

    config: str = "sonett-tiny"
    output_dir: str = "runs/sonett-tiny"
    data_files: list[str] = field(default_factory=list)
    dataset_name: str | None = None
    text_column: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 4096
    block_size: int = 256
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 800
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    eval_steps: int = 200
    eval_blocks: int = 256
    validation_fraction: float = 0.02
    max_documents: int | None = None
    mixed_precision: str = "no"
    activation_checkpointing: bool = False
    cpu: bool = False
    seed: int = 0


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


def parameter_groups(model: torch.nn.Module, weight_decay: float, gate_lr: float | None = None) -> list[dict]:
    """AdamW groups of the trainable parameters: decay on matrices, none on norms, biases and other vectors.

    With `gate_lr`, the cross-attention tanh gates get their own group at that learning rate (they start at 0 and
    must open), without weight decay.
    """
    decay, no_decay, gates = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if gate_lr is not None and name.endswith(GATE_PARAMETERS):
            gates.append(param)
        elif param.dim() >= 2 and "norm" not in name:
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
    """Mean next-token loss over every predicted token of `loader`, and the number of those tokens."""
    model.eval()
    total_loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    total_tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total_loss += accelerator.reduce(losses.double(), reduction="sum")
        total_tokens += accelerator.reduce(
            torch.tensor(targets.numel(), device=accelerator.device, dtype=torch.float64), reduction="sum"
        )
    model.train()
    return float(total_loss / total_tokens), int(total_tokens)


def pretrain(args: PretrainArguments) -> dict:
    """Run one pretraining job and write its folder to `args.output_dir`. Returns the measured results."""
    started = time.perf_counter()
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    set_seed(args.seed)
    preset = load_preset(args.config)

    corpus = load_corpus(args.data_files or None, args.dataset_name, args.text_column)
    if args.max_documents:
        corpus = corpus.select(range(min(args.max_documents, len(corpus))))
    splits = split_by_document(corpus, args.validation_fraction, key="path", text_column=args.text_column)
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=True)
    else:
        with accelerator.main_process_first():
            tokenizer = train_bpe_tokenizer(
                splits["train"][args.text_column],
                vocab_size=args.vocab_size,
                model_max_length=preset.get("max_position_embeddings", 4096),
            )
    with accelerator.main_process_first():
        train_blocks = pack_into_blocks(splits["train"], tokenizer, args.block_size, args.text_column)
        valid_blocks = pack_into_blocks(splits["validation"], tokenizer, args.block_size, args.text_column)
    valid_blocks = valid_blocks.select(range(min(args.eval_blocks, len(valid_blocks))))

    config = build_config(preset, tokenizer)
    model = SonettForCausalLM(config)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    num_parameters = count_parameters(model)
    logger.info("model: %s parameters, layers %s", f"{num_parameters:,}", config.layer_types)

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train_blocks,
        batch_size=args.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=_collate,
        drop_last=True,
    )
    valid_loader = DataLoader(valid_blocks, batch_size=args.batch_size, collate_fn=_collate)
    if len(train_loader) == 0:
        raise ValueError(
            f"The training split has {len(train_blocks)} blocks, fewer than one batch of {args.batch_size}; "
            "lower --batch_size or --block_size, or add data."
        )
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, train_loader, valid_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, scheduler
    )

    model.train()
    step, tokens_seen, history = 0, 0, []
    progress = tqdm(total=args.max_steps, desc="pretrain", disable=not accelerator.is_local_main_process)
    train_started = time.perf_counter()
    while step < args.max_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            history.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]})
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_steps:
                valid_loss, _ = evaluate_loss(model, valid_loader, accelerator)
                history[-1]["validation_loss"] = valid_loss
                logger.info("step %d: validation loss %.4f", step, valid_loss)
            if step >= args.max_steps:
                break
    progress.close()
    train_runtime = time.perf_counter() - train_started

    valid_loss, valid_tokens = evaluate_loss(model, valid_loader, accelerator)
    results = {
        "training_data": "Python standard library source"
        if not (args.data_files or args.dataset_name)
        else (args.dataset_name or ", ".join(args.data_files)),
        "steps": step,
        "tokens_seen": tokens_seen,
        "batch_tokens": args.batch_size
        * args.block_size
        * args.gradient_accumulation_steps
        * accelerator.num_processes,
        "block_size": args.block_size,
        "learning_rate": args.learning_rate,
        "hardware": f"{accelerator.num_processes} x {accelerator.device.type} ({platform.machine()})",
        "precision": args.mixed_precision if args.mixed_precision != "no" else "fp32",
        "train_runtime": f"{train_runtime:.0f} s",
        "train_tokens_per_second": round(tokens_seen / train_runtime, 1),
        "validation_loss": valid_loss,
        "validation_perplexity": math.exp(valid_loss),
        "validation_tokens": valid_tokens,
        "final_train_loss": history[-1]["loss"],
        "parameters": num_parameters,
        "arguments": asdict(args),
        "loss_history": history,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        write_model_folder(unwrapped, tokenizer, args.output_dir, results, repo_id=args.output_dir)
    accelerator.wait_for_everyone()
    results["total_runtime_seconds"] = round(time.perf_counter() - started, 1)
    return results


__all__ = ["PretrainArguments", "build_config", "config_from_preset", "evaluate_loss", "load_preset", "pretrain"]

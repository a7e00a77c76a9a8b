"""LoRA / DoRA fine-tuning of a Sonett model on chat or instruction data with PEFT and the transformers Trainer.

Data are JSON-lines rows (or one JSON array) with a `messages` list of `{role, content}` turns, or instruction
rows (`instruction`, optional `input`, `output`) that become one user and one assistant turn; with no files, the
embedded instruction set of `instruction_data`. The tokenizer's chat template renders each conversation and marks
the assistant replies, so the labels hold the reply tokens and their `<|end|>` and -100 everywhere else.

`finetune` wraps the base model with `LoraConfig(target_modules=LORA_TARGET_MODULES)`, which reaches the
projections of every mixer kind, the MLPs and the gated cross-attention blocks (PEFT's default for the `sonett`
model type, `peft_sonett.py`), and trains the chat template's special tokens through PEFT's trainable tokens (tied
to the output layer). It writes an adapter folder that loads with
`AutoPeftModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, and optionally a merged model.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from sonett.extras import requires_extra

with requires_extra("train"):
    from datasets import Dataset, DatasetDict

from sonett.data.instructions import default_instruction_splits
from sonett.hub.loading import load_model, load_tokenizer
from sonett.hub.saving import save_model_and_tokenizer
from sonett.hub.upload import relative_local_paths
from sonett.model.peft_sonett import LORA_TARGET_MODULES
from sonett.training.arguments import check_output_dir

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
BASE_MODEL_HINT = (
    "run `sonett train` (or `make demo`) to write runs/sonett-tiny, or pass --base_model <model folder or Hub id>"
)

# Trainer settings this recipe changes from the TrainingArguments defaults (`sonett finetune` uses them too).
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/sonett-tiny-lora",
    "learning_rate": 2e-3,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "save_strategy": "no",
    "seed": 0,
}


@dataclass
class FinetuneArguments:
    """The data, model and LoRA settings of one fine-tuning run (the Trainer's come from `TrainingArguments`)."""

    base_model: str = field(default="runs/sonett-tiny", metadata={"help": "Model folder or Hub id to adapt."})
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "JSON-lines files with `messages` or `instruction`/`input`/`output` rows (default: the "
                  "embedded instruction set)."},
    )  # fmt: skip
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Validation files (default: hold out --validation_share of --data_files)."}
    )
    validation_share: float = field(default=0.1, metadata={"help": "Share of --data_files held out for validation."})
    max_length: int = field(default=512, metadata={"help": "Longest tokenised conversation; longer ones are cut."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    target_modules: str | None = field(
        default=None,
        metadata={"help": "Override the preset: a regex matched in full against module names, comma-separated "
                  "name suffixes, or 'all-linear'."},
    )  # fmt: skip
    train_special_tokens: bool = field(
        default=True,
        metadata={"help": "Train the embedding rows of the tokenizer's added special tokens (PEFT trainable tokens)."},
    )
    merge: bool = field(default=False, metadata={"help": "Also write <output_dir>/merged, a full merged model."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write over an adapter or merged model already in --output_dir (refused otherwise)."},
    )


# ----------------------------------------------------------------------------------------------------------
# Reading and checking data
# ----------------------------------------------------------------------------------------------------------


def read_json_records(path: str | Path) -> list[tuple[dict, str]]:
    """Rows of a UTF-8 JSON-lines file (or a file holding one JSON array), each with its location for errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist; pass existing JSON-lines files to --data_files.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path} is not UTF-8: byte {raw[error.start : error.start + 1]!r} on line {line} ({error.reason}). "
            f"Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl`."
        ) from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix it or write one JSON object per line.") from None
        return [(row, f"{path} item {i}") for i, row in enumerate(rows)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"{path} line {number}"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} line {number} is not valid JSON ({error.msg}); write one JSON object per line."
            ) from None
    return records


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """`messages` as a list of `{role, content}` dicts, or a ValueError naming the row and the fix."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: `messages` must be a non-empty list of {{'role', 'content'}} dicts, got "
            f"{type(messages).__name__} {str(messages)[:60]!r}."
        )
    cleaned = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"{where}: message {turn} must be a dict with 'role' and 'content', got {str(message)[:60]!r}."
            )
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {turn} has role {message['role']!r}; use one of {list(ROLES)}.")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"{where}: message {turn} content must be a string, got {type(message['content']).__name__}."
            )
        cleaned.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in cleaned):
        raise ValueError(
            f"{where} has no assistant turn; the loss counts assistant replies only, so add a message with "
            f"role 'assistant' (or drop the row)."
        )
    return cleaned


def instruction_messages(instruction: str, input_text: str | None, output: str) -> list[dict[str, str]]:
    """An instruction row as a user turn (instruction, a blank line, input) and an assistant turn (output)."""
    prompt = f"{instruction}\n\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def record_messages(record: Any, where: str) -> list[dict[str, str]]:
    """The conversation of one row in either accepted format."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "instruction" in record and "output" in record:
        fields = {key: record.get(key) for key in ("instruction", "input", "output")}
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: `{key}` must be a string, got {type(value).__name__}.")
        return instruction_messages(fields["instruction"], fields["input"], fields["output"])
    raise ValueError(
        f"{where} has columns {sorted(record)} but no `messages` column. Give each row `messages` (a list of "
        f"{{'role', 'content'}} dicts) or instruction fields `instruction`, `output` and optionally `input`."
    )


def conversations(records: list[dict], locations: list[str] | None = None, name: str = "data") -> Dataset:
    """A Dataset with one `messages` column from rows in either format; errors name the row index."""
    if not records:
        raise ValueError(f"The {name} is empty: give at least one row with `messages` or `instruction`/`output`.")
    locations = locations or [""] * len(records)
    messages = [
        record_messages(record, f"row {i}" + (f" ({where})" if where else "") + f" of the {name}")
        for i, (record, where) in enumerate(zip(records, locations))
    ]
    return Dataset.from_dict({"messages": messages})


def load_conversations(paths: list[str], name: str = "training data") -> Dataset:
    """All rows of `paths` as one `messages` Dataset."""
    pairs = [pair for path in paths for pair in read_json_records(path)]
    if not pairs:
        raise ValueError(f"The {name} in {list(paths)} has no rows; the files are empty.")
    return conversations([record for record, _ in pairs], [where for _, where in pairs], name)


def load_splits(args: FinetuneArguments, seed: int = 0) -> DatasetDict:
    """`train` and `validation` conversations: the given files, or the embedded instruction set.

    `seed` orders the embedded set and draws the validation hold-out of `args.data_files`.
    """
    if not args.data_files:
        if args.validation_files:
            raise ValueError("--validation_files needs --data_files; the embedded set brings its own validation split.")
        splits = default_instruction_splits(seed=seed)
        return DatasetDict({name: conversations(split.to_list(), name=name) for name, split in splits.items()})
    train = load_conversations(args.data_files)
    if args.validation_files:
        return DatasetDict(train=train, validation=load_conversations(args.validation_files, "validation data"))
    if len(train) < 2 or not 0 < args.validation_share < 1:
        raise ValueError(
            f"Cannot hold out validation_share={args.validation_share} of {len(train)} rows; pass "
            f"--validation_files or at least 2 rows and 0 < --validation_share < 1."
        )
    held_out = max(1, round(args.validation_share * len(train)))
    split = train.train_test_split(test_size=held_out, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


# ----------------------------------------------------------------------------------------------------------
# Tokenisation and batching
# ----------------------------------------------------------------------------------------------------------


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer must render chats and mark assistant replies for `return_assistant_tokens_mask`."""
    template = tokenizer.chat_template
    if not template:
        raise ValueError("The base model's tokenizer has no chat template; save one with the tokenizer first.")
    if not GENERATION_BLOCK.search(template if isinstance(template, str) else json.dumps(template)):
        raise ValueError(
            "The chat template does not mark assistant replies with {% generation %} ... {% endgeneration %}, so "
            "the answer tokens cannot be found; wrap the assistant content in a generation block."
        )


def tokenize_conversations(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Chat-template token ids with answer-only labels (-100 outside assistant replies), cut to `max_length`.

    Rows whose answer lies wholly beyond `max_length` are dropped.
    Returns a Dataset with `input_ids`, `attention_mask`, `labels` (lists of equal length per row).
    """

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer.apply_chat_template(
            batch["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = [list(row)[:max_length] for row in encoded["input_ids"]]
        labels = [
            [token if keep else IGNORE_INDEX for token, keep in zip(row, mask)]
            for row, mask in zip(ids, encoded["assistant_masks"])
        ]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "labels": labels}

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="chat template")
    kept = tokenized.filter(lambda labels: any(t != IGNORE_INDEX for t in labels[1:]), input_columns="labels")
    if len(kept) < len(tokenized):
        logger.warning(
            "dropped %d of %d conversations whose answer starts after max_length=%d tokens",
            len(tokenized) - len(kept),
            len(tokenized),
            max_length,
        )
    if not len(kept):
        raise ValueError(f"No conversation has an answer token within max_length={max_length}; raise --max_length.")
    return kept


@dataclass
class ChatDataCollator:
    """Right-pads a list of tokenised rows: input_ids with `pad_token_id`, labels with -100, attention_mask 0.

    Returns `input_ids`, `attention_mask`, `labels`, each `(batch, longest row)` (rounded up to
    `pad_to_multiple_of`).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
            "labels": torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            batch["input_ids"][row, :length] = torch.as_tensor(feature["input_ids"])
            batch["attention_mask"][row, :length] = 1
            batch["labels"][row, :length] = torch.as_tensor(feature["labels"])
        return batch


# ----------------------------------------------------------------------------------------------------------
# Model and adapters
# ----------------------------------------------------------------------------------------------------------


def load_base_model(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer to adapt (no code of the folder or repository runs: `sonett.hub.loading`); a missing
    folder names the fix."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json, so it is not a model folder; {BASE_MODEL_HINT}.")
        source = str(path.resolve())  # adapter_config.json records where the base model lives
        tokenizer = load_tokenizer(source)
        model = load_model(source)
    else:
        try:
            tokenizer = load_tokenizer(name_or_path)
            model = load_model(name_or_path)
        except OSError as error:
            raise FileNotFoundError(
                f"Base model {name_or_path!r} is neither a local folder nor a reachable Hub repository; "
                f"{BASE_MODEL_HINT}. ({error})"
            ) from error
    if tokenizer.pad_token_id is None:
        raise ValueError(f"The tokenizer of {name_or_path} has no pad token; set one (e.g. tokenizer.pad_token).")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows; call "
            f"model.resize_token_embeddings(len(tokenizer)) and save the model first."
        )
    check_chat_template(tokenizer)
    return model, tokenizer


def parse_target_modules(value: str | None) -> str | list[str]:
    """The PEFT `target_modules`: the preset for None, a list for comma-separated names, else a regex string."""
    if value is None:
        return LORA_TARGET_MODULES
    if "," in value:
        return [name.strip() for name in value.split(",") if name.strip()]
    if value != "all-linear":
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"--target_modules {value!r} is not a valid regular expression ({error}).") from None
    return value


def lora_config(args: FinetuneArguments, tokenizer: PreTrainedTokenizerBase):
    """`LoraConfig` for a causal LM: preset (or overridden) targets, DoRA on request, special tokens trainable."""
    with requires_extra("train"):
        from peft import LoraConfig

    tokens = sorted(tokenizer.added_tokens_decoder) if args.train_special_tokens else None
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        use_dora=args.use_dora,
        target_modules=parse_target_modules(args.target_modules),
        trainable_token_indices=tokens,
    )


def merge_adapter(peft_model, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Fold the adapter into the base weights and save a plain model folder (with its remote code).

    The PEFT wrapper is unusable afterwards: its base layers now hold the merged weights.
    """
    merged = peft_model.merge_and_unload()
    return save_model_and_tokenizer(merged, tokenizer, folder)


def finetune(args: FinetuneArguments, training_args: TrainingArguments, splits: DatasetDict | None = None) -> dict:
    """Train a LoRA/DoRA adapter with the Trainer; save it (and the merged model with `args.merge`).

    Args:
        args: data, model and adapter settings.
        training_args: the Trainer's settings; `output_dir` receives the adapter and tokenizer.
        splits: `train`/`validation` Datasets with a `messages` column (default: `load_splits(args, seed)`).

    Returns:
        Parameter counts, validation loss before and after training, steps, and the written folders.
    """
    with requires_extra("train"):
        from peft import get_peft_model

    output_dir = Path(training_args.output_dir)
    check_output_dir(output_dir, args.overwrite_output_dir)
    if args.merge:
        check_output_dir(output_dir / "merged", args.overwrite_output_dir)
    if splits is None:
        splits = load_splits(args, training_args.seed)
    model, tokenizer = load_base_model(args.base_model)
    train = tokenize_conversations(splits["train"], tokenizer, args.max_length)
    validation = tokenize_conversations(splits["validation"], tokenizer, args.max_length)

    set_seed(training_args.seed)  # the LoRA A matrices are drawn here
    peft_model = get_peft_model(model, lora_config(args, tokenizer))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=ChatDataCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    loss_before = trainer.evaluate()["eval_loss"]
    outcome = trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(output_dir))  # adapter_config.json, adapter_model.safetensors, tokenizer

    results = {
        "base_model": args.base_model,
        "trainable_parameters": trainable,
        "all_parameters": total,
        "trainable_share": trainable / total,
        "train_examples": len(train),
        "validation_examples": len(validation),
        "steps": outcome.global_step,
        "train_loss": outcome.training_loss,
        "train_seconds": outcome.metrics.get("train_runtime"),
        "validation_loss_before": loss_before,
        "validation_loss_after": loss_after,
        "adapter_dir": str(output_dir),
        "merged_dir": None,
    }
    if trainer.is_world_process_zero():
        if args.merge:
            results["merged_dir"] = str(merge_adapter(peft_model, tokenizer, output_dir / "merged"))
        written = relative_local_paths(results, output_dir)  # no absolute local path in a file that may be shared
        (output_dir / "finetune_results.json").write_text(json.dumps(written, indent=2) + "\n")
    return results


__all__ = [
    "LORA_TARGET_MODULES",
    "TRAINING_DEFAULTS",
    "ChatDataCollator",
    "FinetuneArguments",
    "finetune",
    "load_base_model",
    "load_splits",
    "lora_config",
    "tokenize_conversations",
]

"""The arguments of a pretraining run, as transformers' `training_args.py`: `PretrainArguments` and its constants.

Both the loop (`sonett.training.pretraining`) and its checkpoints (`sonett.training.checkpointing`) import this
module; it imports neither. `check_output_dir` is the rule of every recipe that writes a model folder: an existing
model folder is not written over without `--overwrite_output_dir`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sonett.extras import requires_extra

with requires_extra("train"):
    from accelerate.utils import is_tensorboard_available

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
NAN_POLICIES = ("skip", "stop")
ARCHITECTURES = ("sonett", "llama")
STREAMING_TOKENIZER_DOCUMENTS = 20_000
RUNS_DIR = "runs"
# Files that make a folder a written model (or adapter) folder, which only --overwrite_output_dir writes over.
MODEL_FILE_PATTERNS = ("config.json", "adapter_config.json", "*.safetensors", "pytorch_model*.bin", "adapter_model.bin")


def default_output_dir(config: str) -> str:
    """`runs/<preset name>` for a preset name or a preset JSON file (its file name without `.json`)."""
    return str(Path(RUNS_DIR) / Path(config).name.removesuffix(".json"))


def model_files(folder: str | Path) -> list[str]:
    """The names of the model files (`MODEL_FILE_PATTERNS`) directly in `folder`, sorted; [] if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({path.name for pattern in MODEL_FILE_PATTERNS for path in folder.glob(pattern) if path.is_file()})


def check_output_dir(folder: str | Path, overwrite: bool, flag: str = "--output_dir") -> None:
    """Refuse to write a model into `folder` if it already holds one, unless `overwrite` (`--overwrite_output_dir`).

    Raises:
        FileExistsError: naming the folder, the model files found and both ways on (`flag` names the flag that
            chose the folder).
    """
    found = model_files(folder)
    if not found:
        return
    if overwrite:
        logger.warning("writing over the model folder %s (--overwrite_output_dir)", folder)
        return
    raise FileExistsError(
        f"{folder} already holds a model ({', '.join(found)}); nothing is written over it. Choose another folder "
        f"with {flag}, or pass --overwrite_output_dir to replace it."
    )


@dataclass
class PretrainArguments:
    """Settings of one pretraining run; every field is also a `sonett train` flag."""

    config: str = field(
        default="sonett-tiny",
        metadata={"help": "a preset shipped with the package (`sonett info` lists them) or a JSON file"},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "the Hub-ready model folder to write (default: runs/<preset name>)"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "write over a model folder already in output_dir (refused otherwise); to continue a run there, "
            "use --resume_from_checkpoint instead"
        },
    )
    architecture: str = field(
        default="sonett",
        metadata={
            "help": "sonett, or llama: a transformers LlamaForCausalLM of the preset's shape and parameter count "
            "(within 5%%), the baseline of `sonett compare lm`"  # %% : argparse formats help texts
        },
    )
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
    vocab_size: int = field(
        default=4096, metadata={"help": "vocabulary of the BPE tokenizer trained without --tokenizer"}
    )
    block_size: int = field(default=256, metadata={"help": "tokens per training block (the context length trained)"})
    batch_size: int = field(default=16, metadata={"help": "blocks per process per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=800, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (cosine schedule)"})
    gate_lr_multiplier: float = field(
        default=1.0, metadata={"help": "learning-rate factor for gate parameters (memory and cross-attention gates)"}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the matrices"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps before the cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this value"})
    eval_steps: int = field(default=200, metadata={"help": "validate every N steps (0: only at the end)"})
    eval_blocks: int = field(default=256, metadata={"help": "validation blocks scored at each evaluation"})
    validation_fraction: float = field(
        default=0.02, metadata={"help": "share of the documents held out for validation (split by document)"}
    )
    max_documents: int | None = field(default=None, metadata={"help": "use only the first N documents (all)"})
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (autocast)"})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass: less memory, more time"}
    )
    checkpointing_steps: int = field(default=0, metadata={"help": "save a resumable checkpoint every N steps (0: off)"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "`latest` (in output_dir/checkpoints) or a checkpoint folder"}
    )
    allow_changed_inputs: bool = field(
        default=False,
        metadata={
            "help": "resume although the model config's values or a data file's contents changed since the "
            "checkpoint was saved (refused otherwise); a warning names what changed"
        },
    )
    report_to: str = field(
        default="auto", metadata={"help": "tracker: tensorboard, none, another Accelerate tracker, or auto"}
    )
    nan_policy: str = field(
        default="skip",
        metadata={
            "help": "an optimizer step whose loss or gradient norm is NaN/inf is never applied; skip: drop it, "
            "zero the gradients and go on (logged); stop: raise NonFiniteLossError"
        },
    )
    nan_skip_limit: int = field(
        default=10, metadata={"help": "with --nan_policy skip: stop with an error after this many skips in a row"}
    )
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even when a GPU is present"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the data order and the split"})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.config)
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError(
                "--overwrite_output_dir and --resume_from_checkpoint contradict each other: resuming continues the "
                f"run in {self.output_dir} (and rewrites its model folder at the end). Drop --overwrite_output_dir to "
                "resume, or drop --resume_from_checkpoint to start afresh."
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}.")
        positive = ("block_size", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_blocks")
        positive += ("nan_skip_limit",)
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


__all__ = [
    "ARCHITECTURES",
    "MIXED_PRECISION",
    "NAN_POLICIES",
    "RUNS_DIR",
    "STREAMING_TOKENIZER_DOCUMENTS",
    "PretrainArguments",
    "check_output_dir",
    "default_output_dir",
    "model_files",
]

"""Side-by-side quality comparisons of Sonett presets against a parameter-matched transformers Llama.

Three comparisons, each training every model on the same data with the same optimiser settings on one process:

- `compare_language_modelling`: the pretraining recipe (`sonett.training.pretraining.pretrain`) on the same corpus,
  tokenizer and token budget, once per architecture; validation loss, tokens/s and loss curves.
- `compare_mqar`: width-128, 4-layer cuts of the hybrid and constant-memory presets and a Llama of the hybrid's
  parameter count, trained on a mix of MQAR settings (Zoology) and scored on the grid `MQAR_GRID`; also the
  decoding-state size of each model at a given length.
- `compare_passkey`: the constant-memory preset (and a matched Llama) trained on passkey prompts of at most
  `train_length` tokens, then swept over longer contexts and depths.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from sonett.evaluation.baselines import llama_config_matching
from sonett.evaluation.mqar import MQAR_GRID, mqar_accuracy, mqar_batch
from sonett.evaluation.passkey import DEFAULT_DEPTHS, PasskeyBuilder, passkey_batch, passkey_sweep
from sonett.hub.loading import load_model
from sonett.hub.saving import save_model_and_tokenizer
from sonett.model.configuration_sonett import SonettConfig
from sonett.model.modeling_sonett import SonettForCausalLM
from sonett.presets import config_from_preset, load_preset
from sonett.training.pretraining import PretrainArguments, pretrain
from sonett.training.tasks import BatchFunction, TaskTrainingArguments, TaskTrainingResult, train_on_task

logger = logging.getLogger(__name__)

# Zoology's training mix: (sequence length, pairs); the grid's (512, 64) is not trained on, only evaluated.
MQAR_TRAIN_SETTINGS: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
# The short settings that open training (a curriculum: recall is learned on them first, then generalised).
MQAR_FIRST_SETTINGS: tuple[tuple[int, int], ...] = ((64, 4), (128, 8))
PASSKEY_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)


# ---------------------------------------------------------------------------------------------------------------
# Models


def shortened_layer_types(layer_types: list[str], depth: int) -> list[str]:
    """`layer_types` cut to `depth` layers by dropping `linear_attention` layers, the last ones first.

    Keeps every other kind and the order, so a cut of the hybrid preset still has all four kinds:
    [linear, sliding, linear, memory, linear, full] -> [linear, sliding, memory, full] at depth 4.
    """
    kinds = list(layer_types)
    while len(kinds) > depth:
        linear = [i for i, kind in enumerate(kinds) if kind == "linear_attention"]
        if len(linear) <= 1:
            raise ValueError(f"Cannot cut {layer_types} to {depth} layers without dropping a non-linear kind.")
        del kinds[linear[-1]]
    return kinds


def preset_config(preset: str, vocab_size: int, depth: int | None = None, **overrides) -> SonettConfig:
    """The config of `preset` at `vocab_size`, optionally cut to `depth` layers (see `shortened_layer_types`)."""
    values = load_preset(preset)
    if depth is not None:
        values = {**values, "num_hidden_layers": depth}
        values["layer_types"] = shortened_layer_types(load_preset(preset)["layer_types"], depth)
    return config_from_preset(
        values, vocab_size=vocab_size, pad_token_id=0, bos_token_id=None, eos_token_id=None, **overrides
    )


def build_pair(config: SonettConfig, seed: int) -> tuple[SonettForCausalLM, LlamaForCausalLM]:
    """A Sonett model of `config` and the Llama baseline of its parameter count, both seeded the same."""
    torch.manual_seed(seed)
    sonett = SonettForCausalLM(config)
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(llama_config_matching(config))
    return sonett, llama


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def decoding_state_bytes(model: PreTrainedModel, sequence_length: int, vocab_size: int) -> int:
    """Bytes of the decoding state (KV cache or recurrent state) after reading `sequence_length` tokens."""
    ids = torch.randint(1, vocab_size, (1, sequence_length), generator=torch.Generator().manual_seed(0))
    cache = model(input_ids=ids.to(next(model.parameters()).device), use_cache=True).cache
    if hasattr(cache, "nbytes"):  # SonettCache
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:  # transformers DynamicCache
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def train_logged(
    task: str, name: str, model: PreTrainedModel, batches: BatchFunction, training: TaskTrainingArguments
) -> TaskTrainingResult:
    """`train_on_task`, logging the model's size first and the mean loss every `training.log_every` steps."""
    logger.info("%s: training %s (%s parameters)", task, name, f"{parameter_count(model):,}")

    def log(step: int, loss: float) -> None:
        logger.info("%s %s step %d: loss %.4f", task, name, step, loss)

    return train_on_task(model, batches, training, description=f"{task} {name}", on_log=log)


# ---------------------------------------------------------------------------------------------------------------
# Language modelling


@dataclass
class LanguageModellingComparison:
    """The pretraining run of each architecture; `runs` maps `sonett` and `llama` to `pretrain`'s results."""

    runs: dict[str, dict]

    @property
    def loss_ratio(self) -> float:
        """Sonett's validation loss over Llama's (<= 1.00: Sonett learns at least as well)."""
        return self.runs["sonett"]["validation_loss"] / self.runs["llama"]["validation_loss"]


def compare_language_modelling(args: PretrainArguments) -> LanguageModellingComparison:
    """Pretrain Sonett (`args.config`) and its parameter-matched Llama with the same arguments.

    The Llama run reuses the tokenizer the Sonett run trained (or `args.tokenizer`), so both see the same token
    stream; outputs go to `<output_dir>/sonett` and `<output_dir>/llama`.
    """
    root = Path(args.output_dir)
    runs = {}
    sonett_args = dataclasses.replace(args, architecture="sonett", output_dir=str(root / "sonett"))
    runs["sonett"] = pretrain(sonett_args)
    llama_args = dataclasses.replace(
        args, architecture="llama", output_dir=str(root / "llama"), tokenizer=args.tokenizer or sonett_args.output_dir
    )
    runs["llama"] = pretrain(llama_args)
    return LanguageModellingComparison(runs)


# ---------------------------------------------------------------------------------------------------------------
# MQAR


@dataclass
class MQARArguments:
    """Settings of the MQAR comparison; the optimiser settings are shared by every model."""

    output_dir: str = field(
        default="runs/compare-mqar",
        metadata={"help": "folder for results.json, the loss curves and one model folder per model"},
    )
    hybrid_preset: str = field(default="sonett-tiny", metadata={"help": "the preset of the hybrid Sonett model"})
    constant_preset: str = field(
        default="sonett-tiny-constant", metadata={"help": "the preset of the constant-state Sonett model"}
    )
    depth: int = field(default=4, metadata={"help": "layers of each model (2-4 in the Zoology setting)"})
    vocab_size: int = field(default=256, metadata={"help": "keys from ids 1..V/2-1, values from V/2..V-1"})
    batch_tokens: int = field(default=1024, metadata={"help": "tokens per training batch, whatever the length"})
    steps: int = field(default=6000, metadata={"help": "optimizer steps per model"})
    curriculum_fraction: float = field(
        default=0.3, metadata={"help": "share of the steps trained on the short settings (64,4) and (128,8) only"}
    )
    learning_rate: float = field(
        default=3e-3, metadata={"help": "peak AdamW learning rate (cosine schedule), the same for every model"}
    )
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the matrices"})
    eval_examples: int = field(default=500, metadata={"help": "held-out examples per grid cell"})
    state_length: int = field(default=256, metadata={"help": "sequence length at which state sizes are compared"})
    models: list[str] = field(
        default_factory=lambda: ["hybrid", "constant", "llama"], metadata={"help": "any of hybrid, constant, llama"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the weights and the training batches"})


def mqar_training_batches(
    settings: tuple[tuple[int, int], ...],
    batch_tokens: int,
    vocab_size: int,
    seed: int,
    first_settings: tuple[tuple[int, int], ...] = (),
    first_steps: int = 0,
) -> BatchFunction:
    """Batches cycling through `settings` (through `first_settings` for the first `first_steps` steps), each of about
    `batch_tokens` tokens; step k's batch depends on k only."""

    def batch_for_step(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        current = first_settings if step < first_steps else settings
        length, pairs = current[step % len(current)]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        batch = mqar_batch(max(1, batch_tokens // length), length, pairs, vocab_size, generator)
        return batch.input_ids, batch.labels

    return batch_for_step


def mqar_models(args: MQARArguments) -> dict[str, PreTrainedModel]:
    """The models the MQAR comparison trains, by name, each freshly initialised with `args.seed`."""
    hybrid = preset_config(args.hybrid_preset, args.vocab_size, args.depth)
    constant = preset_config(args.constant_preset, args.vocab_size, args.depth)
    models: dict[str, PreTrainedModel] = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        if name == "hybrid":
            models[name] = SonettForCausalLM(hybrid)
        elif name == "constant":
            models[name] = SonettForCausalLM(constant)
        elif name == "llama":
            models[name] = LlamaForCausalLM(llama_config_matching(hybrid))
        else:
            raise ValueError(f"Unknown MQAR model {name!r}; choose from hybrid, constant, llama.")
    return models


def compare_mqar(args: MQARArguments) -> dict:
    """Train each model on the MQAR mix and score it on `MQAR_GRID`. Returns the results per model."""
    training = TaskTrainingArguments(
        steps=args.steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
    )
    batches = mqar_training_batches(
        MQAR_TRAIN_SETTINGS,
        args.batch_tokens,
        args.vocab_size,
        args.seed,
        first_settings=MQAR_FIRST_SETTINGS,
        first_steps=round(args.curriculum_fraction * args.steps),
    )
    results = {}
    for name, model in mqar_models(args).items():
        run = train_logged("MQAR", name, model, batches, training)
        grid = {
            f"{length},{pairs}": mqar_accuracy(
                model, length, pairs, args.vocab_size, num_examples=args.eval_examples, seed=args.seed + 1
            )
            for length, pairs in MQAR_GRID
        }
        logger.info("MQAR %s: %s", name, grid)
        results[name] = {
            "parameters": parameter_count(model),
            "layer_types": getattr(model.config, "layer_types", ["full_attention"] * model.config.num_hidden_layers),
            "accuracy": grid,
            "state_bytes": decoding_state_bytes(model, args.state_length, args.vocab_size),
            "tokens_per_second": run.tokens_per_second,
            "train_seconds": run.seconds,
            "loss_history": run.history,
        }
        model.save_pretrained(Path(args.output_dir) / name)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Passkey


@dataclass
class PasskeyArguments:
    """Settings of the passkey comparison."""

    output_dir: str = field(
        default="runs/compare-passkey",
        metadata={"help": "folder for results.json, the heat map, the loss curves and the model folders"},
    )
    tokenizer: str = field(
        default="runs/sonett-tiny", metadata={"help": "a tokenizer folder (`sonett train` writes one)"}
    )
    preset: str = field(default="sonett-tiny-constant", metadata={"help": "the Sonett preset to train"})
    sonett_model: str | None = field(
        default=None, metadata={"help": "start Sonett from this pretrained folder (of the preset) instead of scratch"}
    )
    llama_model: str | None = field(
        default=None, metadata={"help": "start the Llama baseline from this pretrained folder instead of scratch"}
    )
    train_length: int = field(default=512, metadata={"help": "prompt tokens in training (at most 2k)"})
    min_train_length: int | None = field(
        default=128,
        metadata={"help": "draw each batch's length uniformly from [this, train_length] (default: fixed)"},
    )
    label_repeat: bool = field(
        default=True, metadata={"help": "also train on the key's second mention inside the needle (a nearby copy)"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per training batch"})
    steps: int = field(default=600, metadata={"help": "optimizer steps per model"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (cosine schedule)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    gate_lr_multiplier: float = field(
        default=1.0, metadata={"help": "learning-rate factor for the memory and cross-attention gates"}
    )
    lengths: list[int] = field(
        default_factory=lambda: list(PASSKEY_LENGTHS), metadata={"help": "context lengths of the retrieval sweep"}
    )
    llama_max_length: int = field(
        default=4096, metadata={"help": "the Llama baseline is swept only up to here (its attention is quadratic)"}
    )
    keys_per_depth: int = field(default=2, metadata={"help": "passkeys tried at each depth of each length"})
    chunk_size: int = field(default=2048, metadata={"help": "prefill chunk for long prompts"})
    models: list[str] = field(default_factory=lambda: ["sonett", "llama"], metadata={"help": "any of sonett, llama"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the training prompts and the keys"})

    def __post_init__(self) -> None:
        if self.train_length > 2048:
            raise ValueError(f"train_length is at most 2048 in this protocol, got {self.train_length}.")
        if self.min_train_length is not None and not 0 < self.min_train_length <= self.train_length:
            raise ValueError(
                f"min_train_length must lie in (0, train_length={self.train_length}], got {self.min_train_length}."
            )


def compare_passkey(args: PasskeyArguments, tokenizer) -> dict:
    """Train the preset (and the matched Llama) on passkey prompts, then sweep lengths and depths."""
    builder = PasskeyBuilder(tokenizer)
    longest = max(args.lengths) + 64
    config = preset_config(args.preset, len(tokenizer), max_position_embeddings=longest)
    sonett, llama = build_pair(config, args.seed)
    models = {"sonett": sonett, "llama": llama}
    for name, folder in (("sonett", args.sonett_model), ("llama", args.llama_model)):
        if folder is not None:  # a pretrained start (no code of the folder runs); same tokenizer required
            models[name] = load_model(folder, max_position_embeddings=longest)
            if models[name].config.vocab_size != len(tokenizer):
                raise ValueError(
                    f"{folder} has a vocabulary of {models[name].config.vocab_size}, the tokenizer {len(tokenizer)}; "
                    "pass the tokenizer the model was trained with (--tokenizer)."
                )
    training = TaskTrainingArguments(
        steps=args.steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        gate_lr_multiplier=args.gate_lr_multiplier,
        seed=args.seed,
    )

    def batch_for_step(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        length = args.train_length
        if args.min_train_length is not None:
            length = int(torch.randint(args.min_train_length, args.train_length + 1, (1,), generator=generator))
        return passkey_batch(builder, args.batch_size, length, generator, label_repeat=args.label_repeat)

    results = {}
    for name in args.models:
        model = models[name]
        run = train_logged("passkey", name, model, batch_for_step, training)
        lengths = [n for n in args.lengths if name != "llama" or n <= args.llama_max_length]
        sweep = passkey_sweep(
            model,
            tokenizer,
            lengths,
            DEFAULT_DEPTHS,
            keys_per_depth=args.keys_per_depth,
            seed=args.seed + 1,
            chunk_size=args.chunk_size,
        )
        results[name] = {
            "parameters": parameter_count(model),
            "accuracy": {str(length): by_depth for length, by_depth in sweep.items()},
            "mean_accuracy": {str(length): sum(d.values()) / len(d) for length, d in sweep.items()},
            "tokens_per_second": run.tokens_per_second,
            "train_seconds": run.seconds,
            "loss_history": run.history,
            "started_from": (args.sonett_model if name == "sonett" else args.llama_model) or "scratch",
        }
        if name == "sonett":
            results[name]["memory_gates"] = memory_gate_values(model)
        save_model_and_tokenizer(model, tokenizer, Path(args.output_dir) / name)
    return results


def memory_gate_values(model: SonettForCausalLM) -> dict[str, list[float]]:
    """sigmoid(gate) per head of every memory_attention layer: the share of the memory read (0.5 at init)."""
    values = {}
    for index, layer in enumerate(model.model.layers):
        gate = getattr(layer.mixer, "gate", None)
        if isinstance(gate, torch.nn.Parameter):
            values[f"layer {index}"] = [round(float(g), 3) for g in torch.sigmoid(gate.detach().flatten())]
    return values


__all__ = [
    "MQAR_TRAIN_SETTINGS",
    "PASSKEY_LENGTHS",
    "LanguageModellingComparison",
    "MQARArguments",
    "PasskeyArguments",
    "build_pair",
    "compare_language_modelling",
    "compare_mqar",
    "compare_passkey",
    "decoding_state_bytes",
    "memory_gate_values",
    "mqar_models",
    "mqar_training_batches",
    "preset_config",
    "shortened_layer_types",
]

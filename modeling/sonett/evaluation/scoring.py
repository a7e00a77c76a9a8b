"""Evaluate a causal language model folder: perplexity (and optionally next-token accuracy) on a text corpus, or
the synthetic recall tasks (`task="mqar"`: the Zoology MQAR grid; `task="passkey"`: passkey retrieval by context
length and depth). Every task runs on any `AutoModelForCausalLM`, so the same code measures a transformers Llama.

The model scores fixed blocks of tokens; the aggregation runs through the `evaluate` metrics shipped inside this
package (`sonett/metrics/<name>/<name>.py`), loaded offline with `evaluate.load(metric_path(name))`. With no data
files the corpus is the embedded standard-library default, split exactly as `sonett.training.pretraining.pretrain`
splits it, so the validation figures equal the validation loss a pretraining run reported.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sonett.extras import requires_extra

with requires_extra("eval"):
    import evaluate
    from datasets import Dataset

from sonett.data.corpus import load_corpus, pack_into_blocks, split_by_document
from sonett.evaluation.mqar import MQAR_GRID, mqar_batch, recall_predictions
from sonett.evaluation.passkey import DEFAULT_DEPTHS, passkey_sweep
from sonett.hub.loading import load_model as load_causal_lm
from sonett.hub.loading import load_tokenizer

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
SPLITS = ("validation", "train", "all")
TASKS = ("lm", "mqar", "passkey")


@dataclass
class EvaluationArguments:
    """Settings of one evaluation; every field is also a `sonett evaluate` flag."""

    model: str = field(
        default="runs/sonett-tiny", metadata={"help": "the model folder (or Hub id) to score; any AutoModelForCausalLM"}
    )
    task: str = field(default="lm", metadata={"help": "lm (perplexity), mqar (recall grid) or passkey (sweep)"})
    data_files: list[str] = field(
        default_factory=list,
        metadata={"help": "local .txt/.jsonl/.json/.parquet files to score (default: the embedded stdlib corpus)"},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset name to score (online)"})
    text_column: str = field(default="text", metadata={"help": "the column holding the documents"})
    split: str | None = field(
        default=None,
        metadata={"help": "split of the corpus to score (default: validation for the embedded corpus, else all)"},
    )
    validation_fraction: float = field(
        default=0.02,
        metadata={"help": "share of documents held out, as in pretraining (to find the same validation split)"},
    )
    max_documents: int | None = field(
        default=None, metadata={"help": "use only the first N documents, as in pretraining (all)"}
    )
    block_size: int = field(
        default=256, metadata={"help": "tokens per scored block (at most the model's max_position_embeddings)"}
    )
    batch_size: int = field(default=16, metadata={"help": "blocks (or MQAR examples) per forward pass"})
    max_blocks: int | None = field(default=None, metadata={"help": "score at most this many blocks (all)"})
    token_accuracy: bool = field(default=False, metadata={"help": "also measure next-token accuracy"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:0, ... (default: cuda when available)"})
    mqar_examples: int = field(default=500, metadata={"help": "mqar: examples per grid cell"})
    passkey_lengths: list[int] = field(
        default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768], metadata={"help": "passkey: context lengths"}
    )
    passkey_keys_per_depth: int = field(default=2, metadata={"help": "passkey: keys tried at each depth"})
    chunk_size: int | None = field(default=2048, metadata={"help": "passkey: prefill chunk for long prompts"})
    seed: int = field(default=1, metadata={"help": "seed of the MQAR examples and passkey keys"})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")


def metric_path(name: str) -> str:
    """Absolute path of a metric folder shipped with the package, ready for `evaluate.load` (works offline).

    Available: `perplexity`, `exact_match`, `accuracy`.
    """
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No metric {name!r} ships with sonett; choose one of {available}.")
    return str(folder)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of a shipped metric, kept in memory (no cache files) unless `kwargs` say otherwise."""
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)


def load_model(folder: str, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer saved in `folder` (no code of the folder runs: `sonett.hub.loading`), in eval mode on
    `device`."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No model folder at {folder}; pass a folder written by `sonett train` (e.g. runs/sonett-tiny)."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a saved model folder.")
    tokenizer = load_tokenizer(folder)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer in {folder} has no EOS token; documents are joined with EOS into blocks.")
    model = load_causal_lm(folder)
    return model.to(device).eval(), tokenizer


def load_model_only(folder: str, device: str) -> PreTrainedModel:
    """The causal LM saved in `folder` (no code of the folder runs), in eval mode on `device`; no tokenizer needed."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(
            f"No model folder at {folder} (no config.json); pass a folder written by `sonett train` or "
            "`sonett compare`."
        )
    return load_causal_lm(folder).to(device).eval()


def evaluate_mqar(args: EvaluationArguments) -> dict:
    """MQAR accuracy of `args.model` on every cell of `MQAR_GRID`, aggregated with the shipped `accuracy` metric."""
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_only(args.model, device)
    vocab_size = model.config.vocab_size
    grid = {}
    for length, pairs in MQAR_GRID:
        generator = torch.Generator().manual_seed(args.seed)  # as `sonett.evaluation.mqar.mqar_accuracy` draws them
        metric = load_metric("accuracy")
        for start in range(0, args.mqar_examples, args.batch_size):
            count = min(args.batch_size, args.mqar_examples - start)
            predicted, target = recall_predictions(model, mqar_batch(count, length, pairs, vocab_size, generator))
            metric.add_batch(predictions=predicted.tolist(), references=target.tolist())
        grid[f"{length},{pairs}"] = metric.compute()["accuracy"]
    return {
        "model": str(args.model),
        "task": "mqar",
        "vocab_size": vocab_size,
        "examples_per_cell": args.mqar_examples,
        "accuracy": grid,
        "device": f"{device} ({platform.machine()})",
        "runtime_seconds": round(time.perf_counter() - started, 2),
    }


def evaluate_passkey(args: EvaluationArguments) -> dict:
    """Passkey retrieval accuracy of `args.model` at every context length and depth."""
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device)
    sweep = passkey_sweep(
        model,
        tokenizer,
        args.passkey_lengths,
        DEFAULT_DEPTHS,
        keys_per_depth=args.passkey_keys_per_depth,
        seed=args.seed,
        chunk_size=args.chunk_size,
    )
    return {
        "model": str(args.model),
        "task": "passkey",
        "accuracy": {str(length): by_depth for length, by_depth in sweep.items()},
        "mean_accuracy": {str(length): sum(d.values()) / len(d) for length, d in sweep.items()},
        "keys_per_depth": args.passkey_keys_per_depth,
        "device": f"{device} ({platform.machine()})",
        "runtime_seconds": round(time.perf_counter() - started, 2),
    }


def load_evaluation_text(args: EvaluationArguments) -> tuple[Dataset, str, str]:
    """The documents to score, a description of where they came from, and the split used.

    The corpus is loaded, cut to `max_documents` and split by document exactly as pretraining does, so
    `split="validation"` is the held-out set of a run with the same `validation_fraction` and `max_documents`.
    The default split is `validation` for the embedded corpus and `all` for data files or a Hub dataset.
    """
    embedded = not (args.data_files or args.dataset_name)
    split = args.split or ("validation" if embedded else "all")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    corpus = load_corpus(  # checks the files first (sonett.data.corpus.check_data_files)
        args.data_files or None, args.dataset_name, args.text_column
    )
    if args.text_column not in corpus.column_names:
        raise ValueError(
            f"The corpus has no column {args.text_column!r} (columns: {corpus.column_names}); "
            "pass --text_column with the right name."
        )
    if args.max_documents:
        corpus = corpus.select(range(min(args.max_documents, len(corpus))))
    if split != "all":
        corpus = split_by_document(corpus, args.validation_fraction, key="path", text_column=args.text_column)[split]
    source = "Python standard library source" if embedded else (args.dataset_name or ", ".join(args.data_files))
    return corpus, source, split


@dataclass
class BlockScores:
    """What the model measured on the blocks.

    nll: (num_blocks,) summed next-token NLL of each block, float64.
    position_loss: (block_size - 1,) mean NLL of predicting token t + 1 from tokens 0..t, over all blocks.
    tokens_per_block: predicted tokens per block, block_size - 1.
    """

    nll: torch.Tensor
    position_loss: torch.Tensor
    tokens_per_block: int


@torch.no_grad()
def score_blocks(
    model: PreTrainedModel,
    blocks: Dataset,
    batch_size: int,
    accuracy: evaluate.EvaluationModule | None = None,
) -> BlockScores:
    """Next-token NLL of every block of `blocks` (column `input_ids`, equal lengths), without gradients.

    Each block (length T) predicts its tokens 1..T-1 from the ones before: T-1 targets per block. With
    `accuracy`, the argmax predictions and targets of every position are added to that metric.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if len(blocks) == 0:
        raise ValueError("There are no blocks to score; add text or lower block_size.")
    device = next(model.parameters()).device
    nll, position_sum = [], None
    for start in tqdm(range(0, len(blocks), batch_size), desc="evaluate", unit="batch"):
        input_ids = torch.tensor(blocks[start : start + batch_size]["input_ids"], dtype=torch.long, device=device)
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        targets = input_ids[:, 1:]  # (B, T-1)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()
        nll.append(losses.sum(dim=1).cpu())
        batch_positions = losses.sum(dim=0).cpu()  # (T-1,)
        position_sum = batch_positions if position_sum is None else position_sum + batch_positions
        if accuracy is not None:
            accuracy.add_batch(predictions=logits.argmax(-1).flatten().tolist(), references=targets.flatten().tolist())
    nll_all = torch.cat(nll)
    return BlockScores(nll=nll_all, position_loss=position_sum / len(nll_all), tokens_per_block=len(position_sum))


def evaluate_causal_lm(args: EvaluationArguments) -> dict:
    """Score the model folder `args.model` on the chosen text and return the results.

    Returns a dict with `loss` (mean NLL per predicted token), `perplexity` (exp of it), `mean_block_perplexity`,
    `block_perplexities` (one per block), `position_loss` (mean loss at each block position), the counts, and
    `token_accuracy` when `args.token_accuracy` is set.
    """
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.block_size > limit:
        raise ValueError(f"block_size {args.block_size} exceeds the model's max_position_embeddings ({limit}).")
    texts, source, split = load_evaluation_text(args)
    blocks = pack_into_blocks(texts, tokenizer, args.block_size, args.text_column)
    if args.max_blocks:
        blocks = blocks.select(range(min(args.max_blocks, len(blocks))))
    logger.info("scoring %d blocks of %d tokens from %s (%s split)", len(blocks), args.block_size, source, split)

    accuracy = load_metric("accuracy") if args.token_accuracy else None
    scores = score_blocks(model, blocks, args.batch_size, accuracy)
    perplexity = load_metric("perplexity").compute(
        nll=scores.nll.tolist(), num_tokens=[scores.tokens_per_block] * len(scores.nll)
    )
    results = {
        "model": str(args.model),
        "data": source,
        "split": split,
        "block_size": args.block_size,
        "num_blocks": perplexity["num_sequences"],
        "num_tokens": perplexity["num_tokens"],
        "loss": perplexity["loss"],
        "perplexity": perplexity["perplexity"],
        "mean_block_perplexity": perplexity["mean_perplexity"],
        "block_perplexities": perplexity["perplexities"],
        "position_loss": scores.position_loss.tolist(),
        "device": f"{device} ({platform.machine()})",
        "runtime_seconds": round(time.perf_counter() - started, 2),
    }
    if accuracy is not None:
        results["token_accuracy"] = accuracy.compute()["accuracy"]
    return results


__all__ = [
    "BlockScores",
    "EvaluationArguments",
    "evaluate_causal_lm",
    "evaluate_mqar",
    "evaluate_passkey",
    "load_evaluation_text",
    "load_metric",
    "load_model",
    "load_model_only",
    "metric_path",
    "score_blocks",
]

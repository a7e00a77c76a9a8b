"""Corpora for Sonett pretraining, as `datasets` pipelines.

The embedded default is the Python standard library's own source (code and docstrings), read from the
running interpreter, so nothing is downloaded. Local text/jsonl/parquet files or a Hub dataset name work too.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def stdlib_corpus(max_documents: int | None = None) -> Dataset:
    """The standard library's `.py` files (tests and site-packages excluded), one document per file.

    Files are sorted by path so the corpus is the same on every machine with the same Python version.
    Returns a Dataset with columns `text` and `path` (relative to the stdlib root).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests", "idle_test"}
    paths = sorted(p for p in root.rglob("*.py") if not skipped.intersection(p.relative_to(root).parts))
    texts, names = [], []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as error:
            logger.warning("skipping %s: %s", path, error)
            continue
        if text.strip():
            texts.append(text)
            names.append(str(path.relative_to(root)))
        if max_documents is not None and len(texts) >= max_documents:
            break
    if not texts:
        raise FileNotFoundError(f"No Python source found under the standard library at {root}.")
    return Dataset.from_dict({"text": texts, "path": names})


def load_corpus(
    data_files: list[str] | None = None, dataset_name: str | None = None, text_column: str = "text"
) -> Dataset:
    """Load the training corpus: local files, a Hub dataset (online only), or the embedded stdlib default.

    Args:
        data_files: local `.txt`/`.jsonl`/`.json`/`.parquet` files, all of one format.
        dataset_name: a Hub dataset name; its `train` split is used.
        text_column: the column that holds the documents.

    Returns:
        A Dataset whose `text_column` holds non-empty strings.
    """
    if data_files:
        suffixes = {Path(f).suffix.lower() for f in data_files}
        builders = {_FILE_BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise ValueError(
                f"Unsupported or mixed data files {sorted(suffixes)}; use one of {sorted(_FILE_BUILDERS)} for all."
            )
        missing = [f for f in data_files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"Data files not found: {missing}")
        dataset = load_dataset(builders.pop(), data_files={"train": list(data_files)}, split="train")
    elif dataset_name:
        dataset = load_dataset(dataset_name, split="train")
    else:
        return stdlib_corpus()
    if text_column not in dataset.column_names:
        raise ValueError(
            f"The corpus has no column {text_column!r} (columns: {dataset.column_names}); "
            "pass --text_column with the right name."
        )
    dataset = dataset.filter(lambda row: isinstance(row[text_column], str) and row[text_column].strip() != "")
    if len(dataset) == 0:
        raise ValueError(f"The corpus has no non-empty documents in column {text_column!r}.")
    return dataset


def split_by_document(
    dataset: Dataset, validation_fraction: float = 0.02, key: str | None = None, text_column: str = "text"
) -> DatasetDict:
    """Hold out whole documents for validation, chosen by a hash so the split never depends on order.

    Args:
        dataset: the corpus.
        validation_fraction: share of documents held out (at least one document goes each way).
        key: the column hashed to choose (e.g. `path`); the text itself when None or absent.
        text_column: the column that holds the documents.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}.")
    if len(dataset) < 2:
        raise ValueError("The corpus needs at least two documents to hold one out for validation.")
    column = key if key in dataset.column_names else text_column

    def bucket(value: str) -> float:
        return int(hashlib.sha256(value.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF

    held_out = [bucket(value) < validation_fraction for value in dataset[column]]
    if all(held_out) or not any(held_out):
        held_out = [i == len(dataset) - 1 for i in range(len(dataset))]
    train_idx = [i for i, h in enumerate(held_out) if not h]
    valid_idx = [i for i, h in enumerate(held_out) if h]
    return DatasetDict(train=dataset.select(train_idx), validation=dataset.select(valid_idx))


def pack_into_blocks(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, text_column: str = "text"
) -> Dataset:
    """Tokenize every document, end each with EOS, concatenate and cut into blocks of `block_size` tokens.

    Each group of 1000 documents drops its tail shorter than one block (logged).
    Returns a Dataset with one column `input_ids`.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        # Whole documents are longer than the model context on purpose: they are cut into blocks below.
        encoded = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [[*ids, eos] for ids in encoded]}

    def group(batch: dict) -> dict:
        flat = [token for ids in batch["input_ids"] for token in ids]
        usable = len(flat) - len(flat) % block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, usable, block_size)]}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")
    total = sum(len(ids) for ids in tokens["input_ids"])
    blocks = tokens.map(group, batched=True, batch_size=1000, desc="pack")
    if len(blocks) == 0:
        raise ValueError(
            f"The corpus has only {total} tokens, fewer than one block of {block_size}; lower --block_size or add data."
        )
    logger.info(
        "packed %d tokens into %d blocks of %d (%d tail tokens dropped)",
        total,
        len(blocks),
        block_size,
        total - len(blocks) * block_size,
    )
    return blocks


__all__ = ["load_corpus", "pack_into_blocks", "split_by_document", "stdlib_corpus"]

"""Corpora for Sonett pretraining, as `datasets` pipelines.

The embedded default is the Python standard library's own source (code and docstrings), read from the
running interpreter, so nothing is downloaded. Local text/jsonl/parquet files or a Hub dataset name work too,
loaded whole (`Dataset`) or streamed (`IterableDataset`, for corpora larger than memory). Both kinds go
through the same split and packing code, so a streamed corpus gives exactly the blocks of the loaded one.

A document longer than `MAX_TOKENIZE_CHARS` is tokenised in pieces cut at spaces, so memory stays bounded (a fast
tokenizer holds about 175 bytes per character of the text it encodes at once) and the ids stay those of the whole
document (see `pack_into_blocks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from sonett.extras import requires_extra

with requires_extra("train"):
    import pyarrow
    import pyarrow.parquet
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
    from datasets.exceptions import DatasetGenerationError

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_LINE_FILES = {".txt", ".text", ".jsonl", ".json"}
PACK_GROUP_DOCUMENTS = 1000  # documents packed together; each group drops its tail shorter than one block
MAX_TOKENIZE_CHARS = 1_000_000  # longer documents are tokenised in pieces of at most this many characters
# Texts on which a tokenizer must give the same ids whole and cut at any space, for long documents to be cut
_CUT_PROBES = ("def f(x, y):\n    return x  + y  # sum\n", "Hello, world! It's 12:30 -- don't   panic.\t Done")

Corpus = Dataset | IterableDataset


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


def check_data_files(data_files: list[str]) -> str:
    """Check local corpus files before `datasets` reads them; returns the `datasets` builder for them.

    Raises, naming the file (and line): a missing or empty file, an unsupported or mixed suffix, a line of a text
    or JSON file that is not UTF-8, a `.jsonl` line that is not a JSON object, a `.jsonl` file of only empty
    objects, a `.json` file whose top-level value is not an object or array, a parquet file whose footer cannot be
    read. Reads line by line (constant memory).
    """
    suffixes = {Path(f).suffix.lower() for f in data_files}
    builders = {_FILE_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"Unsupported or mixed data files {sorted(suffixes)}; use one of {sorted(_FILE_BUILDERS)} for all."
        )
    missing = [f for f in data_files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"Data files not found: {missing}; check the --data_files paths.")
    for name in data_files:
        path = Path(name)
        if path.stat().st_size == 0:
            raise ValueError(f"Data file {name} is empty; give a file with at least one document.")
        if path.suffix.lower() in _LINE_FILES:
            _check_lines(path)
        if path.suffix.lower() == ".json":
            _check_json_top_level(path)
        if path.suffix.lower() == ".parquet":
            try:
                pyarrow.parquet.read_metadata(path)
            except (pyarrow.ArrowException, OSError) as error:
                raise ValueError(
                    f"{path} is not a readable Parquet file ({error}); write it again (e.g. with "
                    "pandas.DataFrame.to_parquet) or give the documents as .jsonl."
                ) from None
    return builders.pop()


_JSON_KINDS = {'"': "string", "t": "boolean", "f": "boolean", "n": "null", "-": "number"}


def _check_json_top_level(path: Path) -> None:
    """A `.json` file must hold objects: JSON Lines or an array (its first character other than space is { or [)."""
    with path.open("r", encoding="utf-8-sig") as handle:
        while (chunk := handle.read(1 << 16)) and not chunk.strip():
            pass
    first = chunk.lstrip()[:1]
    if first in ("{", "["):
        return
    kind = "number" if first.isdigit() else _JSON_KINDS.get(first)
    if not first:
        what = "only whitespace"
    else:
        what = f"a JSON {kind}" if kind else f"no JSON object or array (it starts with {first!r})"
    raise ValueError(
        f"{path} holds {what} at the top level, not objects; write one JSON object per line (JSON Lines, e.g. "
        '{"text": "..."}) or an array of such objects, or use a .txt file for plain text.'
    )


def _check_lines(path: Path) -> None:
    is_jsonl = path.suffix.lower() == ".jsonl"
    objects = with_fields = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path} line {number} is not valid UTF-8 (byte {raw[error.start]:#04x} at column "
                    f"{error.start + 1}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            if is_jsonl and line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path} line {number} is not valid JSON: {error.msg}; write one JSON object per line "
                        "(JSON Lines), or use a .txt file for plain text."
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number} is not a JSON object; write one object per line.")
                objects += 1
                with_fields += bool(row)
    if is_jsonl and not with_fields:
        found = "every line is an empty JSON object {}" if objects else "it has only blank lines"
        raise ValueError(
            f'{path} has no fields: {found}; write one object with the documents\' column per line, e.g. {{"text": '
            '"..."}.'
        )


def _columns(dataset: Corpus) -> list[str]:
    """The column names; a stream whose schema is not known yet is read up to its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return [] if first is None else list(first)


def load_corpus(
    data_files: list[str] | None = None,
    dataset_name: str | None = None,
    text_column: str = "text",
    streaming: bool = False,
) -> Corpus:
    """Load the training corpus: local files, a Hub dataset (online only), or the embedded stdlib default.

    Args:
        data_files: local `.txt`/`.jsonl`/`.json`/`.parquet` files, all of one format (checked first, see
            `check_data_files`).
        dataset_name: a Hub dataset name; its `train` split is used.
        text_column: the column that holds the documents.
        streaming: return an `IterableDataset` that reads the files lazily instead of a `Dataset`.

    Returns:
        A Dataset (or IterableDataset) whose `text_column` holds non-empty strings.
    """
    if data_files:
        builder = check_data_files(list(data_files))
        try:  # what the checks above cannot see (e.g. a damaged parquet page) fails here, naming the files
            dataset = load_dataset(builder, data_files={"train": list(data_files)}, split="train", streaming=streaming)
            columns = _columns(dataset)
        except (ValueError, DatasetGenerationError, pyarrow.ArrowException) as error:
            cause = f"{error}; {error.__cause__}" if error.__cause__ else str(error)
            raise ValueError(
                f"The data files {list(data_files)} could not be read as {builder} ({cause}); check that each holds "
                "rows with a text column in that format."
            ) from error
    elif dataset_name:
        try:
            dataset = load_dataset(dataset_name, split="train", streaming=streaming)
        except ConnectionError as error:
            raise ConnectionError(
                f"Could not reach the Hub dataset {dataset_name!r} ({error}); go online (unset HF_HUB_OFFLINE and "
                "HF_DATASETS_OFFLINE) or give local --data_files."
            ) from error
        columns = _columns(dataset)
    else:
        corpus = stdlib_corpus()
        return corpus.to_iterable_dataset() if streaming else corpus
    if text_column not in columns:
        raise ValueError(
            f"The corpus has no column {text_column!r} (columns: {columns}); pass --text_column with the right name."
        )
    dataset = dataset.filter(lambda row: isinstance(row[text_column], str) and row[text_column].strip() != "")
    empty = len(dataset) == 0 if isinstance(dataset, Dataset) else next(iter(dataset), None) is None
    if empty:
        raise ValueError(
            f"The corpus has no non-empty documents in column {text_column!r}; put text in that column, or pass "
            "--text_column with the column that holds the documents."
        )
    return dataset


def first_documents(dataset: Corpus, count: int | None) -> Corpus:
    """The first `count` documents (all when None)."""
    if count is None:
        return dataset
    if isinstance(dataset, Dataset):
        return dataset.select(range(min(count, len(dataset))))
    return dataset.take(count)


def _bucket(value: str) -> float:
    """A stable number in [0, 1] from a document's key."""
    return int(hashlib.sha256(value.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_by_document(
    dataset: Corpus, validation_fraction: float = 0.02, key: str | None = None, text_column: str = "text"
) -> DatasetDict | IterableDatasetDict:
    """Hold out whole documents for validation, chosen by a hash so the split never depends on order.

    Args:
        dataset: the corpus, loaded or streamed. A stream is split by two lazy filters on the same hash, so it
            holds out exactly the documents the loaded corpus holds out.
        validation_fraction: share of documents held out (a loaded corpus sends at least one document each way).
        key: the column hashed to choose (e.g. `path`); the text itself when None or absent.
        text_column: the column that holds the documents.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}.")
    column = key if key in _columns(dataset) else text_column
    if isinstance(dataset, IterableDataset):
        return IterableDatasetDict(
            train=dataset.filter(lambda row: _bucket(row[column]) >= validation_fraction),
            validation=dataset.filter(lambda row: _bucket(row[column]) < validation_fraction),
        )
    if len(dataset) < 2:
        raise ValueError("The corpus needs at least two documents to hold one out for validation.")
    held_out = [_bucket(value) < validation_fraction for value in dataset[column]]
    if all(held_out) or not any(held_out):
        held_out = [i == len(dataset) - 1 for i in range(len(dataset))]
    train_idx = [i for i, h in enumerate(held_out) if not h]
    valid_idx = [i for i, h in enumerate(held_out) if h]
    return DatasetDict(train=dataset.select(train_idx), validation=dataset.select(valid_idx))


def _space_cuts(text: str, start: int, end: int) -> Iterator[int]:
    """Indices `i` in (start, end], last first, where `text[i]` is a space and `text[i - 1]` is not whitespace."""
    cut = text.rfind(" ", start + 1, end + 1)
    while cut > start:
        if not text[cut - 1].isspace():
            yield cut
        cut = text.rfind(" ", start + 1, cut)


def text_pieces(text: str, limit: int) -> tuple[list[str], int]:
    """`text` cut into pieces of at most `limit` characters, and how many cuts fell inside a run without a space.

    Each cut is made before the last space in reach that follows a non-whitespace character: a byte-level BPE's
    pre-tokenizer (GPT-2's or Llama 3's pattern, and Sonett's) never joins such a pair into one piece, so the pieces
    tokenise to exactly the ids of the whole text. Where `limit` characters hold no such space, the cut is made at
    the limit; the tokens around that cut may differ from those of the uncut text (nothing is lost or reordered).
    """
    pieces, hard_cuts, start = [], 0, 0
    while len(text) - start > limit:
        cut = next(_space_cuts(text, start, start + limit), None)
        if cut is None:
            cut, hard_cuts = start + limit, hard_cuts + 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces, hard_cuts


def split_long_documents(texts: Iterable[str]) -> Iterator[str]:
    """The documents, each longer than `MAX_TOKENIZE_CHARS` replaced by its `text_pieces`.

    For training a byte-level BPE: the pieces hold the same pre-tokenized words as the whole document, so the
    trained tokenizer is the same, without the memory of pre-tokenizing the whole document at once.
    """
    for text in texts:
        if len(text) > MAX_TOKENIZE_CHARS:
            yield from text_pieces(text, MAX_TOKENIZE_CHARS)[0]
        else:
            yield text


def _cuts_are_exact(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` gives the same ids for the probe texts whole and cut in two at every cut point."""
    for text in _CUT_PROBES:
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        for cut in _space_cuts(text, 0, len(text)):
            halves = tokenizer([text[:cut], text[cut:]], add_special_tokens=False)["input_ids"]
            if halves[0] + halves[1] != whole:
                return False
    return True


def pack_into_blocks(
    dataset: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    *,
    name: str = "corpus",
    remedy: str = "lower --block_size or add data",
) -> Corpus:
    """Tokenize every document, end each with EOS, concatenate and cut into blocks of `block_size` tokens.

    Each group of `PACK_GROUP_DOCUMENTS` consecutive documents drops its tail shorter than one block. A stream is
    packed lazily, on the fly, into the same blocks in the same order. A document longer than `MAX_TOKENIZE_CHARS`
    is tokenised piece by piece (`text_pieces`), so memory stays bounded, with the ids of the whole document; a
    tokenizer that gives other ids for a text cut at a space (probed once) refuses such a document instead.
    Returns a Dataset (or IterableDataset) with one column `input_ids`, rows of `block_size` token ids.
    A loaded dataset too short for one block raises a ValueError naming it (`name`, e.g. "validation split") and
    what to do (`remedy`).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    eos = tokenizer.eos_token_id
    exact: list[bool] = []  # the probe's answer, once known

    def tokenize_long(text: str) -> list[int]:
        if not exact:
            exact.append(_cuts_are_exact(tokenizer))
        if not exact[0]:
            raise ValueError(
                f"A document of {len(text):,} characters is longer than {MAX_TOKENIZE_CHARS:,}, and this tokenizer "
                f"({type(tokenizer).__name__}) gives other ids for a text cut at a space, so it cannot be tokenised "
                "in bounded pieces (at once it would take about 175 bytes of memory per character). Break such "
                "documents into shorter ones (e.g. at paragraphs), or use a byte-level BPE tokenizer (the default)."
            )
        pieces, hard_cuts = text_pieces(text, MAX_TOKENIZE_CHARS)
        if hard_cuts:
            logger.warning(
                "a document of %s characters has %d run(s) of more than %s characters without a space; they were "
                "cut there, and the tokens at those cuts may differ from those of the uncut text",
                f"{len(text):,}",
                hard_cuts,
                f"{MAX_TOKENIZE_CHARS:,}",
            )
        ids: list[int] = []
        for piece in pieces:
            ids += tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        return ids

    def tokenize(batch: dict) -> dict:
        # Whole documents are longer than the model context on purpose: they are cut into blocks below. Each call
        # of the tokenizer gets at most MAX_TOKENIZE_CHARS characters, which bounds its memory.
        ids: list[list[int]] = []
        pending: list[str] = []
        pending_chars = 0

        def flush() -> None:
            nonlocal pending, pending_chars
            if pending:
                ids.extend(tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"])
            pending, pending_chars = [], 0

        for text in batch[text_column]:
            if pending_chars + len(text) > MAX_TOKENIZE_CHARS:
                flush()
            if len(text) > MAX_TOKENIZE_CHARS:
                ids.append(tokenize_long(text))
            else:
                pending.append(text)
                pending_chars += len(text)
        flush()
        for row in ids:
            row.append(eos)
        return {"input_ids": ids}

    def group(batch: dict) -> dict:
        flat = [token for ids in batch["input_ids"] for token in ids]
        usable = len(flat) - len(flat) % block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, usable, block_size)]}

    columns = _columns(dataset)
    if isinstance(dataset, IterableDataset):
        tokens = dataset.map(tokenize, batched=True, remove_columns=columns)
        return tokens.map(group, batched=True, batch_size=PACK_GROUP_DOCUMENTS)
    tokens = dataset.map(tokenize, batched=True, remove_columns=columns, desc="tokenize")
    total = sum(len(ids) for ids in tokens["input_ids"])
    blocks = tokens.map(group, batched=True, batch_size=PACK_GROUP_DOCUMENTS, desc="pack")
    if len(blocks) == 0:
        raise ValueError(f"The {name} has only {total:,} tokens, fewer than one block of {block_size}; {remedy}.")
    logger.info(
        "packed %d tokens into %d blocks of %d (%d tail tokens dropped)",
        total,
        len(blocks),
        block_size,
        total - len(blocks) * block_size,
    )
    return blocks


def take_blocks(blocks: Corpus, count: int) -> Dataset:
    """The first `count` blocks in memory (a stream is read only that far). Raises if there are none."""
    if isinstance(blocks, Dataset):
        taken = blocks.select(range(min(count, len(blocks))))
    else:
        taken = Dataset.from_list(list(blocks.take(count)))
    if len(taken) == 0:
        raise ValueError(
            "The held-out documents make no complete block; raise --validation_fraction, lower --block_size, "
            "or add data."
        )
    return taken


class EpochShuffleSampler(Sampler[int]):
    """A fresh random order of `num_samples` indices each epoch, a pure function of (seed, epoch).

    Epoch e is the order `DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))` gives in its
    epoch e (per epoch that loader draws a worker seed, its permutation, and one more permutation that
    `RandomSampler` computes and discards at the end), so switching to this sampler keeps earlier runs' data order.
    Unlike that loader it can jump to any epoch: a resumed run sets the epoch and sees exactly the order the
    interrupted run saw. Every process computes the same order.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # replay the draws of the earlier epochs
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            torch.randperm(self.num_samples, generator=generator)
            torch.randperm(self.num_samples, generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the worker seed that loader draws first
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


__all__ = [
    "MAX_TOKENIZE_CHARS",
    "EpochShuffleSampler",
    "check_data_files",
    "first_documents",
    "load_corpus",
    "pack_into_blocks",
    "split_by_document",
    "split_long_documents",
    "stdlib_corpus",
    "take_blocks",
    "text_pieces",
]

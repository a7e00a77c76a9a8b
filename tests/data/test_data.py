"""Corpus loading (loaded and streamed), input checks, the document-level split, packing into blocks and the
per-epoch data order."""

import json

import pytest
import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader

from sonett.data.corpus import (
    PACK_GROUP_DOCUMENTS,
    EpochShuffleSampler,
    first_documents,
    load_corpus,
    pack_into_blocks,
    split_by_document,
    stdlib_corpus,
    take_blocks,
)
from sonett.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(max_documents=60)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe_tokenizer(corpus["text"], vocab_size=600)


def test_stdlib_corpus_is_sorted_source_without_tests(corpus):
    paths = corpus["path"]
    assert paths == sorted(paths)
    assert all(p.endswith(".py") for p in paths)
    assert not any(part in ("test", "tests") for p in paths for part in p.split("/"))
    assert all(text.strip() for text in corpus["text"])


def test_split_holds_out_whole_documents_deterministically(corpus):
    first = split_by_document(corpus, 0.2, key="path")
    second = split_by_document(corpus.shuffle(seed=3), 0.2, key="path")
    train, valid = set(first["train"]["path"]), set(first["validation"]["path"])
    assert train.isdisjoint(valid)
    assert train | valid == set(corpus["path"])
    assert valid == set(second["validation"]["path"])
    assert 0 < len(valid) < len(corpus)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fractions(corpus, fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        split_by_document(corpus, fraction)


def test_packing_concatenates_documents_with_eos(corpus, tokenizer):
    docs = corpus.select(range(5))
    blocks = pack_into_blocks(docs, tokenizer, block_size=32)
    stream = []
    for text in docs["text"]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    packed = [token for block in blocks["input_ids"] for token in block]
    assert all(len(block) == 32 for block in blocks["input_ids"])
    assert len(packed) == len(stream) - len(stream) % 32
    assert packed == stream[: len(packed)]


def test_packing_too_little_text_raises(tokenizer):
    from datasets import Dataset

    with pytest.raises(ValueError, match="fewer than one block of 4096"):
        pack_into_blocks(Dataset.from_dict({"text": ["tiny"]}), tokenizer, block_size=4096)


def test_local_jsonl_and_text_files(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(3)) + "\n")
    dataset = load_corpus([str(jsonl)], text_column="body")
    assert dataset["body"] == ["document 0", "document 1", "document 2"]

    text = tmp_path / "corpus.txt"
    text.write_text("line one\n\nline two\n")
    assert load_corpus([str(text)])["text"] == ["line one", "line two"]


def test_bad_corpora_raise_clear_errors(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        load_corpus([str(jsonl)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_corpus([str(empty)])
    with pytest.raises(ValueError, match="Unsupported or mixed data files"):
        load_corpus([str(tmp_path / "corpus.csv")])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus([str(tmp_path / "missing.txt")])


def test_split_falls_back_to_the_given_text_column():
    from datasets import Dataset

    dataset = Dataset.from_dict({"body": [f"document number {i}" for i in range(40)]})
    splits = split_by_document(dataset, 0.2, key="path", text_column="body")
    assert len(splits["train"]) + len(splits["validation"]) == 40
    assert set(splits["train"]["body"]).isdisjoint(splits["validation"]["body"])


def _short_documents(count: int) -> list[str]:
    """`count` small distinct documents (more than one packing group of 1,000 when count > 1000)."""
    return [f"def step_{i}(value):\n    return value * {i % 7} + {i % 11}  # {'x' * (i % 5)}" for i in range(count)]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_streaming_gives_the_blocks_of_the_loaded_corpus(tmp_path, suffix):
    documents = _short_documents(2300)
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(documents).replace("\n    ", " ") + "\n")
    else:
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(documents)) + "\n")
    loaded = load_corpus([str(path)])
    streamed = load_corpus([str(path)], streaming=True)
    assert isinstance(loaded, Dataset) and isinstance(streamed, IterableDataset)
    tokenizer = train_bpe_tokenizer(loaded["text"], vocab_size=300)
    loaded_splits = split_by_document(loaded, 0.1)
    streamed_splits = split_by_document(streamed, 0.1)
    for split in ("train", "validation"):
        expected = pack_into_blocks(loaded_splits[split], tokenizer, block_size=24)["input_ids"]
        got = [row["input_ids"] for row in pack_into_blocks(streamed_splits[split], tokenizer, block_size=24)]
        assert got == expected
    assert len(expected) > 10
    assert len(loaded_splits["train"]) > PACK_GROUP_DOCUMENTS  # the packing groups are crossed too


def test_streaming_reads_only_what_it_needs(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"document {i}" for i in range(50)) + "\n")
    stream = first_documents(load_corpus([str(path)], streaming=True), 3)
    assert [row["text"] for row in stream] == ["document 0", "document 1", "document 2"]


def test_non_utf8_line_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nsecond line\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt line 3 is not valid UTF-8 \(byte 0xe9 at column 4\).*iconv"):
        load_corpus([str(path)])
    with pytest.raises(ValueError, match=r"latin1\.txt line 3"):
        load_corpus([str(path)], streaming=True)


def test_bad_jsonl_lines_and_empty_files_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl line 2 is not valid JSON"):
        load_corpus([str(broken)])
    listed = tmp_path / "listed.jsonl"
    listed.write_text('["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"listed\.jsonl line 1 is not a JSON object"):
        load_corpus([str(listed)])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        load_corpus([str(empty)])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_corpus([str(blank)], streaming=True)


def test_missing_text_column_names_the_columns_found(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body', 'title'\]\).*--text_column"):
            load_corpus([str(path)], streaming=streaming)


def test_no_validation_block_is_a_clear_error(tokenizer):
    blocks = pack_into_blocks(Dataset.from_dict({"text": ["a b c d"]}).to_iterable_dataset(), tokenizer, 64)
    with pytest.raises(ValueError, match="no complete block.*--validation_fraction"):
        take_blocks(blocks, 8)


def test_epoch_sampler_is_a_pure_function_of_seed_and_epoch():
    loader = DataLoader(range(50), batch_size=None, shuffle=True, generator=torch.Generator().manual_seed(7))
    reference = [list(loader) for _ in range(3)]  # a seeded shuffling DataLoader, epochs 0, 1, 2
    sampler = EpochShuffleSampler(50, seed=7)
    assert list(sampler) == reference[0]
    assert list(sampler) == reference[0]  # iterating again does not advance it
    for epoch in (2, 1, 0):  # any epoch, in any order
        sampler.set_epoch(epoch)
        assert list(sampler) == reference[epoch]
    assert reference[1] != reference[0] and sorted(reference[1]) == list(range(50))


def test_hub_dataset_offline_names_the_fix():
    with pytest.raises(ConnectionError, match=r"'someone/corpus'.*HF_HUB_OFFLINE.*--data_files"):
        load_corpus(dataset_name="someone/corpus")

"""Corpus loading, the document-level split and packing into blocks."""

import json

import pytest

from sonett.data import load_corpus, pack_into_blocks, split_by_document, stdlib_corpus
from sonett.tokenizer_training import train_bpe_tokenizer


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

"""The bad-input matrix, training data: missing, empty, blank, non-UTF-8, broken-JSON and unsupported data
files, refused by check_data_files and by every entry point that reads them (load_corpus, evaluation,
pretraining) before anything is written (docs/design.md, invariant 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sonett.data.corpus import check_data_files, load_corpus
from sonett.evaluation.scoring import EvaluationArguments, load_evaluation_text
from sonett.training.pretraining import PretrainArguments, pretrain

BAD_DATA = {
    "missing-column": (
        "rows.jsonl",
        b'{"body": "def f(): pass"}\n',
        ValueError,
        r"no column 'text' \(columns: \['body'\]\); pass --text_column",
    ),
    "empty-file": ("empty.txt", b"", ValueError, r"empty\.txt is empty; give a file with at least one document"),
    "blank-documents": ("blank.txt", b"\n   \n\n", ValueError, r"no non-empty documents in column 'text'; put text"),
    "latin1-text": (
        "latin1.txt",
        "caf\xe9 au lait\n".encode("latin-1"),
        ValueError,
        r"line 1 is not valid UTF-8 \(byte 0xe9 at column 4\); re-encode",
    ),
    "latin1-jsonl": (
        "latin1.jsonl",
        '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"),
        ValueError,
        r"line 2 is not valid UTF-8.*re-encode",
    ),
    "broken-json": (
        "broken.jsonl",
        b'{"text": "ok"}\n{"text": \n',
        ValueError,
        r"line 2 is not valid JSON.*one JSON object per line",
    ),
    "not-an-object": (
        "list.jsonl",
        b'["a", "b"]\n',
        ValueError,
        r"line 1 is not a JSON object; write one object per line",
    ),
    "unsupported-suffix": (
        "rows.csv",
        b"text\nhello\n",
        ValueError,
        r"Unsupported or mixed data files \['\.csv'\]; use one of",
    ),
    "missing-file": (None, None, FileNotFoundError, r"Data files not found.*check the --data_files paths"),
}
# Problems of the rows rather than the file: `check_data_files` passes them, the loaders refuse them.
ROW_PROBLEMS = {"missing-column", "blank-documents"}


def data_file(tmp_path: Path, case: str) -> str:
    name, content, _, _ = BAD_DATA[case]
    if name is None:
        return str(tmp_path / "nowhere.txt")
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


@pytest.mark.parametrize("case", sorted(set(BAD_DATA) - ROW_PROBLEMS))
def test_bad_data_files_through_check_data_files(tmp_path, case):
    _, _, error, message = BAD_DATA[case]
    with pytest.raises(error, match=message):
        check_data_files([data_file(tmp_path, case)])


@pytest.mark.parametrize("case", sorted(BAD_DATA))
@pytest.mark.parametrize("entry", ["load_corpus", "evaluation", "pretrain"])
def test_bad_data_files_through_the_entry_points(tmp_path, entry, case):
    _, _, error, message = BAD_DATA[case]
    path = data_file(tmp_path, case)
    with pytest.raises(error, match=message):
        if entry == "load_corpus":
            load_corpus([path])
        elif entry == "evaluation":  # what scripts/evaluate.py scores
            load_evaluation_text(EvaluationArguments(model=str(tmp_path), data_files=[path]))
        else:  # scripts/train.py
            pretrain(PretrainArguments(data_files=[path], output_dir=str(tmp_path / "run"), report_to="none", cpu=True))
    assert not (tmp_path / "run" / "model.safetensors").exists()

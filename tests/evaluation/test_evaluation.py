"""`sonett.evaluation.scoring` and `scripts/evaluate.py` on a tiny randomly initialised Sonett: the figures equal a
reference computed here from the model's logits with torch's cross-entropy, the default corpus is the held-out
split that pretraining scores, the script writes its JSON and PNGs, and bad inputs get errors naming the problem."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers_model import tiny_config
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from sonett import SonettForCausalLM
from sonett.data.corpus import load_corpus, pack_into_blocks, split_by_document
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.evaluation.scoring import EvaluationArguments, evaluate_causal_lm
from sonett.training.pretraining import evaluate_loss

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16
LINES = [
    f"line {i}: the {animal} sat on the {thing} and said {i * 7 % 13} words."
    for i, (animal, thing) in enumerate(
        zip(["cat", "dog", "owl", "fox", "eel"] * 6, ["mat", "log", "roof", "box", "rug", "hat"] * 5)
    )
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved, randomly initialised Sonett with all four layer kinds and a small BPE tokenizer."""
    tokenizer = train_bpe_tokenizer(LINES * 4, vocab_size=300, model_max_length=64)
    layers = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
    config = tiny_config(
        layer_types=layers,
        num_hidden_layers=len(layers),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny-sonett"
    SonettForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "lines.txt"
    path.write_text("\n".join([*LINES[:10], "", "   ", *LINES[10:]]) + "\n", encoding="utf-8")  # blank lines skipped
    return path


def reference_blocks(folder: Path, lines: list[str]) -> torch.Tensor:
    """Each non-blank line tokenized and ended with EOS, concatenated and cut into BLOCK-token rows (tail dropped)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stream = []
    for line in lines:
        if line.strip():
            stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    usable = len(stream) - len(stream) % BLOCK
    return torch.tensor(stream[:usable]).view(-1, BLOCK)


def test_perplexity_equals_cross_entropy_of_the_logits(model_folder, text_file):
    results = evaluate_causal_lm(
        EvaluationArguments(
            model=str(model_folder), data_files=[str(text_file)], block_size=BLOCK, batch_size=3, token_accuracy=True
        )
    )
    blocks = reference_blocks(model_folder, LINES)
    model = SonettForCausalLM.from_pretrained(model_folder).eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    targets = blocks[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    losses = losses.view(targets.shape).double()

    assert results["split"] == "all"
    assert results["num_blocks"] == blocks.shape[0] > 3  # more blocks than one batch, last batch partial
    assert results["num_tokens"] == targets.numel()
    assert results["loss"] == pytest.approx(losses.mean().item(), rel=1e-6)
    assert results["perplexity"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-6)
    block_perplexities = losses.mean(dim=1).exp()
    assert results["block_perplexities"] == pytest.approx(block_perplexities.tolist(), rel=1e-6)
    assert results["mean_block_perplexity"] == pytest.approx(block_perplexities.mean().item(), rel=1e-6)
    assert results["position_loss"] == pytest.approx(losses.mean(dim=0).tolist(), rel=1e-6)
    accuracy = (logits.argmax(-1) == targets).double().mean().item()
    assert results["token_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert results["perplexity"] > 50  # an untrained model on a 300-token vocabulary: close to uniform


def test_default_corpus_scores_the_split_pretraining_holds_out(model_folder):
    """The embedded corpus, cut and split as `pretrain` does, gives the loss of training's own `evaluate_loss`."""
    max_documents, fraction, max_blocks = 12, 0.25, 10
    args = EvaluationArguments(
        model=str(model_folder),
        max_documents=max_documents,
        validation_fraction=fraction,
        block_size=BLOCK,
        batch_size=4,
        max_blocks=max_blocks,
    )
    results = evaluate_causal_lm(args)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    corpus = load_corpus().select(range(max_documents))
    validation = split_by_document(corpus, fraction, key="path")["validation"]
    blocks = pack_into_blocks(validation, tokenizer, BLOCK).select(range(max_blocks))

    def collate(rows):
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "labels": ids}

    model = SonettForCausalLM.from_pretrained(model_folder)
    loss, tokens = evaluate_loss(model, DataLoader(blocks, batch_size=4, collate_fn=collate), Accelerator(cpu=True))
    assert results["split"] == "validation"
    assert results["data"] == "Python standard library source"
    assert results["num_tokens"] == tokens == max_blocks * (BLOCK - 1)
    assert results["loss"] == pytest.approx(loss, rel=1e-6)


def test_script_writes_results_json_and_png_plots(model_folder, text_file, tmp_path):
    output_dir = tmp_path / "eval"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "evaluate.py"),
        *("--model", str(model_folder), "--data_files", str(text_file), "--block_size", str(BLOCK)),
        *("--batch_size", "4", "--token_accuracy", "true", "--output_dir", str(output_dir)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads((output_dir / "results.json").read_text())
    expected = evaluate_causal_lm(
        EvaluationArguments(model=str(model_folder), data_files=[str(text_file)], block_size=BLOCK)
    )
    assert results["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-9)
    assert len(results["position_loss"]) == BLOCK - 1
    assert len(results["block_perplexities"]) == results["num_blocks"] == expected["num_blocks"]
    assert 0.0 <= results["token_accuracy"] <= 1.0
    for name in ("loss_by_position.png", "block_perplexity.png"):
        data = (output_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert f"perplexity:            {expected['perplexity']:.2f}" in completed.stdout
    assert str(output_dir / "results.json") in completed.stdout


def test_script_reports_a_missing_model_folder(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(tmp_path / "nowhere")]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 1
    assert f"error: No model folder at {tmp_path / 'nowhere'}" in completed.stderr
    assert "Traceback" not in completed.stderr


def run(model_folder: Path, **overrides) -> dict:
    return evaluate_causal_lm(EvaluationArguments(model=str(model_folder), block_size=BLOCK, **overrides))


def test_missing_or_incomplete_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model folder at .*; pass a folder written by `sonett train`"):
        run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        run(tmp_path)


def test_bad_data_files(model_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"Data file {empty} is empty"):
        run(model_folder, data_files=[str(empty)])

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"first line\nna\xefve caf\xe9\n")  # Latin-1 bytes
    with pytest.raises(ValueError, match=r"latin1.txt line 2 is not valid UTF-8 \(byte 0xef at column 3\).*iconv"):
        run(model_folder, data_files=[str(latin1)])

    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        run(model_folder, data_files=[str(blank)])

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "ab"}\n{"body": "cd"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\); pass --text_column"):
        run(model_folder, data_files=[str(rows)])
    with pytest.raises(ValueError, match="fewer than one block of 16"):
        run(model_folder, data_files=[str(rows)], text_column="body")

    with pytest.raises(FileNotFoundError, match="Data files not found"):
        run(model_folder, data_files=[str(tmp_path / "absent.txt")])


def test_bad_settings(model_folder, text_file):
    with pytest.raises(ValueError, match=r"split must be one of \('validation', 'train', 'all'\), got 'test'"):
        run(model_folder, data_files=[str(text_file)], split="test")
    with pytest.raises(ValueError, match=r"block_size 128 exceeds the model's max_position_embeddings \(64\)"):
        evaluate_causal_lm(EvaluationArguments(model=str(model_folder), data_files=[str(text_file)], block_size=128))
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        run(model_folder, data_files=[str(text_file)], batch_size=0)

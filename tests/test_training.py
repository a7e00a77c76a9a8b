"""The pretraining loop end to end: it learns, writes a complete Hub-ready folder, and the folder reloads
through the Auto classes with the exact validation loss the run reported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sonett.data import pack_into_blocks, split_by_document, stdlib_corpus
from sonett.training import PretrainArguments, build_config, config_from_preset, load_preset, pretrain

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = dict(
    max_documents=40,
    vocab_size=512,
    block_size=64,
    batch_size=8,
    max_steps=30,
    warmup_steps=5,
    eval_steps=15,
    eval_blocks=8,
    learning_rate=5e-3,
    validation_fraction=0.1,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "sonett-test"
    args = PretrainArguments(output_dir=str(output_dir), **SMALL_RUN)
    return args, pretrain(args)


def test_training_reduces_the_loss(run):
    _, results = run
    losses = [entry["loss"] for entry in results["loss_history"]]
    assert len(losses) == SMALL_RUN["max_steps"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert results["validation_perplexity"] == pytest.approx(math.exp(results["validation_loss"]))
    assert "validation_loss" in results["loss_history"][SMALL_RUN["eval_steps"] - 1]


def test_folder_is_hub_ready(run):
    args, results = run
    folder = Path(args.output_dir)
    names = {p.name for p in folder.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "training_results.json",
        "configuration_sonett.py",
        "modeling_sonett.py",
        "cache_sonett.py",
        "attention_sonett.py",
        "layers_sonett.py",
    }
    assert expected <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["vocab_size"] == SMALL_RUN["vocab_size"]
    card = (folder / "README.md").read_text()
    assert "$" not in card.split("```")[0]
    assert f"{results['validation_perplexity']:.4f}" in card
    assert "trust_remote_code=True" in card
    assert json.loads((folder / "training_results.json").read_text())["steps"] == SMALL_RUN["max_steps"]


def test_reloaded_folder_reproduces_the_reported_validation_loss(run):
    args, results = run
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    corpus = stdlib_corpus(max_documents=SMALL_RUN["max_documents"])
    validation = split_by_document(corpus, SMALL_RUN["validation_fraction"], key="path")["validation"]
    blocks = pack_into_blocks(validation, tokenizer, SMALL_RUN["block_size"])
    ids = torch.tensor(blocks["input_ids"][: SMALL_RUN["eval_blocks"]])
    with torch.no_grad():
        logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(results["validation_loss"], abs=1e-4)


@pytest.mark.parametrize("path", sorted((ROOT / "configuration").glob("sonett-*.json")), ids=lambda p: p.stem)
def test_every_preset_is_a_valid_config(path):
    config = config_from_preset(load_preset(str(path)))
    assert len(config.layer_types) == config.num_hidden_layers
    kinds = {"full_attention", "sliding_attention", "linear_attention", "memory_attention"}
    if path.stem.endswith("-constant"):
        assert "full_attention" not in config.layer_types
        assert set(config.layer_types) == kinds - {"full_attention"}
    else:
        assert set(config.layer_types) == kinds


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="sonett-tiny"):
        load_preset("no-such-preset")


def test_build_config_takes_vocab_and_special_ids_from_the_tokenizer(run):
    args, _ = run
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir, trust_remote_code=True)
    config = build_config(load_preset("sonett-tiny"), tokenizer)
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)


def test_train_script_runs_and_prints_a_sample(tmp_path):
    output_dir = tmp_path / "cli-run"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--output_dir", str(output_dir)]
    for key, value in {**SMALL_RUN, "max_steps": 4, "eval_steps": 0}.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation perplexity:" in result.stdout
    sample = result.stdout.split("trust_remote_code=True)):\n", 1)[1]
    assert sample.startswith("def read_config(path):")
    assert (output_dir / "model.safetensors").is_file()


def test_pretrain_on_local_jsonl_with_another_text_column(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": text}) for text in stdlib_corpus(max_documents=30)["text"]) + "\n")
    args = PretrainArguments(
        output_dir=str(tmp_path / "out"),
        data_files=[str(corpus)],
        text_column="body",
        **{**SMALL_RUN, "max_steps": 3, "eval_steps": 0, "max_documents": None},
    )
    results = pretrain(args)
    assert results["steps"] == 3
    assert results["training_data"] == str(corpus)
    assert (tmp_path / "out" / "model.safetensors").is_file()

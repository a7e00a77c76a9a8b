"""A corpus split too small for one block is named in the error, with what to do: the validation split used to be
reported as "the corpus" (127 tokens) while the training split held 225,680."""

import pytest
from datasets import Dataset
from test_training import write_micro_run_files

from sonett.data.corpus import pack_into_blocks
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.presets import load_preset
from sonett.training.arguments import PretrainArguments
from sonett.training.pretraining import make_accelerator, prepare_data


def test_a_validation_split_too_small_for_a_block_is_named(tmp_path):
    files = write_micro_run_files(tmp_path, documents=40)
    long_documents = [f"def step_{i}(value): return value * {i} + 1  # a line of code" for i in range(40)]
    (tmp_path / "corpus.txt").write_text("\n".join([*long_documents, "x = 1"]) + "\n")
    # no document hashes below 0.001, so the last one (a few tokens) is held out alone
    args = PretrainArguments(output_dir=str(tmp_path / "out"), **{**files, "validation_fraction": 0.001})
    with pytest.raises(ValueError) as error:
        prepare_data(args, make_accelerator(args), load_preset(args.config))
    message = str(error.value)
    assert message.startswith("The validation split (the documents held out by --validation_fraction 0.001) has only")
    assert "fewer than one block of 32; raise --validation_fraction" in message and "corpus" not in message


def test_pack_into_blocks_names_what_it_packs():
    tokenizer = train_bpe_tokenizer(["a tiny corpus of a few words"] * 4, vocab_size=300)
    with pytest.raises(ValueError, match=r"^The training split has only \d+ tokens, fewer than one block of 4096; lo"):
        pack_into_blocks(Dataset.from_dict({"text": ["tiny"]}), tokenizer, 4096, name="training split")

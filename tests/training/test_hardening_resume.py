"""Hardening of resuming and of the training data (issue 15, items 5 and 10).

- A checkpoint stores content hashes of the model config as used and of every data file; resuming after the preset
  was edited in place or the data file was appended to is refused, naming the field or the file, unless
  `--allow_changed_inputs` (then a warning names what changed). Checkpoints from before the hashes warn.
- A hand-edited `trainer_state.json` (invalid JSON, missing keys, wrong types) is a damaged checkpoint.
- Data files of only `{}` lines, a top-level JSON string and a corrupt parquet file are refused naming the file.
- An over-long document is tokenised in bounded pieces cut at spaces, with the ids of the whole document, and
  without the memory of tokenising it at once.
"""

import copy
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from datasets import Dataset
from helpers_training import write_micro_run_files
from tokenizers import normalizers

import sonett.data.corpus as data_module
from sonett.data.corpus import check_data_files, load_corpus, pack_into_blocks, split_long_documents, stdlib_corpus
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.training.checkpointing import STATE_FILE, read_checkpoint
from sonett.training.pretraining import PretrainArguments, pretrain

ROOT = Path(__file__).resolve().parents[2]
# 2 optimizer steps with a checkpoint after each; no validation until the end
RUN = dict(max_steps=2, eval_steps=0, checkpointing_steps=1, cpu=True)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished micro run with checkpoints step_1 and step_2; its arguments."""
    folder = tmp_path_factory.mktemp("resume-inputs")
    args = PretrainArguments(output_dir=str(folder / "run"), **{**write_micro_run_files(folder), **RUN})
    pretrain(args)
    return args


@pytest.fixture
def run_inputs(saved_run):
    """The run's arguments; the preset and data files it used are restored after the test edits them."""
    paths = [Path(saved_run.config), *map(Path, saved_run.data_files)]
    original = {path: path.read_bytes() for path in paths}
    yield saved_run
    for path, content in original.items():
        path.write_bytes(content)


def _resume_args(args: PretrainArguments, output_dir: Path, **changes) -> PretrainArguments:
    checkpoint = Path(args.output_dir) / "checkpoints" / "step_1"
    return dataclasses.replace(args, output_dir=str(output_dir), resume_from_checkpoint=str(checkpoint), **changes)


def _edit_preset(path: str) -> None:
    preset = json.loads(Path(path).read_text())
    preset["layer_types"] = [kind.replace("full_attention", "sliding_attention") for kind in preset["layer_types"]]
    Path(path).write_text(json.dumps(preset))


# --- item 5: resume compares contents -----------------------------------------------------------------------------


def test_preset_edited_in_place_is_refused_naming_the_field(run_inputs, tmp_path):
    _edit_preset(run_inputs.config)
    with pytest.raises(ValueError, match=r"model config.*layer_types \(\[.*'full_attention'\] -> \[.*'sliding_at"):
        pretrain(_resume_args(run_inputs, tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_appended_data_file_is_refused_naming_the_file(run_inputs, tmp_path):
    corpus = Path(run_inputs.data_files[0])
    size = corpus.stat().st_size
    with corpus.open("a") as handle:
        handle.write("def appended(): return 1\n")
    message = rf"data file {corpus} \({size:,} bytes, sha256 [0-9a-f]{{12}}.* -> {corpus.stat().st_size:,} bytes"
    with pytest.raises(ValueError, match=message + r".*--allow_changed_inputs"):
        pretrain(_resume_args(run_inputs, tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_reformatted_preset_with_the_same_values_is_not_a_change(run_inputs, tmp_path):
    preset = json.loads(Path(run_inputs.config).read_text())
    preset["_comment"] = "reworded comment"
    Path(run_inputs.config).write_text(json.dumps(dict(reversed(preset.items())), indent=4))
    results = pretrain(_resume_args(run_inputs, tmp_path / "out"))
    assert results["steps"] == 2


def test_allow_changed_inputs_resumes_with_a_warning_naming_the_change(run_inputs, tmp_path, caplog):
    _edit_preset(run_inputs.config)
    with caplog.at_level(logging.WARNING, logger="sonett.training.checkpointing"):
        results = pretrain(_resume_args(run_inputs, tmp_path / "out", allow_changed_inputs=True))
    assert results["steps"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--allow_changed_inputs" in w and "layer_types" in w for w in warnings), warnings
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "full_attention" not in config["layer_types"]
    # the checkpoints of the resumed run record the changed preset, so resuming from them needs no override
    recorded = read_checkpoint(tmp_path / "out" / "checkpoints" / "step_2")["inputs"]["config"]["values"]
    assert recorded["layer_types"] == json.loads(Path(run_inputs.config).read_text())["layer_types"]


def test_checkpoint_without_hashes_warns_and_resumes(run_inputs, tmp_path, caplog):
    checkpoint = tmp_path / "old" / "step_1"
    shutil.copytree(Path(run_inputs.output_dir) / "checkpoints" / "step_1", checkpoint)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["inputs"]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    args = dataclasses.replace(run_inputs, output_dir=str(tmp_path / "out"), resume_from_checkpoint=str(checkpoint))
    with caplog.at_level(logging.WARNING, logger="sonett.training.checkpointing"):
        assert pretrain(args)["steps"] == 2
    assert any("no content hashes" in r.getMessage() for r in caplog.records)


def test_hashing_a_large_data_file_reads_it_in_blocks(tmp_path):
    from sonett.training.checkpointing import file_sha256

    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(64 * 2**20)  # 64 MiB of zero bytes (sparse)
    tracemalloc.start()
    try:
        digest = file_sha256(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == "3b6a07d0d404fab4e23b6d34bc6696a6a312dd92821332385e5af7c01c421351"  # sha256 of 64 MiB of zeros
    assert peak < 4 * 2**20


# --- item 10: a hand-edited trainer_state.json is a damaged checkpoint --------------------------------------------


def _state_edits() -> dict:
    def drop(key):
        return lambda state: {k: v for k, v in state.items() if k != key}

    def put(key, value):
        return lambda state: {**state, key: value}

    return {
        "invalid-json": (None, r"trainer_state.json is not valid JSON"),
        "not-an-object": (lambda state: [state], r"trainer_state.json is not a JSON object"),
        "no-step": (drop("step"), r"trainer_state.json has no 'step'"),
        "no-arguments": (drop("arguments"), r"trainer_state.json has no 'arguments'"),
        "step-as-string": (put("step", "1"), r"'step' is str, not int"),
        "negative-epoch": (put("epoch", -1), r"'epoch' is -1"),
        "history-not-a-list": (put("history", {"step": 1}), r"'history' is dict, not list"),
        "history-entry": (put("history", [{"step": 1, "loss": "low"}]), r"'history'\[0\]: 'loss' is str"),
        "files-not-a-dict": (put("files", ["model.safetensors"]), r"'files' is list, not dict"),
        "file-outside": (put("files", {"../x": 1}), r"'files' names '\.\./x', a path outside the checkpoint"),
        "no-max-steps": (
            lambda state: {**state, "arguments": {k: v for k, v in state["arguments"].items() if k != "max_steps"}},
            r"'arguments' has no 'max_steps'",
        ),
        "num-processes-zero": (put("num_processes", 0), r"'num_processes' is 0"),
    }


STATE_EDITS = _state_edits()


@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_hand_edited_trainer_state_is_a_damaged_checkpoint(saved_run, tmp_path, case):
    edit, message = STATE_EDITS[case]
    checkpoint = tmp_path / "checkpoints" / "step_1"
    shutil.copytree(Path(saved_run.output_dir) / "checkpoints" / "step_1", checkpoint)
    state_file = checkpoint / STATE_FILE
    if edit is None:
        state_file.write_text(state_file.read_text()[:-20])
    else:
        state_file.write_text(json.dumps(edit(json.loads(state_file.read_text()))))
    with pytest.raises(ValueError, match=rf"Checkpoint {checkpoint} is damaged: .*{message}.*Resume from another"):
        read_checkpoint(checkpoint)


def test_hand_edited_trainer_state_is_refused_by_pretrain(saved_run, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_1"
    shutil.copytree(Path(saved_run.output_dir) / "checkpoints" / "step_1", checkpoint)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).write_text(json.dumps({**state, "tokens_seen": 1.5}))
    args = dataclasses.replace(saved_run, output_dir=str(tmp_path / "out"), resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=r"is damaged: .*'tokens_seen' is float, not int"):
        pretrain(args)


# --- item 10: data files that parse to nothing ---------------------------------------------------------------------

BAD_FILES = {
    "empty-objects": ("rows.jsonl", b"{}\n{}\n", r"rows\.jsonl has no fields: every line is an empty JSON object"),
    "json-string": ("hello.json", b'"hello"', r"hello\.json holds a JSON string at the top level, not objects"),
    "json-number": ("n.json", b"\n 42\n", r"n\.json holds a JSON number at the top level"),
    "corrupt-parquet": ("rows.parquet", b"PAR1garbagePAR1", r"rows\.parquet is not a readable Parquet file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("entry", ["check_data_files", "load_corpus", "streaming", "pretrain"])
def test_data_files_that_hold_no_rows_are_refused_naming_the_file(tmp_path, case, entry):
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        if entry == "check_data_files":
            check_data_files([str(path)])
        elif entry == "load_corpus":
            load_corpus([str(path)])
        elif entry == "streaming":
            load_corpus([str(path)], streaming=True)
        else:
            pretrain(PretrainArguments(data_files=[str(path)], output_dir=str(tmp_path / "run"), report_to="none"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_json_array_and_json_lines_files_still_load(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "first"}, {"text": "second"}]))
    assert load_corpus([str(array)])["text"] == ["first", "second"]
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{}\n{"text": "b"}\n')
    assert load_corpus([str(lines)])["text"] == ["a", "b"]


# --- item 10: over-long documents are tokenised in bounded pieces ----------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(stdlib_corpus(max_documents=20)["text"], vocab_size=400)


def test_long_documents_are_tokenised_in_pieces_with_the_ids_of_the_whole(tokenizer, monkeypatch):
    texts = stdlib_corpus(max_documents=12)["text"][4:12]
    texts.append("word  \t two\n\n" * 300 + " trailing   spaces   ")
    stream = [
        token
        for text in texts
        for token in [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ]
    monkeypatch.setattr(data_module, "MAX_TOKENIZE_CHARS", 1000)
    assert max(map(len, texts)) > 10_000
    blocks = pack_into_blocks(Dataset.from_dict({"text": texts}), tokenizer, block_size=16)
    packed = [token for block in blocks["input_ids"] for token in block]
    assert len(packed) == len(stream) - len(stream) % 16
    assert packed == stream[: len(packed)]  # the ids of tokenising every document whole
    # a BPE trained on the pieces is the BPE trained on the whole documents
    trained = train_bpe_tokenizer(texts, vocab_size=400)
    assert train_bpe_tokenizer(split_long_documents(texts), vocab_size=400).get_vocab() == trained.get_vocab()
    assert len(list(split_long_documents(texts))) > len(texts)


def test_a_run_without_spaces_longer_than_a_piece_is_cut_with_a_warning(tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(data_module, "MAX_TOKENIZE_CHARS", 1000)
    text = "x" * 2500 + " y"
    with caplog.at_level(logging.WARNING, logger="sonett.data.corpus"):
        blocks = pack_into_blocks(Dataset.from_dict({"text": [text]}), tokenizer, block_size=4)
    assert any("run(s) of more than 1,000 characters without a space" in r.getMessage() for r in caplog.records)
    packed = [token for block in blocks["input_ids"] for token in block]
    assert tokenizer.decode(packed) == text[: len(tokenizer.decode(packed))]  # nothing lost or reordered


def test_a_tokenizer_that_cuts_change_refuses_over_long_documents(tokenizer, monkeypatch):
    prefixing = copy.deepcopy(tokenizer)  # adds a marker before every text, as SentencePiece-style tokenizers do
    prefixing.backend_tokenizer.normalizer = normalizers.Prepend("\u2581")
    monkeypatch.setattr(data_module, "MAX_TOKENIZE_CHARS", 1000)
    short = pack_into_blocks(Dataset.from_dict({"text": ["a b " * 200]}), prefixing, block_size=4)
    assert len(short) > 0  # documents within the limit are tokenised whole, as before
    with pytest.raises(ValueError, match=r"1,200 characters is longer than 1,000.*other ids for a text cut at a space"):
        pack_into_blocks(Dataset.from_dict({"text": ["a b " * 300]}), prefixing, block_size=4)


PEAK_SCRIPT = """
import resource, sys
from datasets import Dataset, disable_caching
import sonett.data.corpus as data
from sonett.data.tokenizer import train_bpe_tokenizer

disable_caching()
data.MAX_TOKENIZE_CHARS = 100_000
tokenizer = train_bpe_tokenizer(data.stdlib_corpus(max_documents=10)["text"], vocab_size=300)
words = ["def", "return", "value", "self", "import", "(x)", "=", "+", "1234", "# note", "class", "None:"]
line = " ".join(words[(i * 7) % len(words)] for i in range(int(float(sys.argv[1]) * 1e6 / 5)))
dataset = Dataset.from_dict({"text": [line, "short"]})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
blocks = data.pack_into_blocks(dataset, tokenizer, 256)
print(len(line), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_tokenising_a_2mb_line_stays_within_bounded_memory(tmp_path):
    # tokenised at once, a 2 MB line takes about 380 MiB (175 bytes per character); in pieces of 100,000
    # characters the tokenizer holds about 17 MiB at a time, and the ids of the line about 30 MiB
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent(PEAK_SCRIPT))
    out = subprocess.run([sys.executable, str(script), "2"], capture_output=True, text=True, check=True)
    characters, extra_mib = map(int, out.stdout.split())
    assert characters > 2_000_000
    assert extra_mib < 150, f"tokenising a {characters:,}-character line took {extra_mib} MiB more"


def test_a_local_dataset_folder_is_compared_by_content(tmp_path):
    """`--dataset_name ./folder` (which `load_dataset` reads) is hashed file by file, not compared by name only."""
    fields = write_micro_run_files(tmp_path)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    corpus = dataset / "train.txt"
    shutil.move(fields.pop("data_files")[0], corpus)
    args = PretrainArguments(output_dir=str(tmp_path / "run"), dataset_name=str(dataset), **{**fields, **RUN})
    pretrain(args)
    with corpus.open("a") as handle:
        handle.write("def appended(): return 1\n")
    (dataset / "more.txt").write_text("def added(): return 2\n")
    message = rf"data file {dataset / 'more.txt'} \(added, 22 bytes\); data file {corpus} \(2,780 bytes, sha256 "
    with pytest.raises(ValueError, match=message):
        pretrain(_resume_args(args, tmp_path / "out"))

"""LoRA / DoRA fine-tuning (`sonett.training.finetuning`, `scripts/finetune.py`) on a tiny model with its own tokenizer:
answer-only labels, training lowers the validation loss, docs/design.md, invariant 8 (adapters save, load and merge with
identical logits, the merged folder through remote code in a fresh process), the target preset reaches every mixer
kind and the cross-attention blocks, DoRA, the embedded instruction set, and the errors for bad input.

Invariant 7 (Trainer gradient accumulation equals one big batch) is tested in tests/model/test_modeling.py."""

import importlib
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_model import max_diff
from helpers_remote import EVERY_KIND, NO_PACKAGE_PREAMBLE, fresh_process_env
from helpers_training import MIXER_PROJECTIONS, MLP_PROJECTIONS, every_kind_config
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sonett import SonettForCausalLM, SonettForConditionalGeneration
from sonett.data.instructions import default_instruction_splits, instruction_records
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.training.finetuning import (
    LORA_TARGET_MODULES,
    TRAINING_DEFAULTS,
    ChatDataCollator,
    FinetuneArguments,
    check_chat_template,
    conversations,
    finetune,
    load_base_model,
    load_conversations,
    load_splits,
    parse_target_modules,
    tokenize_conversations,
)

ROOT = Path(__file__).resolve().parents[2]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 7 + 5?"},
    {"role": "assistant", "content": "7 + 5 = 12"},
    {"role": "user", "content": "Sort: tree, apple"},
    {"role": "assistant", "content": "apple, tree"},
]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny Sonett with every mixer kind and a small BPE tokenizer trained on the embedded instruction set."""
    folder = tmp_path_factory.mktemp("base")
    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in instruction_records()]
    tokenizer = train_bpe_tokenizer(["system user assistant"] * 5 + texts, vocab_size=512, min_frequency=2)
    torch.manual_seed(0)
    SonettForCausalLM(every_kind_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "scripts" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli_run(base_folder, tmp_path_factory):
    """`scripts/finetune.py --merge` on the embedded instruction set: 30 LoRA steps on the tiny model."""
    output_dir = tmp_path_factory.mktemp("cli") / "adapter"
    argv = ["--base_model", str(base_folder), "--output_dir", str(output_dir), "--merge", "--max_steps", "30"]
    argv += ["--learning_rate", "1e-2", "--logging_steps", "100", "--disable_tqdm", "true"]
    results = load_script().main(argv)
    return output_dir, results


def sample_ids(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    encoded = tokenizer.apply_chat_template([CHAT, CHAT[:3]], return_dict=True, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def logits_of(model, ids, attention_mask):
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=attention_mask).logits


# ----------------------------------------------------------------------------------------------------------
# Data: labels, collator, embedded set
# ----------------------------------------------------------------------------------------------------------


def label_runs(labels):
    """Contiguous runs of positions whose label is not -100, as lists of token ids."""
    runs, current = [], []
    for token in labels:
        if token == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return runs + ([current] if current else [])


def test_labels_are_exactly_the_assistant_answers(base_folder):
    tokenizer = AutoTokenizer.from_pretrained(base_folder, trust_remote_code=True)
    rows = [{"messages": CHAT}, {"instruction": "Reverse the order of these words.", "input": "a, b", "output": "b, a"}]
    tokenized = tokenize_conversations(conversations(rows), tokenizer, max_length=512)

    chat, instruction = tokenized[0], tokenized[1]
    for row in (chat, instruction):
        kept = [(i, t) for i, t in enumerate(row["labels"]) if t != -100]
        assert all(row["input_ids"][i] == t for i, t in kept), "labels must copy the input ids (unshifted)"
    assert [tokenizer.decode(run) for run in label_runs(chat["labels"])] == ["7 + 5 = 12<|end|>", "apple, tree<|end|>"]
    assert [tokenizer.decode(run) for run in label_runs(instruction["labels"])] == ["b, a<|end|>"]
    prompt = tokenizer.decode(instruction["input_ids"])
    assert prompt.startswith("<|bos|><|start|>user\nReverse the order of these words.\n\na, b<|end|>\n")
    assert prompt.endswith("<|start|>assistant\nb, a<|end|>\n")

    short = tokenize_conversations(conversations(rows[:1]), tokenizer, max_length=len(chat["input_ids"]) - 3)
    assert short[0]["labels"] == chat["labels"][:-3]

    batch = ChatDataCollator(pad_token_id=tokenizer.pad_token_id)([instruction, chat])
    width = len(chat["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    n = len(instruction["input_ids"])
    assert batch["input_ids"][0].tolist() == instruction["input_ids"] + [tokenizer.pad_token_id] * (width - n)
    assert batch["labels"][0].tolist() == instruction["labels"] + [-100] * (width - n), "right padding, -100"
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][1].tolist() == chat["labels"]


def check_record(record):
    """Recompute the answer of one embedded example from its question."""
    task, question, given, answer = record["task"], record["instruction"], record["input"], record["output"]
    if task == "arithmetic":
        a, op, b, result = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", answer).groups()
        assert re.search(rf"\b{a}\b", question) and re.search(rf"\b{b}\b", question)
        assert int(result) == {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}[op](
            int(a), int(b)
        )
        assert op != "/" or int(a) % int(b) == 0
    elif task in ("reverse", "sort", "count"):
        words = given.split(", ")
        expected = {"reverse": ", ".join(words[::-1]), "sort": ", ".join(sorted(words)), "count": str(len(words))}
        assert answer == expected[task]
    else:
        name = re.search(r"`([\w.]+)`", question).group(1)
        if task == "module_of":
            assert callable(getattr(importlib.import_module(answer), name))
            return
        module_name, function_name = name.rsplit(".", 1)
        function = getattr(importlib.import_module(module_name), function_name)
        if task == "summary":
            assert answer == inspect.getdoc(function).splitlines()[0].strip()
        else:
            assert f"({answer})" in str(inspect.signature(function))


def test_embedded_instruction_set_is_checkable_and_split_cleanly():
    records = instruction_records()
    assert len(records) >= 800
    assert {r["task"] for r in records} == {
        "arithmetic", "reverse", "sort", "count", "module_of", "summary", "signature",
    }  # fmt: skip
    for record in records:
        check_record(record)
    splits = default_instruction_splits(validation_size=100)
    assert len(splits["train"]) + len(splits["validation"]) == len(records)
    train_keys = {(r["instruction"], r["input"]) for r in splits["train"]}
    assert not train_keys & {(r["instruction"], r["input"]) for r in splits["validation"]}
    assert splits["validation"].to_list() == default_instruction_splits(validation_size=100)["validation"].to_list()


def test_user_files_are_split_or_paired_with_validation_files(tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(10)]
    train_file, validation_file = tmp_path / "train.jsonl", tmp_path / "validation.json"
    train_file.write_bytes(jsonl(*rows))
    validation_file.write_text(json.dumps([GOOD, GOOD]))  # a JSON array works too

    held_out = load_splits(FinetuneArguments(data_files=[str(train_file)], validation_share=0.2), seed=1)
    assert (len(held_out["train"]), len(held_out["validation"])) == (8, 2)
    answers = [m[1]["content"] for split in held_out.values() for m in split["messages"]]
    assert sorted(answers) == [str(i) for i in range(10)]
    paired = load_splits(FinetuneArguments(data_files=[str(train_file)], validation_files=[str(validation_file)]))
    assert len(paired["train"]) == 10 and paired["validation"]["messages"] == [GOOD["messages"]] * 2

    train_file.write_bytes(jsonl(rows[0]))
    with pytest.raises(ValueError, match=r"Cannot hold out .* of 1 rows; pass --validation_files"):
        load_splits(FinetuneArguments(data_files=[str(train_file)]))
    assert parse_target_modules(None) == LORA_TARGET_MODULES
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"--target_modules '\(q' is not a valid regular expression"):
        parse_target_modules("(q")


# ----------------------------------------------------------------------------------------------------------
# Training, saving, loading, merging (docs/design.md, invariant 8)
# ----------------------------------------------------------------------------------------------------------


def test_lora_training_lowers_validation_loss(cli_run):
    output_dir, results = cli_run
    assert results["steps"] == 30
    assert results["validation_loss_after"] < results["validation_loss_before"] - 0.5, results
    assert 0 < results["trainable_share"] < 0.5
    assert json.loads((output_dir / "finetune_results.json").read_text())["steps"] == 30
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (output_dir / name).is_file(), name
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter["target_modules"] == LORA_TARGET_MODULES and adapter["task_type"] == "CAUSAL_LM"


def test_adapter_saves_loads_and_merges_with_identical_logits(cli_run, base_folder):
    output_dir, _ = cli_run
    ids, attention_mask = sample_ids(base_folder)
    base = AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=True)
    base_logits = logits_of(base, ids, attention_mask)
    base_embeddings = base.get_input_embeddings().weight.detach().clone()

    adapted = PeftModel.from_pretrained(base, output_dir)
    reference = logits_of(adapted, ids, attention_mask)
    assert max_diff(reference, base_logits) > 1e-2, "the trained adapter must change the logits"
    auto = AutoPeftModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    assert max_diff(logits_of(auto, ids, attention_mask), reference) <= 1e-5

    merged = adapted.merge_and_unload()
    assert max_diff(logits_of(merged, ids, attention_mask), reference) <= 1e-4
    # Trainable tokens: the special rows moved, the others did not, and the output layer stays tied to them.
    tokenizer = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=True)
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|start|>", "<|end|>")]
    embeddings = merged.get_input_embeddings().weight
    assert merged.lm_head.weight.data_ptr() == embeddings.data_ptr()
    assert all(max_diff(embeddings[i], base_embeddings[i]) > 1e-3 for i in special)
    assert torch.equal(embeddings[len(tokenizer) - 1], base_embeddings[len(tokenizer) - 1])

    from_folder = AutoModelForCausalLM.from_pretrained(output_dir / "merged", trust_remote_code=True)
    assert max_diff(logits_of(from_folder, ids, attention_mask), reference) <= 1e-4


FRESH_LOAD = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder, inputs, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    batch = load_file(inputs)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    save_file({"logits": logits.contiguous()}, out)
    """
)


def test_merged_folder_loads_through_remote_code_in_a_fresh_process(cli_run, base_folder, tmp_path):
    output_dir, results = cli_run
    assert results["merged_dir"] == str(output_dir / "merged")
    ids, attention_mask = sample_ids(base_folder)
    adapted = AutoPeftModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    reference = logits_of(adapted, ids, attention_mask)
    save_file({"input_ids": ids, "attention_mask": attention_mask}, tmp_path / "inputs.safetensors")
    (tmp_path / "load.py").write_text(FRESH_LOAD)
    command = [sys.executable, "load.py", results["merged_dir"], "inputs.safetensors", "out.safetensors"]
    done = subprocess.run(command, cwd=tmp_path, env=fresh_process_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_diff(load_file(tmp_path / "out.safetensors")["logits"], reference) <= 1e-4


def test_dora_trains_and_its_adapter_reloads_identically(base_folder, tmp_path):
    splits = default_instruction_splits(validation_size=16)
    splits["train"] = splits["train"].select(range(48))
    splits = {name: conversations(split.to_list()) for name, split in splits.items()}
    settings = {**TRAINING_DEFAULTS, "output_dir": str(tmp_path / "dora"), "max_steps": 3, "learning_rate": 1e-2}
    args = FinetuneArguments(base_model=str(base_folder), use_dora=True, lora_rank=4)
    results = finetune(args, TrainingArguments(**settings, disable_tqdm=True), splits)
    assert results["steps"] == 3
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    assert any("lora_magnitude_vector" in key for key in load_file(tmp_path / "dora" / "adapter_model.safetensors"))

    ids, attention_mask = sample_ids(base_folder)
    base = AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=True)
    base_logits = logits_of(base, ids, attention_mask)
    adapted = PeftModel.from_pretrained(base, tmp_path / "dora")
    reference = logits_of(adapted, ids, attention_mask)
    assert max_diff(reference, base_logits) > 1e-3
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "dora", trust_remote_code=True)
    assert max_diff(logits_of(auto, ids, attention_mask), reference) <= 1e-5
    assert max_diff(logits_of(adapted.merge_and_unload(), ids, attention_mask), reference) <= 1e-4


# ----------------------------------------------------------------------------------------------------------
# The target preset
# ----------------------------------------------------------------------------------------------------------


def test_preset_targets_every_mixer_kind_and_the_cross_attention_blocks(base_folder):
    tokenizer = AutoTokenizer.from_pretrained(base_folder, trust_remote_code=True)
    torch.manual_seed(0)
    text = SonettForCausalLM(every_kind_config(tokenizer))
    vision = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
    model = SonettForConditionalGeneration.from_text_model(text, [0, 2], vision_config=vision, image_token_id=3)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=LORA_TARGET_MODULES))

    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    expected = set()
    for i, kind in enumerate(EVERY_KIND):
        expected |= {f"model.layers.{i}.mixer.{p}" for p in MIXER_PROJECTIONS[kind]}
        expected |= {f"model.layers.{i}.mlp.{p}" for p in MLP_PROJECTIONS}
    for i in ("0", "2"):
        expected |= {
            f"model.cross_attention_blocks.{i}.cross_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        expected |= {f"model.cross_attention_blocks.{i}.mlp.{p}" for p in MLP_PROJECTIONS}
    assert wrapped == expected
    assert not any(name.startswith(("vision_model", "multi_modal_projector")) for name in wrapped)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(*rows):
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


BAD_FILES = {
    "empty": (b"", r"has no rows; the files are empty"),
    "blank lines": (b"\n  \n", r"has no rows; the files are empty"),
    "no messages column": (
        jsonl({"text": "hi", "label": 1}),
        r"row 0 .* has columns \['label', 'text'\] but no `messages`",
    ),
    "wrong role": (
        jsonl(GOOD, {"messages": [{"role": "bot", "content": "x"}]}),
        r"row 1 \(.*line 2\).*role 'bot'; use one of \['system', 'user', 'assistant'\]",
    ),
    "no assistant turn": (
        jsonl(GOOD, GOOD, {"messages": [{"role": "user", "content": "x"}]}),
        r"row 2 .* no assistant turn",
    ),
    "messages not a list": (jsonl({"messages": "hello"}), r"row 0 .*`messages` must be a non-empty list"),
    "content not a string": (
        jsonl({"messages": [{"role": "assistant", "content": 3}]}),
        r"row 0 .*content must be a string",
    ),
    "not UTF-8": (jsonl(GOOD) + '{"messages": "café"}\n'.encode("latin-1"), r"is not UTF-8: .* on line 2.*iconv"),
    "not JSON": (jsonl(GOOD, GOOD) + b'{"messages": [\n', r"line 3 is not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_files_name_the_problem(case, tmp_path):
    content, message = BAD_FILES[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_conversations([str(path)])


def test_bad_base_models_and_templates_name_the_fix(base_folder, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(jsonl(GOOD, GOOD))
    script = load_script()
    with pytest.raises(FileNotFoundError, match=r"'.*missing' is neither a local folder.*make demo"):
        script.main(["--base_model", str(tmp_path / "missing"), "--data_files", str(data), "--output_dir", "x"])
    with pytest.raises(FileNotFoundError, match=r"has no config.json.*make demo"):
        load_base_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"The training data is empty"):
        conversations([], name="training data")

    tokenizer = AutoTokenizer.from_pretrained(base_folder, trust_remote_code=True)
    check_chat_template(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"does not mark assistant replies with \{% generation %\}"):
        check_chat_template(tokenizer)
    with pytest.raises(ValueError, match=r"No conversation has an answer token within max_length=4"):
        tokenize_conversations(
            conversations([GOOD]), AutoTokenizer.from_pretrained(base_folder, trust_remote_code=True), max_length=4
        )

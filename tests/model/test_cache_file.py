"""SonettCache on disk: save/load continues decoding exactly, refuses foreign or damaged files, stays constant-size
without full attention; `scripts/chat.py --memory` continues a conversation in a later process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_model import random_ids, tiny_config

from sonett import SonettCache, SonettForCausalLM
from sonett.data.corpus import stdlib_corpus
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.inference.conversation import Conversation

ROOT = Path(__file__).resolve().parents[2]
MIXES = {
    "sliding-full": ["sliding_attention", "full_attention"],
    "every-kind": ["linear_attention", "sliding_attention", "memory_attention", "full_attention"],
    "constant": ["sliding_attention", "linear_attention", "memory_attention"],
}


def model_for(mix, seed=0, **overrides):
    torch.manual_seed(seed)
    layers = MIXES[mix]
    config = tiny_config("full", layer_types=layers, num_hidden_layers=len(layers), **overrides)
    return SonettForCausalLM(config).eval()


def greedy(model, cache, first_logits, steps):
    tokens, logits = [], first_logits
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        logits = model(token, cache=cache).logits
    return torch.cat(tokens, 1), logits


@pytest.mark.parametrize("mix", list(MIXES))
def test_saved_cache_continues_exactly_like_the_in_memory_one(mix, tmp_path):
    model = model_for(mix)
    ids = random_ids(2, 11)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        out.cache.save(tmp_path / "state.safetensors")
        loaded = SonettCache.load(tmp_path / "state.safetensors", model.config)
        assert loaded.get_seq_length() == 11
        in_memory_tokens, in_memory_logits = greedy(model, out.cache, out.logits, 8)
        loaded_tokens, loaded_logits = greedy(model, loaded, out.logits, 8)
    assert torch.equal(in_memory_tokens, loaded_tokens)
    assert torch.equal(in_memory_logits, loaded_logits)


def test_memory_file_from_another_config_is_refused(tmp_path):
    model = model_for("every-kind")
    with torch.no_grad():
        cache = model(random_ids(1, 6), use_cache=True).cache
    cache.save(tmp_path / "state.safetensors")
    other = model_for("every-kind", sliding_window=6).config
    with pytest.raises(ValueError, match=r"another config \(sliding_window: file 4 vs model 6\)"):
        SonettCache.load(tmp_path / "state.safetensors", other)
    layers = model_for("constant").config
    with pytest.raises(ValueError, match="layer_types"):
        SonettCache.load(tmp_path / "state.safetensors", layers)


def test_truncated_or_foreign_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = model_for("every-kind")
    with torch.no_grad():
        cache = model(random_ids(1, 6), use_cache=True).cache
    path = tmp_path / "state.safetensors"
    cache.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SonettCache.load(tmp_path / "cut.safetensors", model.config)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SonettCache.load(tmp_path / "empty.safetensors", model.config)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Sonett memory file"):
        SonettCache.load(tmp_path / "other.safetensors", model.config)
    with pytest.raises(FileNotFoundError, match="No memory file"):
        SonettCache.load(tmp_path / "missing.safetensors", model.config)
    assert not list(tmp_path.glob("*.partial"))


def test_state_without_full_attention_has_the_same_size_after_1k_and_32k_tokens(tmp_path):
    model = model_for("constant")
    sizes = {}
    with torch.no_grad():
        cache = model.make_cache()
        fed = 0
        for target in (1024, 32768):
            while fed < target:
                chunk = random_ids(1, 2048 if target - fed >= 2048 else target - fed, seed=fed)
                model(chunk, cache=cache, use_cache=True)
                fed += chunk.shape[1]
            path = tmp_path / f"state-{target}.safetensors"
            cache.save(path)
            sizes[target] = (path.stat().st_size, cache.nbytes())
        assert cache.get_seq_length() == 32768
    assert sizes[1024][1] == sizes[32768][1]
    # The files differ only in the token counters written into the header (a few digits, 8-byte aligned).
    assert abs(sizes[1024][0] - sizes[32768][0]) <= 16


def test_state_with_full_attention_grows(tmp_path):
    model = model_for("sliding-full")
    with torch.no_grad():
        cache = model(random_ids(1, 64), use_cache=True).cache
        small = cache.nbytes()
        model(random_ids(1, 64, seed=5), cache=cache)
    assert cache.nbytes() > small


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-model")
    tokenizer = train_bpe_tokenizer(stdlib_corpus(max_documents=20)["text"], vocab_size=400)
    torch.manual_seed(0)
    layers = MIXES["every-kind"]
    config = tiny_config(
        "full", layer_types=layers, num_hidden_layers=len(layers), vocab_size=len(tokenizer), eos_token_id=2
    )
    SonettForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_chat(folder, memory, lines, tmp_path):
    # This checkout's package, also where another one is installed (a git worktree beside the main checkout).
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(ROOT / "modeling")}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "chat.py"),
            str(folder),
            "--memory",
            str(memory),
            "--max_new_tokens",
            "12",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [line.removeprefix("sonett> ") for line in result.stdout.splitlines() if line.startswith("sonett> ")]
    read = int(re.search(r"this session read (\d+) prompt tokens", result.stdout).group(1))
    return replies, read


def test_chat_continues_in_a_later_process_without_rereading(chat_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    memory = tmp_path / "memory.safetensors"
    first, _ = run_chat(chat_folder, memory, ["hello there"], tmp_path)
    second, read = run_chat(chat_folder, memory, ["what did I say?"], tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(chat_folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(chat_folder, trust_remote_code=True)
    conversation = Conversation(model, tokenizer)
    reference_first = "".join(conversation.reply("hello there", max_new_tokens=12))
    second_turn_ids = conversation.turn_ids("what did I say?")
    reference_second = "".join(conversation.reply("what did I say?", max_new_tokens=12))
    assert first == [reference_first]
    assert second == [reference_second]
    assert read == len(second_turn_ids)


def test_turns_fed_one_by_one_equal_the_chat_template_of_the_whole_conversation(chat_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_folder, trust_remote_code=True)
    model = model_for("every-kind", vocab_size=len(tokenizer), eos_token_id=2)
    conversation = Conversation(model, tokenizer)
    first = conversation.turn_ids("first question")
    answer = tokenizer("an answer<|end|>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model(torch.tensor([first + answer]), cache=conversation.cache)
    conversation.ended_turn = True
    fed = first + answer + conversation.turn_ids("second question")
    whole = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "second question"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert fed == tokenizer(whole, add_special_tokens=False)["input_ids"]

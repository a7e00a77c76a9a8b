"""Issue 15, items 6, 7, 11, 12 and the chat's sampling arguments: a memory file is checked before it is trusted
(checksum, config, weights, every tensor), written durably and safely from two processes, and cleared by /reset; a
chat that fills a full_attention model's positions says how to continue; `top_p` / `temperature` out of range get a
clear error; `generate` with a cache that already holds the prompt refuses instead of answering differently."""

import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers_chat import chat_tokenizer
from helpers_model import random_ids, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

import sonett.model.cache_sonett as cache_sonett
from sonett import SonettCache, SonettForCausalLM
from sonett.inference.conversation import Conversation

ROOT = Path(__file__).resolve().parents[2]
EVERY_KIND = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
CONSTANT = ["sliding_attention", "linear_attention", "memory_attention"]
HOURGLASS = {"shorten_factor": 2, "start_layer": 1, "end_layer": 3, "pooling": "linear", "upsampling": "repeat"}
START_AGAIN = "delete it and start a new conversation"


def kind_model(layers=EVERY_KIND, seed=0, **overrides):
    return tiny_model("full", seed=seed, layer_types=layers, num_hidden_layers=len(layers), **overrides)


def saved_state(model, path, length=6, batch=1, bind=False):
    """Feed `length` tokens and save the cache to `path` (bound to the model's weights with `bind`)."""
    with torch.no_grad():
        cache = model(random_ids(batch, length), use_cache=True).cache
    if bind:
        cache.save(path, model=model)
    else:
        cache.save(path)
    return cache


def refused(path, config, match=None, **load_kwargs):
    """Load `path` and return the message of the MemoryFileError it must raise."""
    with pytest.raises(ValueError) as info:
        SonettCache.load(path, config, **load_kwargs)
    message = str(info.value)
    assert type(info.value).__name__ == "MemoryFileError", f"{type(info.value).__name__}: {message}"
    assert message.startswith(f"The memory file {path} "), message
    if match is not None:
        assert re.search(match, message), message
    return message


def rewrite(source, target, edit_tensors=None, edit_metadata=None, resign=True):
    """Copy a memory file with edited tensors / metadata and, like a careful forger (`resign`), a checksum that fits
    them."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if edit_tensors is not None:
        edit_tensors(tensors)
    if edit_metadata is not None:
        edit_metadata(metadata)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    if resign and "checksum" in metadata and hasattr(cache_sonett, "state_checksum"):
        metadata["checksum"] = cache_sonett.state_checksum(tensors, metadata)
    save_file(tensors, str(target), metadata=metadata)
    return target


def data_start(path):
    """Offset of the first tensor byte: 8-byte header length + JSON header."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def subprocess_env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "modeling"), "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------------------
# Item 6: checksum, validation, durability
# ---------------------------------------------------------------------------------------------------------------


def test_every_single_bit_flip_in_a_memory_file_is_refused(tmp_path):
    model = kind_model()
    path = tmp_path / "state.safetensors"
    saved_state(model, path)
    data, start = path.read_bytes(), data_start(path)
    rng = random.Random(15)
    offsets = [rng.randrange(start, len(data)) for _ in range(50)] + [rng.randrange(0, start) for _ in range(30)]
    for n, offset in enumerate(offsets):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << rng.randrange(8)
        target = tmp_path / f"flip-{n}.safetensors"
        target.write_bytes(bytes(flipped))
        message = refused(target, model.config)
        if offset >= start:  # the tensor bytes changed: only the checksum can tell
            assert "fails its sha256 checksum" in message and START_AGAIN in message, message


def edit_scalars(change):
    def edit(metadata):
        scalars = json.loads(metadata["scalars"])
        change(scalars)
        metadata["scalars"] = json.dumps(scalars)

    return edit


def set_metadata(key, value):
    def edit(metadata):
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value

    return edit


def edit_tensor(name, change):
    def edit(tensors):
        tensors[name] = change(tensors[name])

    return edit


def _drop(name):
    def edit(tensors):
        del tensors[name]

    return edit


def _nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = math.nan
    return tensor


# Layers of EVERY_KIND: 0 linear, 1 sliding, 2 memory, 3 full; 6 tokens seen, batch 1, window 4.
MALFORMED = {
    "missing tensor": ({"edit_tensors": _drop("layers.2.memory")}, r"missing: layers\.2\.memory"),
    "extra tensor": (
        {"edit_tensors": lambda t: t.update({"layers.1.extra": torch.zeros(2)})},
        r"unexpected: layers\.1\.extra",
    ),
    "wrong dtype of a key cache": ({"edit_tensors": edit_tensor("layers.3.keys", torch.Tensor.double)}, "dtype"),
    "fp32 state in bf16": (
        {"edit_tensors": edit_tensor("layers.0.recurrent_state", torch.Tensor.bfloat16)},
        r"layers\.0\.recurrent_state has dtype torch\.bfloat16",
    ),
    "integer state": (
        {"edit_tensors": edit_tensor("layers.0.conv_state", torch.Tensor.long)},
        r"layers\.0\.conv_state has dtype torch\.int64; this model's state needs a float dtype",
    ),
    "short window": ({"edit_tensors": edit_tensor("layers.1.keys", lambda t: t[:, :, 1:])}, "shape"),
    "wrong memory shape": ({"edit_tensors": edit_tensor("layers.2.memory", lambda t: t[..., :-1])}, "shape"),
    "another batch size": (
        {"edit_tensors": edit_tensor("layers.3.values", lambda t: torch.cat([t, t]))},
        r"layers\.3\.values has shape \(2,",
    ),
    "NaN state": ({"edit_tensors": edit_tensor("layers.0.recurrent_state", _nan)}, "NaN or infinite"),
    "infinite memory": (
        {"edit_tensors": edit_tensor("layers.2.memory", lambda t: torch.full_like(t, math.inf))},
        "NaN or infinite",
    ),
    "negative seq_length": (
        {"edit_metadata": edit_scalars(lambda s: s[0].update(seq_length=-3))},
        r"seq_length of layer 0 is -3",
    ),
    "inconsistent seq_length": (
        {"edit_metadata": edit_scalars(lambda s: s[0].update(seq_length=99))},
        "disagree on how many tokens",
    ),
    "every counter says 7 tokens": (
        {
            "edit_metadata": edit_scalars(
                lambda s: [s[0].update(seq_length=7), *(s[i].update(cumulative_length=7) for i in (1, 2))]
            )
        },
        r"layers\.3\.keys has shape \(1, 2, 6, 8\); this model's state needs \(1, 2, 7, 8\)",
    ),
    "fractional seq_length": (
        {"edit_metadata": edit_scalars(lambda s: s[0].update(seq_length=6.5))},
        "whole numbers",
    ),
    "seq_length as text": ({"edit_metadata": edit_scalars(lambda s: s[0].update(seq_length="6"))}, "whole numbers"),
    "seq_length true": ({"edit_metadata": edit_scalars(lambda s: s[0].update(seq_length=True))}, "whole numbers"),
    "counter under another name": (
        {"edit_metadata": edit_scalars(lambda s: s[1].update(extra=1))},
        "has counters",
    ),
    "counters of one layer missing": ({"edit_metadata": edit_scalars(lambda s: s.pop())}, "list of 4 objects"),
    "scalars not JSON": ({"edit_metadata": set_metadata("scalars", "[{")}, "not valid JSON"),
    "scalars not a list": ({"edit_metadata": set_metadata("scalars", "{}")}, "not a list"),
    "no scalars": ({"edit_metadata": set_metadata("scalars", None)}, "metadata has keys"),
    "no fingerprint": ({"edit_metadata": set_metadata("fingerprint", None)}, "no 'fingerprint'"),
    "fingerprint not JSON": ({"edit_metadata": set_metadata("fingerprint", "{")}, "not valid JSON"),
    "fingerprint a list": ({"edit_metadata": set_metadata("fingerprint", "[]")}, "not a dict"),
    "window a string": (
        {"edit_metadata": set_metadata("layer_windows", '{"0": 4, "1": "x", "2": 4, "3": null}')},
        "layer 1",
    ),
    "window 0": ({"edit_metadata": set_metadata("layer_windows", '{"0": 4, "1": 0, "2": 4, "3": null}')}, "window 0"),
    "window past sliding_window": (
        {"edit_metadata": set_metadata("layer_windows", '{"0": 4, "1": 4, "2": 99, "3": null}')},
        "window 99",
    ),
    "a layer without a window": (
        {"edit_metadata": set_metadata("layer_windows", '{"0": 4, "1": 4, "2": 4}')},
        "layer_windows names layers",
    ),
    "unknown metadata key": ({"edit_metadata": set_metadata("comment", "hi")}, "metadata has keys"),
    "hourglass counters in a flat model": (
        {"edit_metadata": set_metadata("hourglass_scalars", "[]")},
        "metadata has keys",
    ),
    "weights hash not hex": ({"edit_metadata": set_metadata("weights", "zz")}, "not a sha256 hex digest"),
    "no checksum": ({"edit_metadata": set_metadata("checksum", None)}, "checksum"),
    "metadata edited after the checksum": (
        {"edit_metadata": lambda m: m.update(scalars=m["scalars"].replace("6", "7"), checksum=m["checksum"])},
        None,
    ),
    "no version": ({"edit_metadata": set_metadata("version", None)}, "version None"),
    "another format": ({"edit_metadata": set_metadata("format", "pickle")}, "not a Sonett memory file"),
}


@pytest.fixture(scope="module")
def every_kind_file(tmp_path_factory):
    model = kind_model()
    path = tmp_path_factory.mktemp("memory") / "state.safetensors"
    saved_state(model, path)
    return model, path


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_memory_file_gets_the_same_clear_error(every_kind_file, tmp_path, case):
    model, source = every_kind_file
    edits, match = MALFORMED[case]
    target = rewrite(source, tmp_path / "edited.safetensors", **edits)
    message = refused(target, model.config, match)
    assert START_AGAIN in message, message
    if case == "metadata edited after the checksum":
        # rewrite() re-signs; put the old checksum back, as a hand edit would leave it
        original = safe_open(str(source), framework="pt").metadata()["checksum"]
        rewrite(target, target, edit_metadata=lambda m: m.update(checksum=original), resign=False)
        refused(target, model.config, "fails its sha256 checksum")


def test_malformed_hourglass_state_is_refused(tmp_path):
    layers = ["sliding_attention", "linear_attention", "memory_attention", "full_attention"]
    model = kind_model(layers, hierarchy=HOURGLASS, linear_feature_dim=4)
    path = tmp_path / "state.safetensors"
    saved_state(model, path, length=7, batch=2, bind=True)
    loaded = SonettCache.load(path, model.config, model=model)
    assert len(loaded.hourglass.cohorts) == 1
    outside = rewrite(
        path, tmp_path / "rows.safetensors", edit_tensors=edit_tensor("hourglass.cohorts.0.rows", lambda r: r + 5)
    )
    refused(outside, model.config, r"rows \[5, 6\]: not distinct rows of a batch of 2")
    no_cohort = rewrite(
        path,
        tmp_path / "cohort.safetensors",
        edit_metadata=lambda m: m.update(hourglass_scalars="[]"),
    )
    refused(no_cohort, model.config, r"unexpected: hourglass\.cohorts\.0")

    def lengthen(metadata):
        cohorts = json.loads(metadata["hourglass_scalars"])
        cohorts[0]["length"] += 1
        metadata["hourglass_scalars"] = json.dumps(cohorts)

    longer = rewrite(path, tmp_path / "length.safetensors", edit_metadata=lengthen)
    refused(longer, model.config, r"seq_length of layer 1 is 4, but its stream has seen 5 tokens")


def test_a_bf16_state_loads_into_its_model_and_not_into_an_fp32_one(tmp_path):
    model = kind_model().to(torch.bfloat16)
    path = tmp_path / "state.safetensors"
    cache = saved_state(model, path, bind=True)
    loaded = SonettCache.load(path, model.config, model=model)
    assert all(torch.equal(loaded.state_tensors()[n], t) for n, t in cache.state_tensors().items())
    fp32 = kind_model()
    refused(
        path,
        fp32.config,
        r"layers\.0\.conv_state has dtype torch\.bfloat16; this model's state needs torch\.float32",
        model=fp32,
        allow_other_weights=True,
    )


def test_save_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    model = kind_model()
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "state.safetensors"
    saved_state(model, path, bind=True)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.stat().st_ino in synced, "the memory file was not fsynced before the rename"
    assert tmp_path.stat().st_ino in synced, "the folder was not fsynced after the rename"
    assert synced.index(path.stat().st_ino) < synced.index(tmp_path.stat().st_ino)
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


SAVER = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from helpers_model import random_ids, tiny_model
    from sonett import SonettCache

    path, seed, folder = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    layers = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
    model = tiny_model("full", layer_types=layers, num_hidden_layers=4)
    with torch.no_grad():
        caches = {s: model(random_ids(1, 5 + s, seed=s), use_cache=True).cache for s in (1, 2)}
    (folder / f"ready-{seed}").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)
    for _ in range(40):
        caches[seed].save(path, model=model)
        length = SonettCache.load(path, model.config, model=model).get_seq_length()
        assert length in (6, 7), length
    print("ok")
    """
)


def test_two_processes_saving_the_same_memory_file_never_fail(tmp_path):
    path = tmp_path / "memory.safetensors"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    savers = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), str(seed), str(tmp_path), str(ROOT / "tests")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for seed in (1, 2)
    ]
    try:
        while not all((tmp_path / f"ready-{seed}").exists() for seed in (1, 2)):
            if any(saver.poll() is not None for saver in savers):
                break  # one failed while starting: its error is reported below
            time.sleep(0.05)
        (tmp_path / "go").touch()
        results = [saver.communicate(timeout=300) for saver in savers]
    finally:
        for saver in savers:
            saver.kill()
    for saver, (out, err) in zip(savers, results):
        assert saver.returncode == 0 and out.strip() == "ok", err[-3000:]
    model = tiny_model("full", layer_types=EVERY_KIND, num_hidden_layers=4)
    assert SonettCache.load(path, model.config, model=model).get_seq_length() in (6, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "memory.safetensors", "ready-1", "ready-2", "saver.py"]


# ---------------------------------------------------------------------------------------------------------------
# Item 7: bound to the weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def chat_model(tokenizer, layers=EVERY_KIND, seed=0, **overrides):
    return kind_model(layers, seed=seed, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **overrides)


def test_a_memory_file_from_other_weights_with_the_same_config_is_refused(tokenizer, tmp_path):
    path = tmp_path / "memory.safetensors"
    first = Conversation(chat_model(tokenizer, seed=0), tokenizer)
    "".join(first.reply("hello", max_new_tokens=3))
    first.save(path)
    other = chat_model(tokenizer, seed=1)
    assert other.config.to_dict() == first.model.config.to_dict()
    with pytest.raises(ValueError, match=r"was made with other weights .*--memory_from_other_model") as info:
        Conversation.load(path, other, tokenizer)
    assert type(info.value).__name__ == "MemoryFileError"
    anyway = Conversation.load(path, other, tokenizer, allow_other_weights=True)
    assert anyway.tokens_in_state == first.tokens_in_state
    same = Conversation.load(path, chat_model(tokenizer, seed=0), tokenizer)  # the same weights, built again
    assert same.tokens_in_state == first.tokens_in_state


def test_the_weights_hash_follows_the_weights(tmp_path):
    from sonett.model.cache_sonett import weights_sha256

    model = kind_model()
    digest = weights_sha256(model)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert weights_sha256(kind_model()) == digest  # deterministic
    model.save_pretrained(tmp_path / "folder")
    assert weights_sha256(SonettForCausalLM.from_pretrained(tmp_path / "folder")) == digest  # a saved folder
    assert weights_sha256(kind_model(seed=1)) != digest
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)  # an in-place update invalidates the cached value
    assert weights_sha256(model) != digest
    assert weights_sha256(kind_model().to(torch.bfloat16)) != digest


def test_a_file_without_weights_or_from_version_1_is_refused(tmp_path):
    model = kind_model()
    path = tmp_path / "state.safetensors"
    saved_state(model, path)  # no model=: the file records no weights
    refused(path, model.config, r"records no weights hash.*allow_other_weights=True", model=model)
    assert SonettCache.load(path, model.config, model=model, allow_other_weights=True).get_seq_length() == 6
    assert SonettCache.load(path, model.config).get_seq_length() == 6  # no model given: nothing to compare with
    old = rewrite(
        path,
        tmp_path / "old.safetensors",
        edit_metadata=lambda m: [m.pop("checksum"), m.pop("weights"), m.update(version="1")],
    )
    message = refused(old, model.config, r"has memory-file version '1'.*cannot be checked", model=model)
    assert START_AGAIN in message


# ---------------------------------------------------------------------------------------------------------------
# Item 11 and the sampling arguments: the chat
# ---------------------------------------------------------------------------------------------------------------


def test_a_full_conversation_says_how_to_continue_before_feeding_the_turn(tokenizer):
    model = chat_model(tokenizer, ["sliding_attention", "full_attention"], max_position_embeddings=48)
    conversation = Conversation(model, tokenizer)
    with pytest.raises(ValueError) as info:
        for _ in range(10):
            "".join(conversation.reply("what is in this image?", max_new_tokens=6))
    message = str(info.value)
    assert type(info.value).__name__ == "ConversationFullError"
    for fragment in ("The conversation is full", "at most 48 positions", "/reset", "sonett-tiny-constant"):
        assert fragment in message, message
    held = conversation.tokens_in_state
    with pytest.raises(ValueError, match="The conversation is full"):
        conversation.reply("what is in this image?", max_new_tokens=6)
    assert conversation.tokens_in_state == held  # nothing was fed
    shorter = re.search(r"lower max_new_tokens to (\d+)", message)
    if shorter:
        "".join(conversation.reply("what is in this image?", max_new_tokens=int(shorter.group(1))))
        assert conversation.tokens_in_state <= 48
    Conversation(chat_model(tokenizer, CONSTANT), tokenizer).check_room(10**7, 10**7)  # no full attention: no limit


@pytest.mark.parametrize(
    ("temperature", "top_p", "match"),
    [
        (0.7, 0.0, r"top_p must be a number in \(0, 1\], got 0\.0"),
        (0.7, -0.1, "top_p"),
        (0.7, 1.5, "top_p"),
        (0.7, math.nan, "top_p"),
        (0.0, 0.0, "top_p"),
        (-1.0, 0.9, "temperature must be >= 0"),
        (math.nan, 0.9, "temperature must be a finite number"),
    ],
)
def test_bad_sampling_arguments_get_a_clear_error(tokenizer, temperature, top_p, match):
    conversation = Conversation(chat_model(tokenizer), tokenizer)
    with pytest.raises(ValueError, match=match):
        "".join(conversation.reply("hello", max_new_tokens=3, temperature=temperature, top_p=top_p))
    assert conversation.tokens_in_state == 0


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("chat-model")
    # "what is in this image?" makes a 26-token turn here: two turns (up to 33 tokens each) fit in 80, three do not.
    chat_model(tokenizer, ["sliding_attention", "full_attention"], max_position_embeddings=80).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_chat(folder, lines, tmp_path, *flags):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chat.py"), str(folder), "--max_new_tokens", "6", *flags],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=subprocess_env(),
    )


def test_chat_reset_deletes_the_memory_file_and_a_full_conversation_says_how_to_continue(chat_folder, tmp_path):
    memory = tmp_path / "memory.safetensors"
    lines = ["what is in this image?"] * 4 + ["/reset"]
    result = run_chat(chat_folder, lines, tmp_path, "--memory", str(memory))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.count("sonett> ") == 2  # replies were given (and saved) before the limit
    assert "[memory] The conversation is full" in result.stdout and "/reset" in result.stdout
    assert f"[memory] cleared (deleted {memory})" in result.stdout
    assert not memory.exists()


def test_chat_refuses_top_p_0_and_a_memory_file_of_other_weights(chat_folder, tokenizer, tmp_path):
    result = run_chat(chat_folder, ["hello"], tmp_path, "--top_p", "0", "--temperature", "0.7")
    assert result.returncode == 2 and "top_p must be a number in (0, 1], got 0.0" in result.stderr
    assert "sonett> " not in result.stdout
    memory = tmp_path / "memory.safetensors"
    other = Conversation(chat_model(tokenizer, ["sliding_attention", "full_attention"], seed=5), tokenizer)
    other.save(memory)
    result = run_chat(chat_folder, ["hello"], tmp_path, "--memory", str(memory))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "was made with other weights" in result.stderr and "--memory_from_other_model" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Item 12: generate with a cache that already holds the prompt
# ---------------------------------------------------------------------------------------------------------------


def greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
@pytest.mark.parametrize("cached", [10, 12])
def test_generate_refuses_a_cache_that_already_holds_the_whole_prompt(keyword, cached):
    model = kind_model()
    ids = random_ids(1, 12)
    with torch.no_grad():
        cache = model(ids[:, :cached], use_cache=True).cache
    with pytest.raises(ValueError, match=rf"already holds {cached} tokens and a prompt of 10 tokens"):
        greedy(model, ids[:, :10], **{keyword: cache})
    assert cache.get_seq_length() == cached  # nothing was fed


def test_generate_continues_a_cache_that_holds_part_of_the_prompt_exactly():
    model = kind_model()
    ids = random_ids(1, 10)
    reference = greedy(model, ids)
    for mask in (None, torch.ones_like(ids)):
        with torch.no_grad():
            cache = model(ids[:, :6], use_cache=True).cache
        assert torch.equal(greedy(model, ids, cache=cache, attention_mask=mask), reference)


def test_generate_from_inputs_embeds_with_a_cache_continues_or_refuses_the_same_way():
    model = kind_model()
    ids = random_ids(1, 10)
    embeds = model.get_input_embeddings()(ids).detach()
    reference = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        part, whole = (model(ids[:, :n], use_cache=True).cache for n in (6, 10))
    continued = model.generate(inputs_embeds=embeds, cache=part, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, reference)
    with pytest.raises(ValueError, match="already holds 10 tokens and a prompt of 10 tokens"):
        model.generate(inputs_embeds=embeds, cache=whole, max_new_tokens=6, do_sample=False, pad_token_id=0)

"""Issue 14 item 10: a saved chat folder stops generating where the chat template ends the assistant turn.

The model (tests/helpers_chat.py) answers REPLY, then `<|end|>`, then starts REPLY again: so the reply equals
REPLY only if generation stops at `<|end|>`.
"""

import json

import pytest
import torch
from helpers_chat import MESSAGES, REPLY, bigram_chat_model, chat_tokenizer, save_chat_folder
from transformers import AutoModelForCausalLM, pipeline

from sonett.hub.saving import DEFAULT_MAX_NEW_TOKENS, chat_generation_config, chat_stop_token_ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_folder")
    save_chat_folder(folder)
    return folder


def test_the_model_would_run_past_the_end_of_the_turn():
    """The reference: without a stop at `<|end|>` the reply goes on into a second turn."""
    tokenizer = chat_tokenizer()
    model = bigram_chat_model(tokenizer)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith(f"{REPLY}<|end|>\n{REPLY}")


def test_demo_folder_generation_config_lists_every_end_token(folder):
    tokenizer = chat_tokenizer()
    saved = json.loads((folder / "generation_config.json").read_text())
    end_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    assert saved["eos_token_id"] == end_ids
    assert saved["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS
    assert saved["pad_token_id"] == tokenizer.pad_token_id
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert loaded.generation_config.eos_token_id == end_ids


def test_pipeline_chat_stops_at_the_end_of_the_assistant_turn(folder):
    chat = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    out = chat(MESSAGES, do_sample=False)
    messages = out[0]["generated_text"]
    assert messages[:-1] == MESSAGES
    assert messages[-1] == {"role": "assistant", "content": REPLY}

    inputs = chat.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        ids = chat.model.generate(**inputs, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert chat.tokenizer.decode(ids) == f"{REPLY}<|end|>"  # generate's defaults stop right after <|end|>


def test_generation_defaults_cap_the_reply_at_half_the_context():
    tokenizer = chat_tokenizer()
    model = bigram_chat_model(tokenizer)
    model.config.max_position_embeddings = 300
    model.generation_config.max_new_tokens = None
    assert chat_generation_config(model, tokenizer).max_new_tokens == 150
    model.generation_config.max_new_tokens = 40  # a choice the caller made is kept
    assert chat_generation_config(model, tokenizer).max_new_tokens == 40
    assert model.generation_config.eos_token_id != chat_stop_token_ids(tokenizer)  # the model's own is not touched

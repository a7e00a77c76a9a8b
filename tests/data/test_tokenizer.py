"""The byte-level BPE tokenizer: special tokens, exact unicode round trip, chat template, reload."""

import pytest
from transformers import AutoTokenizer

from sonett.data.corpus import stdlib_corpus
from sonett.data.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

TRICKY_TEXTS = [
    "plain ascii",
    "Grüße aus Köln — naïve café",
    "日本語のテキストと中文",
    "emoji 🌍🚀👩‍👩‍👧 and flags 🇩🇪",
    "combining e\u0301 and zero\u200bwidth",
    "right-to-left: שלום עולם مرحبا",
    "tabs\tnew\nlines\r\n and  double  spaces ",
    "control \x00\x07\x1b chars",
    "<|bos|> looks special but is text?",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = stdlib_corpus(max_documents=40)["text"]
    return train_bpe_tokenizer(texts, vocab_size=800)


def test_special_tokens_take_the_first_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert tokenizer.image_token == "<|image|>"
    assert tokenizer.image_token_id == 3
    assert len(tokenizer) == 800


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_unicode_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_learned_merges_compress_python_source(tokenizer):
    text = "def __init__(self, value):\n        return self.value\n"
    assert len(tokenizer(text)["input_ids"]) < len(text.encode("utf-8")) / 2


def test_chat_template_renders_turns_and_marks_assistant_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|bos|><|start|>system\nBe brief.<|end|>\n<|start|>user\nHi<|end|>\n<|start|>assistant\nHello!<|end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start|>user\nHi<|end|>\n<|start|>assistant\n")

    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assistant_ids = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(assistant_ids) == "Hello!<|end|>"


def test_chat_template_places_image_tokens(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|start|>user\n<|image|>What is this?<|end|>\n"


def test_autotokenizer_reloads_the_saved_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    for text in TRICKY_TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.image_token_id == tokenizer.image_token_id
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.padding_side == "left"


def test_bad_tokenizer_settings_raise():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="corpus is empty"):
        train_bpe_tokenizer([], vocab_size=400)

"""Train Sonett's byte-level BPE tokenizer with the `tokenizers` library.

The result is a `PreTrainedTokenizerFast` (saved as `TokenizersBackend`) that `AutoTokenizer` loads from a
model folder with no custom code. Special tokens take the first ids, in the order of `SPECIAL_TOKENS`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
IMAGE_TOKEN = "<|image|>"
TURN_START_TOKEN = "<|start|>"
TURN_END_TOKEN = "<|end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, TURN_START_TOKEN, TURN_END_TOKEN]

# Turns are `<|start|>role\n...<|end|>\n`. Content is a string or a list of parts ({"type": "text"|"image"});
# each image part becomes one image token. Assistant replies are marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) + '<|end|>' }}{% endgeneration %}"
    "{%- else -%}{{ render(message['content']) + '<|end|>' }}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start|>assistant\\n' }}{%- endif -%}"
)


def _batches(texts: Iterable[str], batch_size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`.

    Args:
        texts: the training corpus, one document per item.
        vocab_size: size of the vocabulary, special tokens and the 256 byte symbols included.
        model_max_length: the longest input the tokenizer advertises.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        A fast tokenizer with bos/eos/pad tokens, an image token and a chat template.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(SPECIAL_TOKENS) + 256} ids (256 bytes plus {len(SPECIAL_TOKENS)} special tokens)."
        )
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen_characters = 0

    def counted(items: Iterable[str]) -> Iterator[str]:
        nonlocal seen_characters
        for text in items:
            seen_characters += len(text)
            yield text

    tokenizer.train_from_iterator(_batches(counted(texts)), trainer=trainer)
    if seen_characters == 0:
        raise ValueError("The tokenizer corpus is empty: pass at least one non-empty document.")
    logger.info("trained a byte-level BPE with %d tokens", tokenizer.get_vocab_size())
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        additional_special_tokens=[TURN_START_TOKEN, TURN_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
    )


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "train_bpe_tokenizer"]

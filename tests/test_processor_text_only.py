"""AutoProcessor on a text-only Sonett folder gives the tokenizer, as it does for any text-only transformers model,
also when `import sonett` has registered SonettProcessor for the `sonett` model type (issue 14: clients such as
TRL's SFTTrainer load `AutoProcessor` first)."""

from helpers_chat import MESSAGES, save_chat_folder
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

import sonett  # noqa: F401  (registers SonettProcessor with AutoProcessor)
from sonett import SonettProcessor


def test_autoprocessor_on_a_text_only_folder_returns_its_tokenizer(tmp_path):
    save_chat_folder(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(processor, PreTrainedTokenizerBase)
    assert processor("what is in this image?")["input_ids"] == tokenizer("what is in this image?")["input_ids"]
    rendered = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    # SonettProcessor.from_pretrained itself answers the same way for a folder without an image processor.
    assert isinstance(SonettProcessor.from_pretrained(tmp_path), PreTrainedTokenizerBase)

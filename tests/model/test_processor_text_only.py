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


def test_a_multimodal_repo_whose_image_processor_is_not_at_hand_is_not_downgraded_to_its_tokenizer(tmp_path):
    """Offline, with the config and tokenizer cached (as `AutoTokenizer` leaves them) but not the processor files,
    AutoProcessor must fail naming the missing file, not hand back a tokenizer that silently drops the images."""
    import shutil

    import pytest
    from helpers_chat import bigram_chat_model, chat_tokenizer

    from sonett import SonettForConditionalGeneration, SonettImageProcessor

    tokenizer = chat_tokenizer()
    vision = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
    model = SonettForConditionalGeneration.from_text_model(
        bigram_chat_model(tokenizer),
        cross_attention_layers=[1],
        vision_config=vision,
        image_token_id=tokenizer.image_token_id,
    )
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    SonettProcessor(SonettImageProcessor(), tokenizer).save_pretrained(saved)
    assert isinstance(AutoProcessor.from_pretrained(saved), SonettProcessor)  # the whole folder: the processor

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tester--sonett-vlm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = shutil.copytree(saved, repo / "snapshots" / commit)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (snapshot / name).unlink(missing_ok=True)
    with pytest.raises(OSError, match=r"preprocessor_config\.json|processor_config\.json"):
        AutoProcessor.from_pretrained("tester/sonett-vlm", cache_dir=tmp_path / "cache", local_files_only=True)

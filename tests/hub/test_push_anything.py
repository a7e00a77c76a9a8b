"""Issue 16, item 4: `sonett push` takes any folder a user saves. A `save_pretrained` folder, the merged folder of
`sonett finetune --merge`, a vision model with its processor and a PEFT adapter folder all pass `--dry-run`, which
uploads nothing and writes the card it would upload to a temporary file. A folder without a card gets one generated
from its config and results: its metadata is built with huggingface_hub's `ModelCardData` (license, library, pipeline
tag, tags, datasets, base model, `eval_results`) and `ModelCard.load` reads it back. An adapter's card and
adapter_config.json name the base model's Hub id, never a local path (`--base_model` when the adapter names a local
one). One adapter is pushed to the test Hub (tests/hub_server.py) with the real client."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers_hub import CORPUS, TOKEN
from helpers_model import tiny_model
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sonett import SonettForConditionalGeneration, SonettImageProcessor, SonettProcessor
from sonett.cli.push import main as push_main
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.hub.folder_card import PLACEHOLDER_MARKER
from sonett.hub.saving import save_model_and_tokenizer, write_model_folder
from sonett.hub.upload import FolderNotReadyError, push_folder_to_hub, validate_model_folder
from sonett.training.finetuning import merge_adapter

REPO = "someone/pushed"
BASE_REPO = "someone/sonett-base"
RESULTS = {
    "training_data": "a unit-test corpus",
    "datasets": ["someone/corpus"],
    "steps": 5,
    "validation_loss": 2.5,
    "validation_perplexity": 12.1825,
    "validation_tokens": 640,
    "final_train_loss": 2.25,
}
VISION = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lora(model):
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj"]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The four kinds of folder a user saves, none with a card of its own (the adapter has PEFT's placeholder)."""
    root = tmp_path_factory.mktemp("saved")
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=2)
    counts = {}

    text = tiny_model("mixed", vocab_size=len(tokenizer))
    text.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    (root / "text" / "results.json").write_text(json.dumps(RESULTS))
    counts["text"] = parameters(text)

    save_model_and_tokenizer(tiny_model("mixed", seed=1, vocab_size=len(tokenizer)), tokenizer, root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")  # the adapter then names this local folder
    counts["merged"] = parameters(base)  # before LoRA layers are injected into it
    adapter = lora(base)
    adapter.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    counts["adapter"] = sum(p.numel() for name, p in adapter.named_parameters() if "lora_" in name)
    merge_adapter(adapter, tokenizer, root / "merged")  # as `sonett finetune --merge` writes it

    processor = SonettProcessor(image_processor=SonettImageProcessor(), tokenizer=tokenizer)
    vision = SonettForConditionalGeneration.from_text_model(
        tiny_model("mixed", vocab_size=len(tokenizer)),
        cross_attention_layers=[1],
        vision_config=VISION,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    vision.save_pretrained(root / "vision")
    processor.save_pretrained(root / "vision")
    counts["vision"] = parameters(vision)
    return {"root": root, "counts": counts}


def dry_run(folder: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = push_main([str(folder), REPO, "--dry-run", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def card_of(output: str) -> tuple[str, ModelCard]:
    path = Path(output.split("model card as it would upload: ", 1)[1].split("\n", 1)[0])
    return path.read_text(), ModelCard.load(path)


def assert_private(card: str, output: str, root: Path) -> None:
    """No local path in the card, no folder path or token in what the command printed."""
    assert str(root) not in card and "/tmp/" not in card and TOKEN not in card, card
    assert str(root) not in output and TOKEN not in output, output


@pytest.mark.parametrize(
    ("kind", "pipeline", "extra_tags"),
    [
        ("text", "text-generation", []),
        ("merged", "text-generation", []),
        ("vision", "image-text-to-text", ["multimodal"]),
    ],
)
def test_dry_run_takes_a_saved_folder_and_generates_its_card(folders, capsys, kind, pipeline, extra_tags):
    folder = folders["root"] / kind
    code, out, err = dry_run(folder, capsys)
    assert code == 0, err
    assert "README.md" in out and "(generated from the config)" in out
    assert "dry run: nothing was sent" in out
    assert not (folder / "README.md").exists(), "the local folder must be left as it is"
    text, card = card_of(out)
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "transformers", pipeline)
    assert data.tags == ["sonett", "hybrid-attention", *extra_tags, "custom_code"]
    assert data.base_model is None
    assert "# pushed\n" in text and f"| parameters | {folders['counts'][kind]:,} |" in text
    assert "| layers | 3 (2 sliding_attention + 1 full_attention) |" in text
    assert_private(text, out + err, folders["root"])
    if kind == "vision":
        assert "| gated cross-attention at decoder layers | 1 |" in text
        assert f'AutoProcessor.from_pretrained("{REPO}", trust_remote_code=True)' in text
        assert "processor_config.json" in out and "processing_sonett.py" in out
    else:
        assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in text


def test_a_generated_card_carries_datasets_and_measured_results(folders, capsys):
    code, out, err = dry_run(folders["root"] / "text", capsys)
    assert code == 0, err
    text, card = card_of(out)
    assert card.data.datasets == ["someone/corpus"]
    results = {(r.metric_type, r.metric_value, r.dataset_type, r.dataset_split) for r in card.data.eval_results}
    # the training loss and the token count are not evaluations
    assert results == {
        ("loss", 2.5, "someone/corpus", "validation"),
        ("perplexity", 12.1825, "someone/corpus", "validation"),
    }
    assert {r.task_type for r in card.data.eval_results} == {"text-generation"}
    assert card.data.model_name == "pushed"
    assert "| validation loss | 2.5000 |" in text and "- Data: a unit-test corpus" in text


def test_a_merged_folder_names_its_base_model_when_given(folders, capsys):
    code, out, err = dry_run(folders["root"] / "merged", capsys, "--base_model", BASE_REPO)
    assert code == 0, err
    assert card_of(out)[1].data.base_model == BASE_REPO


def test_an_adapter_named_by_a_local_base_path_is_refused_with_the_fix(folders, capsys):
    code, out, err = dry_run(folders["root"] / "adapter", capsys)
    assert code == 1 and out == ""
    assert "adapter_config.json names its base model by a local path" in err
    assert "pass --base_model OWNER/NAME" in err and "Traceback" not in err
    code, out, err = dry_run(folders["root"] / "adapter", capsys, "--base_model", str(folders["root"] / "base"))
    assert code == 1 and "is not a Hub repository id" in err


def test_an_adapter_card_has_its_base_model_and_leaks_no_local_path(folders, capsys):
    folder = folders["root"] / "adapter"
    assert PLACEHOLDER_MARKER in (folder / "README.md").read_text()  # PEFT's own card, naming the local base
    code, out, err = dry_run(folder, capsys, "--base_model", BASE_REPO)
    assert code == 0, err
    assert "(generated from the config, replacing the placeholder)" in out
    assert f"(base_model_name_or_path: {BASE_REPO})" in out
    text, card = card_of(out)
    data = card.data
    assert (data.base_model, data.library_name, data.pipeline_tag) == (BASE_REPO, "peft", "text-generation")
    assert data.tags == ["sonett", "hybrid-attention", "lora", "custom_code"] and data.license == "apache-2.0"
    assert f"| adapter parameters | {folders['counts']['adapter']:,} |" in text
    assert "| method / rank / alpha | LORA / 2 / 4 |" in text and "| target modules | q_proj |" in text
    assert f'base_model = "{BASE_REPO}"' in text and f'PeftModel.from_pretrained(base, "{REPO}")' in text
    files = {f.path_in_repo: f for f in validate_model_folder(folder, repo_id=REPO, base_model=BASE_REPO)}
    assert json.loads(files["adapter_config.json"].content)["base_model_name_or_path"] == BASE_REPO
    for upload in files.values():
        data = upload.content if upload.content is not None else upload.local_path.read_bytes()
        assert str(folders["root"]).encode() not in data, upload.path_in_repo
    assert_private(text, out + err, folders["root"])
    assert str(folders["root"] / "base") in (folder / "adapter_config.json").read_text()  # local copy unchanged


def test_a_finetune_output_folder_pushes_its_adapter_and_results(folders, tmp_path, capsys):
    """What `sonett finetune --merge` writes: the adapter, the Trainer's pickled arguments, merged/, results."""
    folder = Path(shutil.copytree(folders["root"] / "adapter", tmp_path / "finetuned"))
    shutil.copytree(folders["root"] / "merged", folder / "merged")
    (folder / "training_args.bin").write_bytes(b"a pickle")
    results = {"base_model": str(folders["root"] / "base"), "train_loss": 2.0, "validation_loss_before": 2.4}
    (folder / "finetune_results.json").write_text(json.dumps({**results, "validation_loss_after": 1.75}))
    code, out, err = dry_run(folder, capsys, "--base_model", BASE_REPO)
    assert code == 0, err
    assert "finetune_results.json" in out and "merged/" not in out and "training_args.bin" not in out
    text, card = card_of(out)
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("loss", 1.75)]
    assert_private(text, out + err, folders["root"])


def test_a_written_card_naming_a_local_base_needs_the_hub_id(folders, tmp_path):
    folder = Path(shutil.copytree(folders["root"] / "merged", tmp_path / "merged"))
    local = str(folders["root"] / "base")
    (folder / "README.md").write_text(f"---\nbase_model: {local}\ntags:\n- base_model:finetune:{local}\n---\n# Mine\n")
    with pytest.raises(FolderNotReadyError, match="metadata names its base model by a local path") as error:
        validate_model_folder(folder)
    assert "pass --base_model OWNER/NAME" in str(error.value)
    files = {f.path_in_repo: f for f in validate_model_folder(folder, base_model=BASE_REPO)}
    card = ModelCard(files["README.md"].content.decode())
    assert card.data.base_model == BASE_REPO and card.data.tags == [] and card.text.strip() == "# Mine"


def test_cards_written_by_training_carry_the_same_metadata(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=2)
    results = {**RESULTS, "datasets": None, "arguments": {"dataset_name": "someone/corpus"}}
    write_model_folder(tiny_model("full", vocab_size=len(tokenizer)), tokenizer, tmp_path / "run", results)
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag, card.data.license) == (
        "transformers",
        "text-generation",
        "apache-2.0",
    )
    assert card.data.datasets == ["someone/corpus"]
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {("loss", 2.5), ("perplexity", 12.1825)}


def test_an_adapter_pushes_to_the_hub_with_a_generated_card(folders, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)  # this process is offline
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        push_folder_to_hub(folders["root"] / "adapter", "tester/adapter", api=api, base_model=BASE_REPO)
        sent = hub.state.repos["tester/adapter"].files("main")
        assert hub.state.unrouted == []
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(sent)
    assert not any(name.endswith(".py") or name == "config.json" for name in sent)
    card = ModelCard(sent["README.md"].decode())
    assert card.data.base_model == BASE_REPO and card.data.library_name == "peft"
    assert 'PeftModel.from_pretrained(base, "tester/adapter")' in card.text
    assert json.loads(sent["adapter_config.json"])["base_model_name_or_path"] == BASE_REPO
    for name, data in sent.items():
        assert str(folders["root"]).encode() not in data, name


def test_quality_rows_on_a_vision_folder_count_the_vision_encoder_too(tmp_path):
    """A folder without a recorded parameter count gets the count of the whole model its config describes."""
    from helpers_vision import multimodal

    from sonett.hub.saving import add_quality_results

    _, model = multimodal()
    model.save_pretrained(tmp_path)
    row = {"evaluation": "mqar", "model": "0.90", "llama": "0.10", "target": "", "command": "sonett compare mqar"}
    add_quality_results(tmp_path, [row])
    total = sum(parameter.numel() for parameter in model.parameters())
    card = (tmp_path / "README.md").read_text()
    assert f"| parameters | {total:,} |" in card

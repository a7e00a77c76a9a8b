"""Issue 14 item 11: `AutoTokenizer.from_pretrained(folder)` works without `trust_remote_code` (the tokenizer is
data), and which Auto classes run which shipped files.

AutoTokenizer (transformers 5.24) always reads config.json first: through AutoConfig, or, when remote code is not
trusted, as a generic `PreTrainedConfig` whose validator accepts only transformers' own layer kinds. So config.json
spells memory_attention as `hybrid_sliding` (see `SAVED_LAYER_KIND_NAMES`).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_chat import bigram_chat_model, chat_tokenizer, save_chat_folder
from helpers_remote import NO_PACKAGE_PREAMBLE, fresh_process_env
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForCausalLM, PreTrainedConfig

from sonett import (
    SonettConfig,
    SonettForCausalLM,
    SonettForConditionalGeneration,
    SonettImageProcessor,
    SonettProcessor,
)
from sonett.hub.saving import save_model_and_tokenizer
from sonett.model.configuration_sonett import SAVED_LAYER_KIND_NAMES

TEXTS = ["what is in this image?", "Grüße 🌍 <|image|> and <|end|>", "the red square"]
VISION = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A text folder and a multimodal folder (with a processor), both with memory and linear attention layers."""
    text = tmp_path_factory.mktemp("text_folder")
    model, tokenizer = save_chat_folder(text)
    vlm = tmp_path_factory.mktemp("vlm_folder")
    multimodal = SonettForConditionalGeneration.from_text_model(
        model, cross_attention_layers=[1], vision_config=VISION, image_token_id=tokenizer.image_token_id
    )
    save_model_and_tokenizer(multimodal, SonettProcessor(SonettImageProcessor(), tokenizer), vlm)
    return {"text": text, "vlm": vlm, "tokenizer": tokenizer, "model": model}


def test_config_json_parses_as_a_generic_transformers_config(folders):
    for folder in (folders["text"], folders["vlm"]):
        on_disk = json.loads((folder / "config.json").read_text())
        assert on_disk["layer_types"] == ["linear_attention", "sliding_attention", "hybrid_sliding", "full_attention"]
        generic = PreTrainedConfig.from_pretrained(folder)  # what AutoTokenizer builds without remote code
        assert generic.model_type == "sonett"
        config = SonettConfig.from_pretrained(folder)
        assert config.layer_types == folders["model"].config.layer_types
        assert "memory_attention" in config.layer_types


def test_folders_that_spell_memory_attention_still_load(folders, tmp_path):
    """A folder saved before this change (config.json says memory_attention) loads the same model."""
    for path in folders["text"].iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    on_disk = json.loads((tmp_path / "config.json").read_text())
    inverse = {saved: kind for kind, saved in SAVED_LAYER_KIND_NAMES.items()}
    on_disk["layer_types"] = [inverse.get(kind, kind) for kind in on_disk["layer_types"]]
    (tmp_path / "config.json").write_text(json.dumps(on_disk))
    old = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    new = AutoModelForCausalLM.from_pretrained(folders["text"]).eval()
    assert old.config.layer_types == new.config.layer_types == folders["model"].config.layer_types
    ids = torch.tensor([folders["tokenizer"](TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)


# Runs with the package blocked and stdin closed (transformers' "run custom code? [y/N]" prompt reads EOF = no).
# Prints, per call, the shipped .py files it imported: transformers_modules.<folder>.<hash>.<file>.
FRESH_SCRIPT = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    text, vlm, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    seen = set()

    def shipped_files():
        names = {m.rsplit(".", 1)[1] + ".py" for m in sys.modules if m.startswith("transformers_modules.")}
        new = sorted(n for n in names if n.endswith("_sonett.py") and n not in seen)
        seen.update(new)
        return new

    def attempt(name, call):
        try:
            obj = call()
            result = type(obj).__name__
        except ValueError as error:
            result = "refused" if "trust_remote_code=True" in str(error) else f"ValueError: {error}"
        report[name] = {"result": result, "ran": shipped_files()}
        return obj if result != "refused" else None

    report = {}
    tokenizers = {
        "plain": attempt("AutoTokenizer", lambda: AutoTokenizer.from_pretrained(text)),
        "false": attempt("AutoTokenizer(False)", lambda: AutoTokenizer.from_pretrained(text, trust_remote_code=False)),
        "vlm": attempt("AutoTokenizer(vlm)", lambda: AutoTokenizer.from_pretrained(vlm)),
    }
    attempt("AutoConfig", lambda: AutoConfig.from_pretrained(text))
    attempt("AutoProcessor(text)", lambda: AutoProcessor.from_pretrained(text))
    attempt("AutoProcessor(vlm)", lambda: AutoProcessor.from_pretrained(vlm))
    attempt("AutoModelForCausalLM", lambda: AutoModelForCausalLM.from_pretrained(text))
    tokenizers["true"] = attempt(
        "AutoTokenizer(True)", lambda: AutoTokenizer.from_pretrained(text, trust_remote_code=True)
    )
    attempt("AutoProcessor(vlm, True)", lambda: AutoProcessor.from_pretrained(vlm, trust_remote_code=True))
    attempt("AutoModelForCausalLM(True)", lambda: AutoModelForCausalLM.from_pretrained(text, trust_remote_code=True))
    report["ids"] = {name: [tok(t)["input_ids"] for t in texts] for name, tok in tokenizers.items()}
    report["chat_template"] = {name: tok.chat_template for name, tok in tokenizers.items()}
    print("REPORT " + json.dumps(report))
    """
)


def test_fresh_process_autotokenizer_needs_no_remote_code(folders, tmp_path):
    script = tmp_path / "auto_classes.py"
    script.write_text(FRESH_SCRIPT)
    args = [sys.executable, str(script), str(folders["text"]), str(folders["vlm"]), json.dumps(TEXTS)]
    result = subprocess.run(
        args,
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])

    tokenizer = folders["tokenizer"]
    expected = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert report["ids"] == {"plain": expected, "false": expected, "vlm": expected, "true": expected}
    assert set(report["chat_template"].values()) == {tokenizer.chat_template}
    ran = {name: (entry["result"], entry["ran"]) for name, entry in report.items() if "result" in entry}
    # What the README says: the tokenizer runs no shipped code; everything else needs trust_remote_code.
    assert ran == {
        "AutoTokenizer": ("TokenizersBackend", []),
        "AutoTokenizer(False)": ("TokenizersBackend", []),
        "AutoTokenizer(vlm)": ("TokenizersBackend", []),
        "AutoConfig": ("refused", []),
        "AutoProcessor(text)": ("TokenizersBackend", []),
        "AutoProcessor(vlm)": ("refused", []),
        "AutoModelForCausalLM": ("refused", []),
        "AutoTokenizer(True)": ("TokenizersBackend", ["configuration_sonett.py"]),
        "AutoProcessor(vlm, True)": ("SonettProcessor", ["image_processing_sonett.py", "processing_sonett.py"]),
        "AutoModelForCausalLM(True)": (
            "SonettForCausalLM",
            [
                "attention_sonett.py",
                "cache_sonett.py",
                "cross_attention_sonett.py",
                "hierarchy_sonett.py",
                "layers_sonett.py",
                "linear_attention_sonett.py",
                "memory_attention_sonett.py",
                "modeling_sonett.py",
                "peft_sonett.py",
                "vision_sonett.py",
            ],
        ),
    }


def test_generic_config_is_what_failed_before():
    """The defect itself: transformers' generic config refuses Sonett's own name for the memory kind."""
    model = bigram_chat_model(chat_tokenizer())
    values = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
    with pytest.raises(StrictDataclassClassValidationError, match="layer_types"):
        PreTrainedConfig(**values, layer_types=model.config.layer_types)
    PreTrainedConfig(**model.config.to_dict())  # the saved spelling passes


def test_the_saved_spelling_set_after_construction_still_builds_the_model(folders):
    """`from_pretrained(folder, layer_types=<the list from config.json>)` sets the saved spelling after the config
    is built; the model maps it back instead of failing on an unknown mixer."""
    saved = json.loads((folders["text"] / "config.json").read_text())["layer_types"]
    assert "hybrid_sliding" in saved
    model = AutoModelForCausalLM.from_pretrained(folders["text"], layer_types=saved)
    assert model.config.layer_types == folders["model"].config.layer_types
    config = SonettConfig.from_pretrained(folders["text"])
    config.update({"layer_types": saved})
    assert type(SonettForCausalLM(config).model.layers[2].mixer).__name__ == "SonettMemoryAttention"

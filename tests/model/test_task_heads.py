"""Task heads (issue 14 item 9): sequence classification, token classification and question answering.

transformers' generic heads on the Sonett body: the pooled / per-token logits of a padded row equal the row alone
(left and right padding, every layer kind, hourglass), the losses are the standard ones, a causal-LM folder loads
into each head (the head new, the body identical) here and through remote code, and the classification model
fine-tunes with the Trainer and with LoRA.
"""

import logging
import os
import random
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers_model import PAD, max_diff, random_ids, tiny_config
from helpers_remote import EVERY_KIND, HOURGLASS_KINDS, NO_PACKAGE_PREAMBLE, fresh_process_env
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from sonett import (
    SonettForCausalLM,
    SonettForQuestionAnswering,
    SonettForSequenceClassification,
    SonettForTokenClassification,
)
from sonett.data.corpus import stdlib_corpus
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.training.finetuning import LORA_TARGET_MODULES

REPO = Path(__file__).resolve().parents[2]
HEADS = {
    "sequence": SonettForSequenceClassification,
    "token": SonettForTokenClassification,
    "qa": SonettForQuestionAnswering,
}
AUTO_CLASSES = {
    "sequence": AutoModelForSequenceClassification,
    "token": AutoModelForTokenClassification,
    "qa": AutoModelForQuestionAnswering,
}
HEAD_WEIGHTS = {
    "sequence": {"score.weight"},
    "token": {"score.weight", "score.bias"},
    "qa": {"qa_outputs.weight", "qa_outputs.bias"},
}
STACKS = {
    "mixed": {},
    "every-kind": {"layer_types": EVERY_KIND, "num_hidden_layers": len(EVERY_KIND)},
    "hourglass": {
        "layer_types": HOURGLASS_KINDS,
        "num_hidden_layers": len(HOURGLASS_KINDS),
        "hierarchy": {"shorten_factor": 3, "start_layer": 1, "end_layer": 4},
    },
}


def head_model(head, stack="mixed", seed=0, num_labels=3, **overrides):
    """A seeded, eval-mode head model on a tiny stack; an hourglass gets a nonzero upsampling so it counts."""
    torch.manual_seed(seed)
    model = HEADS[head](tiny_config(**{**STACKS[stack], **overrides}, num_labels=num_labels)).eval()
    if model.model.hourglass is not None:
        with torch.no_grad():
            model.model.hourglass.upsample_proj.weight.normal_(0.0, 0.2)
    return model


def pad(rows, side):
    """Pad 1-D id tensors on `side` into (input_ids, attention_mask, real-token slices)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    slices = []
    for i, row in enumerate(rows):
        real = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, real], attention_mask[i, real] = row, 1
        slices.append(real)
    return input_ids, attention_mask, slices


def head_logits(head, output):
    """The head's logits: `(batch, labels)`, `(batch, seq, labels)` or `(batch, seq, 2)` (start, end)."""
    if head == "qa":
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    return output.logits


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("stack", sorted(STACKS))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_padded_rows_give_the_logits_of_rows_alone(head, stack, side):
    model = head_model(head, stack)
    rows = [random_ids(1, n, seed=n)[0] for n in (13, 5, 9)]
    input_ids, attention_mask, slices = pad(rows, side)
    with torch.no_grad():
        batch = head_logits(head, model(input_ids, attention_mask=attention_mask))
        for i, row in enumerate(rows):
            alone = head_logits(head, model(row[None]))[0]
            got = batch[i] if head == "sequence" else batch[i, slices[i]]
            assert max_diff(got, alone) <= 1e-5, (i, max_diff(got, alone))


def test_sequence_classification_losses_and_tuple_output():
    model = head_model("sequence", num_labels=3)
    input_ids, attention_mask, _ = pad([random_ids(1, n, seed=n)[0] for n in (7, 4, 6)], "left")
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, labels=labels)
        assert out.logits.shape == (3, 3)
        assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
        loss, logits, *_ = model(input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
        assert torch.equal(logits, out.logits) and torch.equal(loss, out.loss)

    regression = head_model("sequence", num_labels=1)
    targets = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        out = regression(input_ids, attention_mask=attention_mask, labels=targets)
    assert regression.config.problem_type == "regression"
    assert torch.allclose(out.loss, F.mse_loss(out.logits.squeeze(-1), targets))


def test_token_classification_loss_and_shapes():
    model = head_model("token", num_labels=4)
    input_ids = random_ids(2, 6)
    labels = torch.tensor([[0, 3, 1, -100, 2, 2], [1, 1, -100, -100, 0, 3]])
    with torch.no_grad():
        out = model(input_ids, labels=labels)
    assert out.logits.shape == (2, 6, 4)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, 4), labels.reshape(-1), ignore_index=-100))


def test_question_answering_loss_and_shapes():
    model = head_model("qa")
    input_ids = random_ids(2, 7)
    start, end = torch.tensor([1, 4]), torch.tensor([3, 6])
    with torch.no_grad():
        out = model(input_ids, start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (2, 7)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    assert torch.allclose(out.loss, expected)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny causal LM of every layer kind, saved by SonettForCausalLM."""
    folder = tmp_path_factory.mktemp("sonett_lm")
    torch.manual_seed(5)
    model = SonettForCausalLM(tiny_config(**STACKS["every-kind"])).eval()
    model.save_pretrained(folder)
    return folder


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("head", sorted(HEADS))
def test_causal_lm_folder_loads_into_each_head_with_a_new_head(lm_folder, head):
    records = Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        model, info = AUTO_CLASSES[head].from_pretrained(lm_folder, num_labels=3, output_loading_info=True)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert type(model) is HEADS[head]
    assert set(info["missing_keys"]) == HEAD_WEIGHTS[head]
    report = "\n".join(records.messages)
    assert "newly initialized" in report and next(iter(HEAD_WEIGHTS[head])) in report

    saved = load_file(lm_folder / "model.safetensors")
    body = model.state_dict()
    for name, tensor in saved.items():
        if name.startswith("model."):
            assert torch.equal(body[name], tensor), name
    weight = (model.score if head != "qa" else model.qa_outputs).weight
    assert weight.std() > 0.01  # initialised from initializer_range, not left empty


def test_classification_folder_round_trips(tmp_path):
    model = head_model("sequence", "every-kind", num_labels=3)
    model.config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is SonettForSequenceClassification
    assert loaded.config.id2label == model.config.id2label
    input_ids, attention_mask, _ = pad([random_ids(1, n, seed=n)[0] for n in (8, 3)], "left")
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids, attention_mask=attention_mask).logits,
            model(input_ids, attention_mask=attention_mask).logits,
        )


def test_head_or_body_weights_truly_absent_are_refused(lm_folder, tmp_path):
    classifier = head_model("sequence", "every-kind")
    classifier.save_pretrained(tmp_path / "classifier")
    tensors = load_file(tmp_path / "classifier" / "model.safetensors")
    del tensors["score.weight"]  # the folder says it is a classifier, but its head is gone
    save_file(tensors, tmp_path / "classifier" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights the model needs: score.weight"):
        SonettForSequenceClassification.from_pretrained(tmp_path / "classifier")

    lm = SonettForCausalLM.from_pretrained(lm_folder)
    lm.save_pretrained(tmp_path / "lm")
    tensors = load_file(tmp_path / "lm" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]  # a body weight: missing from any checkpoint is an error
    save_file(tensors, tmp_path / "lm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights the model needs: model.layers.1.mlp.up_proj.weight"):
        SonettForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2)


# A fresh interpreter without the package: each head loads from the causal-LM folder through remote code.
REMOTE_HEADS = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    folder, out_path, resave = sys.argv[1:4]
    ids = torch.tensor(IDS)
    saved = load_file(f"{folder}/model.safetensors")
    outputs = {}
    for auto in (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoModelForQuestionAnswering):
        model = auto.from_pretrained(folder, trust_remote_code=True, num_labels=3).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model).__name__ == auto.__name__.replace("AutoModel", "Sonett"), type(model).__name__
        assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])
        with torch.no_grad():
            out = model(ids)
        outputs[auto.__name__] = (out.logits if hasattr(out, "logits") else out.start_logits).contiguous()
        if auto is AutoModelForSequenceClassification:
            model.save_pretrained(resave)
    save_file(outputs, out_path)
    """
)


def test_heads_load_from_a_causal_lm_folder_through_remote_code(lm_folder, tmp_path):
    ids = random_ids(2, 9, seed=7)
    script = tmp_path / "remote_heads.py"
    script.write_text(REMOTE_HEADS.replace("IDS", repr(ids.tolist())))
    out_path, resave = tmp_path / "out.safetensors", tmp_path / "classifier"
    done = subprocess.run(
        [sys.executable, str(script), str(lm_folder), str(out_path), str(resave)],
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    remote = load_file(out_path)
    assert remote["AutoModelForSequenceClassification"].shape == (2, 3)
    assert remote["AutoModelForTokenClassification"].shape == (2, 9, 3)
    assert remote["AutoModelForQuestionAnswering"].shape == (2, 9)
    # The classifier saved by the remote-code class loads here with the same logits.
    loaded = SonettForSequenceClassification.from_pretrained(resave).eval()
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, remote["AutoModelForSequenceClassification"]) <= 1e-6


def sentiment_data(tokenizer, count=64, seed=0):
    """Tokenised reviews: label 1 when the one sentiment word is positive."""
    rng = random.Random(seed)
    filler = ["the", "film", "was", "and", "its", "plot", "actors", "music"]
    words = {0: ["bad", "dull"], 1: ["good", "great"]}
    texts, labels = [], []
    for _ in range(count):
        label = rng.randrange(2)
        picks = rng.choices(filler, k=4)
        picks.insert(rng.randrange(5), rng.choice(words[label]))
        texts.append(" ".join(picks))
        labels.append(label)
    data = Dataset.from_dict({"text": texts, "label": labels})
    return data.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])


@pytest.fixture(scope="module")
def demo_like_folder(tmp_path_factory):
    """A folder like the demo's runs/sonett-tiny: a byte-level BPE trained on the stdlib corpus and an untrained
    tiny causal LM of every layer kind."""
    folder = tmp_path_factory.mktemp("demo") / "runs" / "sonett-tiny"
    tokenizer = train_bpe_tokenizer(stdlib_corpus(max_documents=12)["text"], vocab_size=400)
    config = tiny_config(
        **STACKS["every-kind"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,  # the default, as in the demo
    )
    torch.manual_seed(0)
    SonettForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_readme_classification_example_learns(demo_like_folder, monkeypatch):
    monkeypatch.chdir(demo_like_folder.parents[1])
    example = runpy.run_path(str(REPO / "scripts" / "classification_example.py"))
    accuracies = [entry["eval_accuracy"] for entry in example["trainer"].state.log_history if "eval_accuracy" in entry]
    assert accuracies[-1] >= 0.95, accuracies  # chance is 0.5
    trained = example["trainer"].model.eval()
    saved = AutoModelForSequenceClassification.from_pretrained("runs/sonett-sentiment").eval()
    ids = random_ids(2, 6, seed=3, high=trained.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, trained(ids).logits)


def one_sgd_step(model, data, tokenizer, output_dir, batch_size, accumulation):
    args = TrainingArguments(
        str(output_dir),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: it would hide a gradient scaled by the accumulation steps
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
    return model, trainer.train().training_loss


def test_gradient_accumulation_matches_one_large_batch(demo_like_folder, tmp_path):
    """Two micro-batches of 4 give the step and the logged loss of one batch of 8 (docs/design.md, invariant 7): the
    mean classification loss must be divided by the accumulation steps, so the heads do not take `num_items_in_batch`.
    """
    tokenizer = AutoTokenizer.from_pretrained(demo_like_folder, trust_remote_code=True)
    data = sentiment_data(tokenizer, count=8)
    steps = {}
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = AutoModelForSequenceClassification.from_pretrained(demo_like_folder, num_labels=2)
        torch.manual_seed(1)
        torch.nn.init.normal_(model.score.weight, std=0.5)
        output_dir = tmp_path / str(accumulation)
        steps[accumulation] = one_sgd_step(model, data, tokenizer, output_dir, batch_size, accumulation)
    (one, one_loss), (two, two_loss) = steps[1], steps[2]
    assert abs(one_loss - two_loss) <= 1e-5, (one_loss, two_loss)
    before = AutoModelForSequenceClassification.from_pretrained(demo_like_folder, num_labels=2)
    assert max_diff(one.model.embed_tokens.weight, before.model.embed_tokens.weight) > 1e-4  # the step moved the body
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert max_diff(a, b) <= 1e-5, name


def test_lora_trains_the_score_head_and_round_trips(demo_like_folder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_like_folder, trust_remote_code=True)
    base = AutoModelForSequenceClassification.from_pretrained(demo_like_folder, num_labels=2)
    untouched_score = base.score.weight.detach().clone()
    config = LoraConfig(task_type="SEQ_CLS", target_modules=LORA_TARGET_MODULES, r=4, lora_alpha=8)
    model = get_peft_model(base, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".score.modules_to_save." in name for name in trainable), trainable
    assert any(".score.modules_to_save." in name for name in trainable)

    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    data = sentiment_data(tokenizer, count=64)
    Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)).train()
    assert not torch.equal(model.base_model.model.score.modules_to_save["default"].weight, untouched_score)

    model.save_pretrained(tmp_path / "adapter")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(name.endswith("score.weight") for name in adapter), sorted(adapter)

    model.eval()
    input_ids, attention_mask, _ = pad([random_ids(1, n, seed=n, high=len(tokenizer))[0] for n in (9, 4)], "left")
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.manual_seed(123)  # a fresh base whose own new score differs: the adapter must bring the trained one
    fresh = AutoModelForSequenceClassification.from_pretrained(demo_like_folder, num_labels=2)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits, expected)
        merged = reloaded.merge_and_unload()
        assert max_diff(merged(input_ids=input_ids, attention_mask=attention_mask).logits, expected) <= 1e-5
    assert os.path.isfile(tmp_path / "adapter" / "adapter_config.json")

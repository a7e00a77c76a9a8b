"""Clients people already use, each run for real on a tiny saved Sonett folder (issue 14, "Clients that must work"):

- the transformers Trainer with `DataCollatorForLanguageModeling(mlm=False)`: the loss it reports is the model's own
  loss on the batch, and it goes down;
- PEFT with `target_modules="all-linear"` and with no `target_modules` at all (the default registered for the `sonett`
  model type, in this process and through remote code in a fresh one): LoRA trains, saves, loads and merges with
  identical logits; the remote code does not need PEFT;
- TRL's `SFTTrainer` with a LoRA config and `assistant_only_loss=True`: only assistant tokens are in the loss;
- EleutherAI's lm-evaluation-harness `hf` backend on a multiple-choice and a generate-until task made on the fly: its
  log-likelihoods, generations and accuracies equal the ones computed here from the model itself.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from helpers_model import max_diff
from helpers_remote import EVERY_KIND, NO_PACKAGE_PREAMBLE, fresh_process_env
from helpers_training import MIXER_PROJECTIONS, MLP_PROJECTIONS, every_kind_config
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)
from transformers.dynamic_module_utils import get_imports

from sonett import SonettForCausalLM
from sonett.data.instructions import instruction_records
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.model.peft_sonett import LORA_TARGET_MODULES

HIERARCHY = {"shorten_factor": 2, "start_layer": 1, "end_layer": 3}


def default_targets(prefix="model."):
    """The module names PEFT's default LoRA targets must wrap on the every-kind model."""
    names = set()
    for i, kind in enumerate(EVERY_KIND):
        names |= {f"{prefix}layers.{i}.mixer.{p}" for p in MIXER_PROJECTIONS[kind]}
        names |= {f"{prefix}layers.{i}.mlp.{p}" for p in MLP_PROJECTIONS}
    return names


def lora_wrapped(peft_model):
    """Names (relative to the adapted model) of the modules PEFT wrapped with LoRA."""
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def tokenizer():
    """The project's byte-level BPE with its chat template, trained on the embedded instruction set."""
    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in instruction_records()]
    return train_bpe_tokenizer(["system user assistant"] * 5 + texts, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """A saved tiny Sonett with every mixer kind (and an hourglass over layers 1-2), with the project's tokenizer."""
    path = tmp_path_factory.mktemp("sonett_clients")
    torch.manual_seed(0)
    model = SonettForCausalLM(every_kind_config(tokenizer, hierarchy=HIERARCHY))
    with torch.no_grad():  # a new hourglass adds nothing (zero upsampling); make the shortened path count
        model.model.hourglass.upsample_proj.weight.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sample_batch(tokenizer, rows=3):
    """A right-padded batch of instruction texts of different lengths."""
    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in instruction_records()[: rows * 7 : 7]]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", truncation=True, max_length=40)


def logits_of(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def lm_loss(model, batch):
    """The model's own causal-LM loss on a batch, labels = input ids with padding ignored."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


# ----------------------------------------------------------------------------------------------------------
# PEFT: "all-linear", the registered default, remote code
# ----------------------------------------------------------------------------------------------------------


def test_all_linear_wraps_every_linear_layer_but_the_output_layer(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    wrapped = lora_wrapped(peft_model)
    assert wrapped == linear - {"lm_head"}
    assert default_targets() < wrapped  # every mixer kind's projections and the MLPs
    assert {
        "model.layers.0.mixer.decay_proj",
        "model.hourglass.shorten_proj",
        "model.hourglass.upsample_proj",
    } <= wrapped


def test_default_lora_targets_are_registered_for_the_sonett_model_type(folder):
    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["sonett"] == LORA_TARGET_MODULES
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert lora_wrapped(get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))) == default_targets()
    # The bare decoder (AutoModel) names its layers without the `model.` prefix; the default reaches them too.
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert lora_wrapped(get_peft_model(base, LoraConfig(task_type="FEATURE_EXTRACTION"))) == default_targets("")


@pytest.mark.parametrize("targets", ["all-linear", "default"])
def test_lora_trains_saves_loads_and_merges_with_identical_logits(folder, tokenizer, targets, tmp_path):
    batch = sample_batch(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    base_logits = logits_of(base, batch)
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=None if targets == "default" else targets)
    peft_model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = lm_loss(peft_model.train(), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    reference = logits_of(peft_model, batch)
    assert max_diff(reference, base_logits) > 1e-2, "the trained adapter must change the logits"

    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if targets == "default":
        assert saved["target_modules"] == LORA_TARGET_MODULES
    fresh_base = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    assert max_diff(logits_of(loaded, batch), reference) <= 1e-5
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True)
    assert max_diff(logits_of(auto, batch), reference) <= 1e-5
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "SonettForCausalLM" and not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert max_diff(logits_of(merged, batch), reference) <= 1e-4


PEFT_DEFAULT_SCRIPT = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    import json

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
    names = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    print(json.dumps(sorted(names)))
    """
)

# PEFT blocked: `is_peft_available()` is False and `import peft` fails, as on an inference-only install.
NO_PEFT_SCRIPT = NO_PACKAGE_PREAMBLE + textwrap.dedent(
    """
    sys.modules["peft"] = None
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        print(json.dumps(model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :4].tolist()))
    """
).replace("import torch", "import json\nimport torch", 1)


def run_script(script, folder, tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path), str(folder)],
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_remote_code_registers_the_default_lora_targets_in_a_fresh_process(folder, tmp_path):
    assert set(run_script(PEFT_DEFAULT_SCRIPT, folder, tmp_path, "peft_default")) == default_targets()


def test_remote_code_loads_without_peft(folder, tmp_path):
    # transformers' remote-code import check must not ask for peft (nor for anything but real packages) ...
    for file in folder.glob("*.py"):
        assert "peft" not in get_imports(file), file.name
    assert (folder / "peft_sonett.py").is_file()
    # ... and the folder loads and runs in a process where peft cannot be imported.
    logits = run_script(NO_PEFT_SCRIPT, folder, tmp_path, "no_peft")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :4]
    assert max_diff(torch.tensor(logits), expected) <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# The Trainer with DataCollatorForLanguageModeling
# ----------------------------------------------------------------------------------------------------------


def test_trainer_with_the_lm_collator_reports_the_models_own_loss_and_learns(folder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"  # for training; the saved tokenizer pads on the left, for generation
    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in instruction_records()[:40:10]]
    rows = Dataset.from_dict(tokenizer(texts, truncation=True, max_length=48).data)
    assert len({len(ids) for ids in rows["input_ids"]}) > 1, "rows of different lengths, so the batch is padded"
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch = collator(rows.to_list())
    assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

    def loss_by_hand(model):
        """Next-token cross-entropy over the real tokens, shifted here: position t predicts token t + 1."""
        with torch.no_grad():
            logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)

    before = loss_by_hand(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=len(rows), learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # One batch holds the whole set, so the first step's reported loss is the untrained model's loss on `batch`.
    assert losses[0] == pytest.approx(before.item(), rel=1e-5)
    assert losses[-1] < losses[0] - 0.5, losses
    assert loss_by_hand(model) < losses[-1]


# ----------------------------------------------------------------------------------------------------------
# TRL: SFTTrainer with LoRA and assistant-only loss
# ----------------------------------------------------------------------------------------------------------


def chat_rows(count=24):
    """Conversations made on the fly: a system turn on every third, a second exchange on every other one."""
    rows = []
    for i in range(count):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": f"What is {i} + {i + 1}?"},
            {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}"},
        ]
        if i % 2:
            messages += [
                {"role": "user", "content": "Sort: tree, apple"},
                {"role": "assistant", "content": "apple, tree"},
            ]
        rows.append({"messages": messages})
    return rows


def label_runs(labels):
    """Contiguous runs of positions whose label is not -100, as lists of token ids."""
    runs, current = [], []
    for token in [*labels.tolist(), -100]:
        if token == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return runs


def test_sft_trainer_with_lora_trains_on_assistant_tokens_only(folder, tmp_path):
    from trl import SFTConfig, SFTTrainer

    rows = chat_rows()
    data = Dataset.from_list(rows)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        assistant_only_loss=True, trust_remote_code=True, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, shuffle_dataset=False,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=str(folder),  # TRL loads the folder itself (remote code)
        args=args,
        train_dataset=data,
        eval_dataset=data,
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=4),  # the default targets registered for `sonett`
    )
    assert lora_wrapped(trainer.model) == default_targets()

    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    inside = batch["labels"] != -100
    assert torch.equal(batch["labels"][inside], batch["input_ids"][inside])
    seen = 0
    for row in range(len(batch["input_ids"])):
        # The row is exactly the rendered conversation; its labelled runs are exactly the assistant replies.
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        text = tokenizer.decode(ids)
        rendered = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        messages = rows[rendered.index(text)]["messages"]
        replies = [m["content"] + "<|end|>" for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in label_runs(batch["labels"][row])] == replies
        seen += len(replies)
    assert seen > len(batch["input_ids"]), "some rows hold two assistant turns"

    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)


# ----------------------------------------------------------------------------------------------------------
# lm-evaluation-harness, `hf` backend
# ----------------------------------------------------------------------------------------------------------

QUESTIONS = [
    ("What is 3 + 4? The answer is", [" 7", " 12", " seven hundred"]),
    ("Sort: tree, apple. Sorted", [": apple, tree", ": tree, apple"]),
    ("Reverse the word stone", [" enots", " stone", " notes", " tones"]),
    ("Count the words in a b c d e f g", [" 7", " 6"]),
    ("Which module holds the function that parses command line arguments? It is", [" argparse", " json", " os"]),
    ("Summary", [" short", " a longer summary of the text"]),
    ("What is 10 + 5?", [" 15", " 105", " 50"]),
    ("Say hello", [" hello", " goodbye"]),
]
PROMPTS = [
    "What is 2 + 2?",
    "Sort the words: pear, fig, apple, banana, cherry",
    "Reverse",
    "Which module holds json.loads and json.dumps? Answer in one word, please",
    "Count the letters in stone",
    "Say",
]
MAX_GEN_TOKS = 6


def continuation_logprob(model, tokenizer, context, continuation):
    """Summed log-probability of `continuation` after `context`, the model run alone on the one sequence."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[: len(context_ids)] == context_ids, "the context must end on a token boundary"
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(logits[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))


def greedy_text(model, tokenizer, prompt, until):
    """The greedy continuation of `prompt` alone (no padding), decoded and cut at the first stop string."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_lm_eval_harness_reads_sonett_exactly(folder, tmp_path):
    from sonett.evaluation.harness import run_harness, write_task

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    until = ["\n", tokenizer.eos_token]  # the harness adds the end-of-text token to the stop strings
    mc_docs = [{"context": c, "choices": ch, "label": i % len(ch)} for i, (c, ch) in enumerate(QUESTIONS)]
    greedy = [greedy_text(model, tokenizer, prompt, until) for prompt in PROMPTS]
    # Even prompts expect the model's own greedy text, odd ones a text it does not write: accuracy 0.5 exactly when
    # the harness generates as the model does alone.
    gen_docs = [{"context": p, "target": g if i % 2 == 0 else g + "?"} for i, (p, g) in enumerate(zip(PROMPTS, greedy))]
    write_task(tmp_path, "sonett_mc", mc_docs, "multiple_choice")
    write_task(tmp_path, "sonett_gen", gen_docs, "generate_until", until=["\n"], max_gen_toks=MAX_GEN_TOKS)

    # batch_size 4: the multiple-choice requests are padded on the right, the prompts on the left.
    out = run_harness(folder, ["sonett_mc", "sonett_gen"], tmp_path, batch_size=4, log_samples=True)

    expected_correct = []
    for sample in sorted(out["samples"]["sonett_mc"], key=lambda s: s["doc_id"]):
        doc = mc_docs[sample["doc_id"]]
        mine = [continuation_logprob(model, tokenizer, doc["context"], choice) for choice in doc["choices"]]
        theirs = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(mine, abs=1e-4), sample["doc_id"]
        expected_correct.append(max(range(len(mine)), key=mine.__getitem__) == doc["label"])
    assert out["results"]["sonett_mc"]["acc,none"] == pytest.approx(sum(expected_correct) / len(mc_docs))

    generated = {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"]["sonett_gen"]}
    assert [generated[i] for i in range(len(PROMPTS))] == greedy
    assert out["results"]["sonett_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_stdlib_tasks_ask_only_about_held_out_files(tmp_path):
    from sonett.data.corpus import split_by_document, stdlib_corpus
    from sonett.evaluation.harness import STDLIB_TASKS, stdlib_tasks, write_task

    assert stdlib_tasks(tmp_path, examples=30, max_documents=60, validation_fraction=0.1) == list(STDLIB_TASKS)
    splits = split_by_document(stdlib_corpus(60), 0.1, key="path")
    held_out = [text.split("\n") for text in splits["validation"]["text"]]

    def follows(lines, line):
        """Whether `line` is a whole line of a held-out file right after `lines`."""
        return any(
            f[i : i + len(lines)] == lines and f[i + len(lines)] == line
            for f in held_out
            for i in range(len(f) - len(lines))
        )

    next_line = [json.loads(row) for row in (tmp_path / "stdlib_next_line.jsonl").read_text().splitlines()]
    assert len(next_line) == 30
    for doc in next_line:
        truth = doc["choices"][doc["label"]]
        assert len(doc["choices"]) == 4 and doc["choices"].count(truth) == 1
        context = doc["context"].split("\n")[:-1]  # lines, each ended by a newline
        assert follows(context, truth)
        assert not any(follows(context, other) for other in doc["choices"] if other != truth)
    completion = [json.loads(row) for row in (tmp_path / "stdlib_line_completion.jsonl").read_text().splitlines()]
    assert len(completion) > 20
    for doc in completion:
        *context, start = doc["context"].split("\n")
        assert doc["target"].startswith(" ") and follows(context, start + doc["target"])
    with pytest.raises(ValueError, match=r"doc 0 lacks \['target'\]; generate_until docs need \['context', 'target'\]"):
        write_task(tmp_path, "bad", [{"context": "x"}], "generate_until")

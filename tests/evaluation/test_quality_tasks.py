"""The quality-evaluation task generators (MQAR, passkey) and the comparison helpers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from sonett.data.corpus import stdlib_corpus
from sonett.data.tokenizer import train_bpe_tokenizer
from sonett.evaluation.baselines import PARAMETER_TOLERANCE, llama_config_matching
from sonett.evaluation.comparison import (
    MQARArguments,
    compare_mqar,
    decoding_state_bytes,
    mqar_training_batches,
    preset_config,
    shortened_layer_types,
)
from sonett.evaluation.mqar import MQAR_GRID, check_setting, gap_probabilities, mqar_accuracy, mqar_batch
from sonett.evaluation.passkey import PasskeyBuilder, answer_logits, passkey_batch, passkey_retrieved, passkey_sweep
from sonett.evaluation.scoring import EvaluationArguments, evaluate_mqar, evaluate_passkey
from sonett.model.modeling_sonett import SonettForCausalLM
from sonett.training.tasks import TaskTrainingArguments, train_on_task

VOCAB = 1024


class AnswerSeer(torch.nn.Module):
    """A 'model' that sees the answer: its logits at t put all mass on input_ids[t + 1]."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        following = torch.roll(input_ids, -1, dims=1)
        logits = torch.nn.functional.one_hot(following, self.vocab_size).float()
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


class ConstantPredictor(AnswerSeer):
    """Always predicts the same token."""

    def __init__(self, vocab_size: int, token: int) -> None:
        super().__init__(vocab_size)
        self.token = token

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.token] = 1.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


# ---------------------------------------------------------------------------------------------------------------
# MQAR


@pytest.mark.parametrize(("length", "pairs"), MQAR_GRID)
def test_mqar_keys_and_values_never_share_ids_and_each_query_has_one_answer(length, pairs):
    batch = mqar_batch(64, length, pairs, VOCAB, torch.Generator().manual_seed(length))
    assert batch.input_ids.shape == batch.labels.shape == (64, length)
    half = VOCAB // 2
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        keys, values = ids[0 : 2 * pairs : 2], ids[1 : 2 * pairs : 2]
        assert all(1 <= k < half for k in keys) and all(half <= v < VOCAB for v in values)
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        pair_of = dict(zip(keys, values))
        scored = [t for t, label in enumerate(labels) if label != -100]
        assert len(scored) == pairs  # every key is queried once
        queried = []
        for t in scored:
            assert t > 2 * pairs  # queries come after the context
            key = ids[t - 1]
            assert labels[t] == ids[t] == pair_of[key]  # the one right answer is the context's value of that key
            queried.append(key)
        assert sorted(queried) == sorted(keys)
        for key in keys:  # a key occurs exactly twice: in the context and at its query
            assert ids.count(key) == 2


def test_mqar_query_gaps_follow_the_power_law():
    probabilities = gap_probabilities(127)
    assert math.isclose(float(probabilities.sum()), 1.0)
    assert bool((probabilities[1:] < probabilities[:-1]).all())
    # one pair: the query slot is a single draw from p(g) ~ g^(a-1), so its distribution is p itself
    batch = mqar_batch(4000, 256, 1, VOCAB, torch.Generator().manual_seed(0))
    slots = ((batch.labels != -100).nonzero()[:, 1] - 1 - 2) // 2
    assert bool(((slots >= 0) & (slots < 127)).all())
    expected = float(probabilities[:32].sum())  # the share of the first quarter of the slots
    observed = float((slots < 32).float().mean())
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / 4000)
    # many pairs (drawn without replacement): still far more early queries than a uniform draw gives
    batch = mqar_batch(400, 256, 16, VOCAB, torch.Generator().manual_seed(0))
    slots = ((batch.labels != -100).nonzero()[:, 1] - 1 - 32) // 2
    assert float((slots < 28).float().mean()) > 0.5


def test_mqar_is_deterministic_given_the_seed():
    first = mqar_batch(8, 128, 8, VOCAB, torch.Generator().manual_seed(3))
    second = mqar_batch(8, 128, 8, VOCAB, torch.Generator().manual_seed(3))
    assert torch.equal(first.input_ids, second.input_ids) and torch.equal(first.labels, second.labels)


@pytest.mark.parametrize(
    ("length", "pairs", "vocab", "message"),
    [
        (64, 0, VOCAB, "at least one key-value pair"),
        (63, 4, VOCAB, "even sequence length"),
        (64, 17, VOCAB, "need a sequence of at least 68 tokens"),
        (256, 16, 32, "raise vocab_size"),
    ],
)
def test_mqar_refuses_impossible_settings(length, pairs, vocab, message):
    with pytest.raises(ValueError, match=message):
        check_setting(length, pairs, vocab)


def test_mqar_accuracy_is_one_for_a_model_that_sees_the_answer_and_chance_for_a_constant():
    assert mqar_accuracy(AnswerSeer(VOCAB), 128, 8, VOCAB, num_examples=200) == 1.0
    vocab = 64  # 32 value ids: chance is 1/32
    constant = mqar_accuracy(ConstantPredictor(vocab, token=40), 64, 4, vocab, num_examples=2000)
    chance = 1 / (vocab // 2)
    standard_error = math.sqrt(chance * (1 - chance) / (2000 * 4))
    assert abs(constant - chance) < 4 * standard_error


def test_mqar_training_batches_cycle_through_the_settings_with_equal_token_budgets():
    settings = ((64, 4), (256, 16))
    batches = mqar_training_batches(settings, 1024, VOCAB, seed=0)
    first, second, third = batches(0), batches(1), batches(2)
    assert first[0].shape == (16, 64) and second[0].shape == (4, 256)
    assert torch.equal(first[0], batches(0)[0])  # a step's batch depends on the step only
    assert not torch.equal(first[0], third[0])


# ---------------------------------------------------------------------------------------------------------------
# Passkey


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(stdlib_corpus(max_documents=60)["text"], vocab_size=600)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PasskeyBuilder(tokenizer)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [300, 1024])
def test_passkey_sits_where_the_depth_says(builder, tokenizer, depth, length):
    prompt = builder.build(length, depth, "68213")
    key_ids = builder.key_ids("68213")
    assert prompt.answer_start == length  # the prompt has exactly the requested length
    assert prompt.input_ids[prompt.answer_start :].tolist() == key_ids
    filler_total = length - builder.fixed_length("68213")
    assert prompt.needle_start == len(builder.intro) + round(depth * filler_total)
    needle = prompt.input_ids[prompt.needle_start : prompt.needle_start + len(builder.needle_head)].tolist()
    assert needle == builder.needle_head
    text_before = tokenizer.decode(prompt.input_ids[: prompt.needle_start])
    assert "68213" not in text_before
    assert "The pass key is 68213. Remember it. 68213 is the pass key." in tokenizer.decode(prompt.input_ids)
    assert tokenizer.decode(prompt.input_ids[: prompt.answer_start]).endswith("What is the pass key? The pass key is")


def test_passkey_refuses_bad_arguments(builder):
    with pytest.raises(ValueError, match="depth must lie in"):
        builder.build(512, 1.5, "12345")
    with pytest.raises(ValueError, match="5 digits"):
        builder.build(512, 0.5, "1234")
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        builder.build(20, 0.5, "12345")


def test_passkey_batches_have_one_length_and_score_only_the_answer(builder, tokenizer):
    input_ids, labels = passkey_batch(builder, 12, 256, torch.Generator().manual_seed(0))
    assert input_ids.shape == labels.shape and input_ids.shape[0] == 12
    for ids, row_labels in zip(input_ids, labels):
        scored = (row_labels != -100).nonzero().flatten()
        assert scored.tolist() == list(range(int(scored[0]), input_ids.shape[1]))  # the answer closes the row
        assert torch.equal(row_labels[scored], ids[scored])
    # with label_repeat the key's second mention in the needle is scored too: the key twice, nothing else
    same_ids, repeat_labels = passkey_batch(builder, 12, 256, torch.Generator().manual_seed(0), label_repeat=True)
    assert torch.equal(same_ids, input_ids)
    for ids, row_labels, answer_labels in zip(input_ids, repeat_labels, labels):
        answer = tokenizer.decode(ids[answer_labels != -100])
        assert tokenizer.decode(ids[row_labels != -100]) == answer + answer


def test_passkey_sweep_is_one_for_a_model_that_sees_the_answer_and_zero_for_a_constant(tokenizer):
    seer = passkey_sweep(AnswerSeer(len(tokenizer)), tokenizer, [256, 512], keys_per_depth=2)
    assert all(value == 1.0 for by_depth in seer.values() for value in by_depth.values())
    constant = passkey_sweep(ConstantPredictor(len(tokenizer), token=5), tokenizer, [256], keys_per_depth=2)
    assert all(value == 0.0 for value in constant[256].values())


def test_chunked_prefill_scores_the_same_as_one_forward(builder, tokenizer):
    config = preset_config("sonett-tiny-constant", len(tokenizer), depth=4)
    torch.manual_seed(0)
    model = SonettForCausalLM(config).eval()
    prompt = builder.build(700, 0.3, "40917")
    num_answer = len(prompt.input_ids) - prompt.answer_start
    whole = answer_logits(model, prompt.input_ids, num_answer, chunk_size=None)
    chunked = answer_logits(model, prompt.input_ids, num_answer, chunk_size=256)
    assert whole.shape == (num_answer, len(tokenizer))
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    assert passkey_retrieved(model, prompt, 256) == passkey_retrieved(model, prompt, None)


# ---------------------------------------------------------------------------------------------------------------
# Models and the comparison


def test_shortened_layer_types_drop_the_last_linear_layers_first():
    hybrid = ["linear_attention", "sliding_attention", "linear_attention", "memory_attention"]
    hybrid += ["linear_attention", "full_attention"]
    assert shortened_layer_types(hybrid, 4) == [
        "linear_attention",
        "sliding_attention",
        "memory_attention",
        "full_attention",
    ]
    assert shortened_layer_types(hybrid, 6) == hybrid
    with pytest.raises(ValueError, match="without dropping a non-linear kind"):
        shortened_layer_types(hybrid, 2)


@pytest.mark.parametrize("preset", ["sonett-tiny", "sonett-tiny-constant", "sonett-tiny-hourglass"])
def test_llama_baseline_matches_the_parameter_count(preset):
    config = preset_config(preset, VOCAB)
    llama = LlamaForCausalLM(llama_config_matching(config))
    sonett = SonettForCausalLM(config)
    ours, theirs = (sum(p.numel() for p in m.parameters()) for m in (sonett, llama))
    assert abs(theirs - ours) <= PARAMETER_TOLERANCE * ours
    assert abs(theirs - ours) <= 3 * config.hidden_size * config.num_hidden_layers  # as close as the MLP allows


def test_decoding_state_of_the_constant_preset_stays_flat_while_llama_grows():
    constant = SonettForCausalLM(preset_config("sonett-tiny-constant", VOCAB, depth=4)).eval()
    llama = LlamaForCausalLM(llama_config_matching(preset_config("sonett-tiny", VOCAB, depth=4))).eval()
    assert decoding_state_bytes(constant, 512, VOCAB) == decoding_state_bytes(constant, 256, VOCAB)
    short, long = decoding_state_bytes(llama, 128, VOCAB), decoding_state_bytes(llama, 256, VOCAB)
    per_token = 2 * 4 * 2 * 32 * 4  # keys and values, 4 layers, 2 KV heads, head size 32, fp32
    assert long - short == 128 * per_token


def test_task_training_lowers_the_mqar_loss_and_compare_mqar_reports_every_grid_cell(tmp_path):
    args = MQARArguments(output_dir=str(tmp_path), depth=4, steps=3, eval_examples=4, models=["constant", "llama"])
    results = compare_mqar(args)
    assert set(results) == {"constant", "llama"}
    for result in results.values():
        assert set(result["accuracy"]) == {f"{n},{d}" for n, d in MQAR_GRID}
        assert all(0.0 <= value <= 1.0 for value in result["accuracy"].values())
        assert result["state_bytes"] > 0
    # the saved folder scores the same through scripts/evaluate.py's task (shipped accuracy metric, Auto classes)
    folder = tmp_path / "constant"
    evaluation = evaluate_mqar(EvaluationArguments(model=str(folder), task="mqar", mqar_examples=6, batch_size=4))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    for length, pairs in MQAR_GRID:
        expected = mqar_accuracy(reloaded, length, pairs, args.vocab_size, num_examples=6, batch_size=4, seed=1)
        assert evaluation["accuracy"][f"{length},{pairs}"] == expected
    # a short real run learns something: (64, 4) loss falls well below the uniform guess over the values
    model = SonettForCausalLM(preset_config("sonett-tiny", 64, depth=4))
    batches = mqar_training_batches(((64, 4),), 64 * 32, 64, seed=0)
    run = train_on_task(model, batches, TaskTrainingArguments(steps=60, warmup_steps=5, log_every=10))
    assert run.history[-1]["loss"] < run.history[0]["loss"] - 0.5


def test_evaluate_passkey_reads_a_saved_folder_and_agrees_with_the_sweep(tokenizer, tmp_path):
    config = preset_config("sonett-tiny-constant", len(tokenizer), depth=4)
    torch.manual_seed(1)
    model = SonettForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = EvaluationArguments(model=str(tmp_path), task="passkey", passkey_lengths=[200, 300], chunk_size=128)
    results = evaluate_passkey(args)
    expected = passkey_sweep(model, tokenizer, [200, 300], keys_per_depth=2, seed=1, chunk_size=128)
    assert results["accuracy"] == {str(n): by_depth for n, by_depth in expected.items()}
    assert set(results["mean_accuracy"]) == {"200", "300"}


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        EvaluationArguments(task="recall")


def test_compare_passkey_trains_both_models_and_sweeps_every_length_and_depth(tokenizer, tmp_path):
    from sonett.evaluation.comparison import PasskeyArguments, compare_passkey

    args = PasskeyArguments(
        output_dir=str(tmp_path),
        train_length=160,
        batch_size=2,
        steps=2,
        lengths=[256, 512],
        llama_max_length=256,
        keys_per_depth=1,
        chunk_size=128,
    )
    results = compare_passkey(args, tokenizer)
    assert set(results["sonett"]["accuracy"]) == {"256", "512"}
    assert set(results["llama"]["accuracy"]) == {"256"}  # not swept past llama_max_length
    assert len(results["sonett"]["accuracy"]["512"]) == 11  # depths 0, 10, ..., 100 %
    assert (
        abs(results["sonett"]["parameters"] - results["llama"]["parameters"]) <= 0.05 * results["llama"]["parameters"]
    )
    gates = results["sonett"]["memory_gates"]
    assert len(gates) == 2 and all(len(heads) == 4 for heads in gates.values())  # two memory layers, 4 heads
    # a pretrained start: the saved Sonett continues from its weights. At a vanishing learning rate they stay put;
    # a fresh init of the same seed differs from them by the first run's two warmup Adam steps (about 6e-5).
    from safetensors.torch import load_file

    args.sonett_model, args.models = str(tmp_path / "sonett"), ["sonett"]
    args.output_dir, args.learning_rate = str(tmp_path / "again"), 1e-12
    again = compare_passkey(args, tokenizer)
    assert again["sonett"]["started_from"] == str(tmp_path / "sonett")
    before = load_file(tmp_path / "sonett" / "model.safetensors")
    after = load_file(tmp_path / "again" / "sonett" / "model.safetensors")
    assert before.keys() == after.keys()
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-6
    with pytest.raises(ValueError, match="train_length is at most 2048"):
        PasskeyArguments(train_length=4096)


def test_quality_rows_go_into_the_model_card_and_replace_earlier_rows(tmp_path):
    from sonett.hub.model_card import quality_rows
    from sonett.hub.saving import add_quality_results

    SonettForCausalLM(preset_config("sonett-tiny", VOCAB, depth=4)).save_pretrained(tmp_path)
    row = {"evaluation": "MQAR (256,16)", "model": "0.812", "llama": "0.655", "target": ">= 0.99", "command": "x"}
    add_quality_results(tmp_path, [row])
    add_quality_results(tmp_path, [{**row, "model": "0.995"}, {**row, "evaluation": "passkey 4k", "model": "0.91"}])
    card = (tmp_path / "README.md").read_text()
    assert "| MQAR (256,16) | 0.995 | 0.655 | >= 0.99 |" in card
    assert "| passkey 4k | 0.91 | 0.655 | >= 0.99 |" in card
    assert "0.812" not in card  # the earlier row of the same evaluation was replaced
    assert "Against a Llama of the same size" in card
    with pytest.raises(ValueError, match=r"lacks \['command', 'target'\]"):
        quality_rows({"quality": [{"evaluation": "a", "model": "1", "llama": "2"}]})

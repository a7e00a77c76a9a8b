"""The metric modules shipped in `sonett/metrics/`, loaded offline through `evaluate.load(<local folder>)`, against
values computed by hand in the tests."""

import math
from pathlib import Path

import evaluate
import numpy as np
import pytest

from sonett.evaluation.scoring import load_metric, metric_path

NLL = [12.5, 3.25, 40.0, 0.0, 7.75]
TOKENS = [10, 4, 16, 3, 8]


def load(name: str) -> evaluate.EvaluationModule:
    return evaluate.load(metric_path(name), keep_in_memory=True)


@pytest.mark.parametrize("name", ["perplexity", "exact_match", "accuracy"])
def test_metric_folders_load_offline_by_absolute_path(name):
    path = Path(metric_path(name))
    assert path.is_absolute() and (path / f"{name}.py").is_file()
    metric = evaluate.load(str(path))
    assert isinstance(metric, evaluate.Metric)
    assert metric.name == name
    assert metric.description.strip() and metric.citation.strip() and metric.inputs_description.strip()


def test_unknown_metric_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"No metric 'bleu'.*\['accuracy', 'exact_match', 'perplexity'\]"):
        metric_path("bleu")


def test_perplexity_equals_hand_computed_values():
    result = load("perplexity").compute(nll=NLL, num_tokens=TOKENS)
    loss = (12.5 + 3.25 + 40.0 + 0.0 + 7.75) / (10 + 4 + 16 + 3 + 8)
    per_sequence = [math.exp(12.5 / 10), math.exp(3.25 / 4), math.exp(40.0 / 16), 1.0, math.exp(7.75 / 8)]
    assert result["loss"] == pytest.approx(loss, rel=1e-15)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-15)
    assert result["perplexities"] == pytest.approx(per_sequence, rel=1e-15)
    assert result["mean_perplexity"] == pytest.approx(sum(per_sequence) / 5, rel=1e-15)
    assert result["num_tokens"] == 41
    assert result["num_sequences"] == 5
    # Corpus perplexity weights tokens, the mean weights sequences: the two differ on uneven sequences.
    assert abs(result["mean_perplexity"] - result["perplexity"]) > 0.3


def test_perplexity_add_batch_equals_one_shot_compute_and_accepts_numpy():
    one_shot = load("perplexity").compute(nll=NLL, num_tokens=TOKENS)
    metric = load("perplexity")
    metric.add_batch(nll=np.array(NLL[:2]), num_tokens=np.array(TOKENS[:2]))
    metric.add_batch(nll=NLL[2:3], num_tokens=TOKENS[2:3])
    metric.add(nll=NLL[3], num_tokens=TOKENS[3])
    assert metric.compute(nll=NLL[4:], num_tokens=TOKENS[4:]) == one_shot


def test_perplexity_with_cache_files_equals_in_memory():
    on_disk = evaluate.load(metric_path("perplexity"))  # default mode: Arrow cache files under $HF_HOME
    on_disk.add_batch(nll=NLL[:3], num_tokens=TOKENS[:3])
    on_disk.add_batch(nll=NLL[3:], num_tokens=TOKENS[3:])
    assert on_disk.compute() == load("perplexity").compute(nll=NLL, num_tokens=TOKENS)


@pytest.mark.parametrize(
    ("nll", "num_tokens", "message"),
    [
        ([1.0, 2.0], [3], r"nll has 2 values but num_tokens has 1"),
        ([1.0, 2.0], [3, 0], r"num_tokens\[1\] is 0; every sequence must predict at least one token"),
        ([1.0], [-4], r"num_tokens\[0\] is -4"),
        ([1.0], [2.5], r"num_tokens\[0\] is 2.5; token counts must be integers"),
        ([1.0, float("nan")], [2, 2], r"nll\[1\] is nan; every nll must be finite"),
        ([float("inf")], [2], r"nll\[0\] is inf"),
        ([-0.5], [2], r"nll\[0\] is -0.5 < 0"),
    ],
)
def test_perplexity_rejects_bad_inputs(nll, num_tokens, message):
    with pytest.raises(ValueError, match=message):
        load("perplexity").compute(nll=nll, num_tokens=num_tokens)


def test_compute_with_nothing_added_names_the_inputs():
    with pytest.raises(ValueError, match="Nothing to score: pass nll and num_tokens"):
        load("perplexity").compute()
    with pytest.raises(ValueError, match="Nothing to score: pass predictions and references"):
        load("accuracy").compute()


PREDICTIONS = ["Paris", " paris ", "Rome\n", "berlin", "Madrid"]
REFERENCES = ["Paris", "Paris", "Rome", "Berlin", "Lisbon"]


@pytest.mark.parametrize(
    ("options", "matches"),
    [
        ({}, 2),  # default strip=True: "Paris", "Rome\n"
        ({"strip": False}, 1),  # only "Paris"
        ({"ignore_case": True}, 4),  # all but "Madrid"
        ({"strip": False, "ignore_case": True}, 2),  # "Paris", "berlin"
    ],
)
def test_exact_match_options(options, matches):
    result = load("exact_match").compute(predictions=PREDICTIONS, references=REFERENCES, **options)
    assert result == {"exact_match": matches / 5, "num_matches": matches, "num_examples": 5}


def test_exact_match_add_batch_equals_one_shot():
    metric = load("exact_match")
    metric.add_batch(predictions=PREDICTIONS[:2], references=REFERENCES[:2])
    metric.add_batch(predictions=PREDICTIONS[2:], references=REFERENCES[2:])
    assert metric.compute(ignore_case=True) == load("exact_match").compute(
        predictions=PREDICTIONS, references=REFERENCES, ignore_case=True
    )


def test_exact_match_rejects_bad_inputs():
    with pytest.raises(ValueError, match="predictions has 2 strings but references has 1"):
        load("exact_match").compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(ValueError, match=r"references\[1\] is None; every reference must be a string"):
        load("exact_match").compute(predictions=["a", "b"], references=["a", None])


def test_accuracy_on_integers_strings_and_numpy():
    assert load("accuracy").compute(predictions=[0, 1, 1, 2, 2], references=[0, 1, 2, 2, 0]) == {
        "accuracy": 3 / 5,
        "num_correct": 3,
        "num_examples": 5,
    }
    assert load("accuracy").compute(predictions=["cat", "dog", "owl"], references=["cat", "cat", "owl"])[
        "accuracy"
    ] == pytest.approx(2 / 3)
    result = load("accuracy").compute(predictions=np.array([7, 8, 9, 9]), references=np.array([7, 8, 8, 8]))
    assert result["accuracy"] == 0.5


def test_accuracy_add_batch_equals_one_shot():
    predictions, references = [3, 1, 4, 1, 5, 9, 2, 6], [3, 1, 4, 0, 5, 0, 0, 6]
    metric = load_metric("accuracy")
    for start in range(0, 8, 3):
        metric.add_batch(predictions=predictions[start : start + 3], references=references[start : start + 3])
    assert metric.compute() == load("accuracy").compute(predictions=predictions, references=references)
    assert metric.compute(predictions=predictions, references=references)["num_correct"] == 5


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([1, 2, 3], [1, 2], "predictions has 3 labels but references has 2"),
        ([1, "a"], [1, 2], r"Labels mix kinds \['integer', 'string'\]"),
        ([1.5, 2.0], [1, 2], r"Labels must be integers or strings, got \['float', 'integer'\]"),
    ],
)
def test_accuracy_rejects_bad_inputs(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        load("accuracy").compute(predictions=predictions, references=references)

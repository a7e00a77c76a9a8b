"""Multi-query associative recall (MQAR), following the Zoology protocol (Arora et al. 2023, "Zoology: Measuring
and Improving Recall in Efficient Language Models").

An example of length L with D pairs opens with D key-value pairs `k1 v1 k2 v2 ... kD vD`. Keys come from the lower
half of the vocabulary (ids 1 .. V/2 - 1), values from the upper half (V/2 .. V - 1); within an example the keys
are distinct and so are the values. The rest of the sequence is noise, except that every key is queried once:
it appears again at an even offset `2 * gap` after the context, and the next token is its value. The gaps are
drawn without replacement from a power law p(g) ~ g^(a - 1) with a = 0.01, so most queries come soon after the
context and a few come late. Only the value after each query is scored.

Two details differ from Zoology's generator, both so that every query has exactly one correct answer: the value
follows its query in the input (the sequence reads like text, as a causal LM sees it), and noise tokens are never
one of the example's keys. Works with any `AutoModelForCausalLM`: labels use the transformers convention (the
model shifts them), so `model(input_ids, labels=labels).loss` is the recall loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (sequence length, key-value pairs) of the evaluation grid.
MQAR_GRID: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (512, 64))
# Zoology's power-law exponent for the query gaps.
POWER_A = 0.01
IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARBatch:
    """A batch of MQAR examples.

    input_ids: (batch, seq) token ids.
    labels: (batch, seq) the value at each position that follows a query (the transformers causal-LM convention:
        the model predicts labels[:, t] from input_ids[:, :t]), -100 elsewhere.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def check_setting(sequence_length: int, num_pairs: int, vocab_size: int) -> None:
    """Raise ValueError unless MQAR with these sizes can be built (Zoology's constraints)."""
    if num_pairs < 1:
        raise ValueError(f"MQAR needs at least one key-value pair, got num_pairs={num_pairs}.")
    if sequence_length % 2:
        raise ValueError(f"MQAR needs an even sequence length, got {sequence_length}.")
    if 4 * num_pairs > sequence_length:
        raise ValueError(
            f"{num_pairs} pairs need a sequence of at least {4 * num_pairs} tokens (context and one query slot per "
            f"pair), got {sequence_length}; lower num_pairs or raise the length."
        )
    if vocab_size // 2 - 1 < num_pairs + 1:
        raise ValueError(
            f"vocab_size {vocab_size} leaves {vocab_size // 2 - 1} key ids, too few for {num_pairs} distinct keys "
            "plus noise; raise vocab_size."
        )


def gap_probabilities(num_slots: int, power_a: float = POWER_A) -> torch.Tensor:
    """p(g) ~ a * g^(a - 1) over query slots g = 1..num_slots, normalised; shape (num_slots,), float64."""
    slots = torch.arange(1, num_slots + 1, dtype=torch.float64)
    weights = power_a * slots ** (power_a - 1)
    return weights / weights.sum()


def mqar_batch(
    batch_size: int,
    sequence_length: int,
    num_pairs: int,
    vocab_size: int,
    generator: torch.Generator,
    power_a: float = POWER_A,
) -> MQARBatch:
    """`batch_size` MQAR examples of `sequence_length` tokens with `num_pairs` key-value pairs each.

    Deterministic given the generator's state.
    """
    check_setting(sequence_length, num_pairs, vocab_size)
    half = vocab_size // 2
    context = 2 * num_pairs
    num_slots = (sequence_length - context) // 2
    rows = torch.arange(batch_size)[:, None]

    # distinct keys from 1..half-1 and values from half..vocab-1, per example
    keys = torch.rand(batch_size, half - 1, generator=generator).argsort(dim=1)[:, :num_pairs] + 1
    values = torch.rand(batch_size, vocab_size - half, generator=generator).argsort(dim=1)[:, :num_pairs] + half
    # query slots without replacement, power-law weighted (torch.multinomial draws without replacement)
    slot_weights = gap_probabilities(num_slots, power_a).expand(batch_size, -1)
    gaps = torch.multinomial(slot_weights, num_pairs, replacement=False, generator=generator)  # (batch, pairs)

    # noise: any id except 0 and this example's keys, so each key occurs exactly twice (context and query)
    noise = torch.randint(1, vocab_size, (batch_size, sequence_length), generator=generator)
    is_key = torch.zeros(batch_size, vocab_size, dtype=torch.bool)
    is_key[rows, keys] = True
    redraw = is_key[rows, noise]
    while redraw.any():
        noise[redraw] = torch.randint(1, vocab_size, (int(redraw.sum()),), generator=generator)
        redraw = is_key[rows, noise]

    input_ids = noise
    input_ids[:, 0:context:2] = keys
    input_ids[:, 1:context:2] = values
    query_positions = context + 2 * gaps  # (batch, pairs)
    input_ids[rows, query_positions] = keys
    input_ids[rows, query_positions + 1] = values
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[rows, query_positions + 1] = values
    return MQARBatch(input_ids=input_ids, labels=labels)


@torch.no_grad()
def recall_predictions(model: torch.nn.Module, batch: MQARBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's argmax prediction and the right value at every scored position.

    Returns two 1-D tensors of equal length (the number of queries in the batch): predicted ids and target ids.
    """
    device = next(model.parameters()).device
    logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits  # (batch, seq, vocab)
    targets = batch.labels[:, 1:].to(device)  # position t predicts token t + 1
    scored = targets != IGNORE_INDEX
    return logits[:, :-1].argmax(dim=-1)[scored].cpu(), targets[scored].cpu()


@torch.no_grad()
def mqar_accuracy(
    model: torch.nn.Module,
    sequence_length: int,
    num_pairs: int,
    vocab_size: int,
    num_examples: int = 1000,
    batch_size: int = 50,
    seed: int = 1234,
) -> float:
    """Fraction of queries whose value the model predicts (argmax), over `num_examples` fresh examples.

    Any causal LM with `model(input_ids=...).logits` of shape (batch, seq, vocab) works.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"num_examples and batch_size must be at least 1, got {num_examples} and {batch_size}.")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    for start in range(0, num_examples, batch_size):
        count = min(batch_size, num_examples - start)
        batch = mqar_batch(count, sequence_length, num_pairs, vocab_size, generator)
        predicted, target = recall_predictions(model, batch)
        correct += int((predicted == target).sum())
        total += target.numel()
    model.train(was_training)
    return correct / total


__all__ = [
    "IGNORE_INDEX",
    "MQAR_GRID",
    "POWER_A",
    "MQARBatch",
    "check_setting",
    "gap_probabilities",
    "mqar_accuracy",
    "mqar_batch",
    "recall_predictions",
]

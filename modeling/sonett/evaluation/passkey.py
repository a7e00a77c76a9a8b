"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; the long-context test of Infini-attention).

A random 5-digit key is hidden in repetitive filler text at a given depth, and the prompt ends with the question;
the model must continue with the key:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. (repeated)
    The pass key is 68213. Remember it. 68213 is the pass key.                  <- at `depth` of the filler
    The grass is green. ... (repeated)
    What is the pass key? The pass key is| 68213

Prompts are assembled from token ids, so a prompt has exactly the requested length and the needle starts exactly
at `depth` of the filler: needle start = len(intro) + round(depth * filler tokens). The key's tokens are the same in
the needle and in the answer. Scoring is teacher-forced: a prompt counts as retrieved when the model's argmax at
every answer position is the answer token, which is exactly when greedy decoding would write the key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_DEPTHS: tuple[float, ...] = tuple(i / 10 for i in range(11))
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey example.

    input_ids: (length,) the prompt followed by the answer tokens.
    answer_start: index of the first answer token; the prompt is input_ids[:answer_start].
    needle_start: index of the first needle token.
    key: the hidden 5-digit key as text.
    repeat_start: index of the key's second mention inside the needle ("Remember it. <key> is the pass key.").
    """

    input_ids: torch.Tensor
    answer_start: int
    needle_start: int
    key: str
    repeat_start: int = -1

    @property
    def labels(self) -> torch.Tensor:
        """(length,) the answer tokens at their positions, -100 elsewhere (transformers' causal-LM convention)."""
        labels = torch.full_like(self.input_ids, IGNORE_INDEX)
        labels[self.answer_start :] = self.input_ids[self.answer_start :]
        return labels


class PasskeyBuilder:
    """Builds passkey prompts of exact token lengths with one tokenizer.

    Args:
        tokenizer: any transformers tokenizer; the pieces are tokenized without special tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self._ids = ids
        self.intro = ids(INTRO)
        self.filler = ids(FILLER)
        self.question = ids(QUESTION)
        self.needle_head = ids("The pass key is")
        self.needle_middle = ids(". Remember it.")
        self.needle_tail = ids(" is the pass key. ")

    def key_ids(self, key: str) -> list[int]:
        """The tokens of ` <key>`, used both in the needle and as the answer."""
        return self._ids(f" {key}")

    def fixed_length(self, key: str) -> int:
        """Tokens of a prompt that are not filler: intro, needle and question (the answer not counted)."""
        needle = len(self.needle_head) + 2 * len(self.key_ids(key)) + len(self.needle_middle) + len(self.needle_tail)
        return len(self.intro) + needle + len(self.question)

    def build(self, context_length: int, depth: float, key: str) -> PasskeyPrompt:
        """A prompt of exactly `context_length` tokens, the needle at `depth` (0 = first, 1 = last) of the filler."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}.")
        if not (len(key) == 5 and key.isdigit()):
            raise ValueError(f"The key must be 5 digits, got {key!r}.")
        key_ids = self.key_ids(key)
        filler_total = context_length - self.fixed_length(key)
        if filler_total < 0:
            raise ValueError(
                f"context_length {context_length} is shorter than the prompt without filler "
                f"({self.fixed_length(key)} tokens); raise it."
            )
        repeats = filler_total // len(self.filler) + 1
        filler = (self.filler * repeats)[:filler_total]
        before = round(depth * filler_total)
        needle = self.needle_head + key_ids + self.needle_middle + key_ids + self.needle_tail
        prompt = self.intro + filler[:before] + needle + filler[before:] + self.question
        ids = torch.tensor(prompt + key_ids, dtype=torch.long)
        needle_start = len(self.intro) + before
        repeat_start = needle_start + len(self.needle_head) + len(key_ids) + len(self.needle_middle)
        return PasskeyPrompt(
            input_ids=ids, answer_start=len(prompt), needle_start=needle_start, key=key, repeat_start=repeat_start
        )


def random_key(generator: torch.Generator) -> str:
    """A uniformly random 5-digit key, 10000..99999."""
    return str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))


def passkey_batch(
    builder: PasskeyBuilder,
    batch_size: int,
    context_length: int,
    generator: torch.Generator,
    label_repeat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` training prompts at uniformly random depths, with random keys.

    Returns input_ids and labels, both (batch, context_length + longest answer); labels hold the answer tokens and,
    with `label_repeat`, also the key's second mention inside the needle (a nearby copy, a denser training signal).
    A key's tokens count differs from key to key, so each prompt gets as many more filler tokens as its
    answer is shorter than the longest, and all rows have one length.
    """
    keys = [random_key(generator) for _ in range(batch_size)]
    depths = torch.rand(batch_size, generator=generator).tolist()
    longest = max(len(builder.key_ids(key)) for key in keys)
    rows = [
        builder.build(context_length + longest - len(builder.key_ids(key)), depth, key)
        for key, depth in zip(keys, depths)
    ]
    labels = torch.stack([row.labels for row in rows])
    if label_repeat:
        for index, (row, key) in enumerate(zip(rows, keys)):
            span = slice(row.repeat_start, row.repeat_start + len(builder.key_ids(key)))
            labels[index, span] = row.input_ids[span]
    return torch.stack([row.input_ids for row in rows]), labels


@torch.no_grad()
def answer_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, num_answer: int, chunk_size: int | None
) -> torch.Tensor:
    """Logits at the `num_answer` positions that predict the answer tokens; (num_answer, vocab).

    With `chunk_size`, the sequence goes through the model in chunks with its cache (bounded activation memory for
    long prompts; the result is the same).
    """
    device = next(model.parameters()).device
    ids = input_ids[None].to(device)  # the last answer token predicts nothing; a causal model ignores it before
    keep = num_answer + 1
    if chunk_size is None or ids.shape[1] <= chunk_size:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0, :-1].float()
    cache, logits = None, []
    for start in range(0, ids.shape[1], chunk_size):
        output = model(input_ids=ids[:, start : start + chunk_size], cache=cache, use_cache=True, logits_to_keep=keep)
        cache = output.cache
        logits.append(output.logits[0].float())
    return torch.cat(logits)[-keep:-1]


@torch.no_grad()
def passkey_retrieved(model: torch.nn.Module, prompt: PasskeyPrompt, chunk_size: int | None = None) -> bool:
    """Whether greedy decoding after the prompt writes the key: argmax equals the answer at every answer position."""
    num_answer = len(prompt.input_ids) - prompt.answer_start
    logits = answer_logits(model, prompt.input_ids, num_answer, chunk_size)
    predicted = logits.argmax(dim=-1).cpu()
    return bool((predicted == prompt.input_ids[prompt.answer_start :]).all())


@torch.no_grad()
def passkey_sweep(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    context_lengths: list[int],
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    keys_per_depth: int = 2,
    seed: int = 0,
    chunk_size: int | None = None,
) -> dict[int, dict[float, float]]:
    """Retrieval accuracy at every (context length, depth): {length: {depth: fraction of keys retrieved}}.

    The same keys are used at every length, so lengths differ only by the filler.
    """
    if keys_per_depth < 1:
        raise ValueError(f"keys_per_depth must be at least 1, got {keys_per_depth}.")
    was_training = model.training
    model.eval()
    builder = PasskeyBuilder(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    keys = {depth: [random_key(generator) for _ in range(keys_per_depth)] for depth in depths}
    results: dict[int, dict[float, float]] = {}
    for length in context_lengths:
        results[length] = {}
        for depth in depths:
            hits = [passkey_retrieved(model, builder.build(length, depth, key), chunk_size) for key in keys[depth]]
            results[length][depth] = sum(hits) / len(hits)
    model.train(was_training)
    return results


__all__ = [
    "DEFAULT_DEPTHS",
    "FILLER",
    "INTRO",
    "QUESTION",
    "PasskeyBuilder",
    "PasskeyPrompt",
    "answer_logits",
    "passkey_batch",
    "passkey_retrieved",
    "passkey_sweep",
    "random_key",
]

"""A chat whose whole decoding state persists: each turn feeds only its own new tokens into the cache.

`Conversation.reply` renders the new user turn with the tokenizer's chat template, runs it through the model
on top of the `SonettCache` of every earlier turn, and streams the reply token by token. `save` / `load`
write that cache to a safetensors file, so a later process continues the conversation without re-reading
earlier turns; the file is bound to the model's weights and checked before use (`SonettCache.load`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sonett.model.cache_sonett import SonettCache
from sonett.model.modeling_sonett import full_attention_token_limit

logger = logging.getLogger(__name__)

TURN_END_TOKEN = "<|end|>"


class ConversationFullError(ValueError):
    """A turn that would take the conversation past the positions the model's full_attention layers take."""


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise a ValueError unless `temperature` >= 0 (0 = greedy) and 0 < `top_p` <= 1, both finite numbers."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy, higher = more random), got {temperature}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(
            f"top_p must be a number in (0, 1], got {top_p!r}: sampling keeps the most likely tokens whose "
            "probabilities sum to top_p, so 0 keeps none. Use 1 to sample from all tokens, or temperature 0 for "
            "greedy replies."
        )


class Conversation:
    """A multi-turn chat over one persistent `SonettCache`.

    Args:
        model: a Sonett causal LM (loaded from a folder, remote code or not).
        tokenizer: its tokenizer, with the Sonett chat template.
        cache: the state of earlier turns; a fresh cache when None.
        ended_turn: whether the state ends after a finished assistant turn (so the next turn opens with "\\n").
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cache: SonettCache | None = None,
        ended_turn: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache if cache is not None else model.make_cache()
        self.ended_turn = ended_turn
        self.prompt_tokens_read = 0
        stop = {tokenizer.convert_tokens_to_ids(TURN_END_TOKEN), tokenizer.eos_token_id}
        self.stop_ids = {i for i in stop if i is not None and i != tokenizer.unk_token_id}

    @property
    def tokens_in_state(self) -> int:
        return self.cache.get_seq_length()

    def turn_ids(self, message: str, role: str = "user") -> list[int]:
        """Token ids of one new turn plus the assistant prompt, exactly as the chat template renders them."""
        text = self.tokenizer.apply_chat_template(
            [{"role": role, "content": message}], tokenize=False, add_generation_prompt=True
        )
        if self.tokens_in_state > 0:
            text = text.removeprefix(self.tokenizer.bos_token or "")
            text = ("\n" if self.ended_turn else "") + text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_room(self, turn_tokens: int, max_new_tokens: int) -> None:
        """Raise a `ConversationFullError` when a turn of `turn_tokens` and a reply of up to `max_new_tokens` (plus
        its end token) would run past the positions the model's full_attention layers take (no limit without them).
        """
        config = self.model.config.get_text_config(decoder=True)
        limit = full_attention_token_limit(config)
        held = int(self.tokens_in_state)
        needed = held + turn_tokens + max_new_tokens + 1
        if limit is None or needed <= limit:
            return
        shorter = limit - held - turn_tokens - 1
        raise ConversationFullError(
            f"The conversation is full: it holds {held} tokens, this turn adds {turn_tokens} and a reply of up to "
            f"{max_new_tokens} tokens plus its end token would reach {needed}, but this model's full_attention layers "
            f"take at most {limit} positions (max_position_embeddings={config.max_position_embeddings}). "
            "Start a new conversation (sonett chat: /reset; in Python a new Conversation), "
            + (f"lower max_new_tokens to {shorter} or less, " if shorter >= 1 else "")
            + "or chat with a constant-memory model without full_attention layers (e.g. one trained from "
            "configuration/sonett-tiny-constant.json), whose state never fills up."
        )

    def reply(
        self,
        message: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """Stream the assistant's reply to `message` as text pieces (greedy when `temperature` is 0).

        Checked before anything is fed, so a refused turn leaves the state as it was: `temperature` and `top_p`
        (ValueError, see `check_sampling`) and the room left for the turn and its reply (`ConversationFullError`).
        """
        check_sampling(temperature, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
        ids = self.turn_ids(message)
        self.check_room(len(ids), max_new_tokens)
        return self._stream(ids, max_new_tokens, temperature, top_p, generator)

    @torch.no_grad()
    def _stream(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, generator: torch.Generator | None
    ) -> Iterator[str]:
        self.prompt_tokens_read += len(ids)
        device = self.model.device
        logits = self.model(torch.tensor([ids], device=device), cache=self.cache, use_cache=True).logits[0, -1]
        generated: list[int] = []
        shown = ""
        for _ in range(max_new_tokens):
            token = self._pick(logits, temperature, top_p, generator)
            step = self.model(torch.tensor([[token]], device=device), cache=self.cache, use_cache=True)
            logits = step.logits[0, -1]
            if token in self.stop_ids:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown) :]
                shown = text
        else:
            # The reply hit max_new_tokens: close the turn so the state matches the chat template.
            end_id = self.tokenizer.convert_tokens_to_ids(TURN_END_TOKEN)
            self.model(torch.tensor([[end_id]], device=device), cache=self.cache, use_cache=True)
        self.ended_turn = True

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    def save(self, path: str | Path) -> None:
        """Write the conversation state (the whole cache) to a safetensors file, bound to the model's weights."""
        self.cache.save(path, model=self.model)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        allow_other_weights: bool = False,
    ) -> Conversation:
        """Continue a conversation saved by `save`. Refuses (`MemoryFileError`) a damaged or edited file, one from
        another config, or one made with other weights unless `allow_other_weights` (see `SonettCache.load`)."""
        cache_class = type(model.make_cache())  # the model's own class, remote code or not
        cache = cache_class.load(
            path, model.config, device=model.device, model=model, allow_other_weights=allow_other_weights
        )
        return cls(model, tokenizer, cache=cache, ended_turn=cache.get_seq_length() > 0)


__all__ = ["Conversation", "ConversationFullError", "check_sampling"]

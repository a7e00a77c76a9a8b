"""Chat with a Sonett model in the terminal; `--memory FILE` keeps the conversation across processes.

    sonett chat runs/sonett-tiny --memory runs/chat-memory.safetensors

Each turn feeds only its own tokens to the model on top of the saved decoding state (`SonettCache`), and
the state is written back after every reply, so a later run continues where this one stopped without
re-reading earlier turns. Type /reset to start over (it also deletes the memory file), /quit (or end the input) to
leave. A memory file is checked before use (checksum, config, weights, every tensor) and only continues with the
weights that made it, unless --memory_from_other_model. With full_attention layers a conversation can fill the
model's positions; the chat then says so and waits for /reset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sonett.cli.parsing import argument_parser, spellings
from sonett.hub.loading import load_model, load_tokenizer
from sonett.inference.conversation import Conversation, ConversationFullError, check_sampling


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett chat`."""
    parser = argument_parser("chat", __doc__)
    parser.add_argument("model", help="a Sonett model folder or Hub id")
    parser.add_argument(
        *spellings("memory"), type=Path, default=None, help="safetensors file holding the conversation state"
    )
    parser.add_argument(*spellings("max_new_tokens"), type=int, default=128, help="most tokens of one reply")
    parser.add_argument(*spellings("temperature"), type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument(
        *spellings("top_p"),
        type=float,
        default=0.9,
        help="nucleus sampling: keep the most likely tokens up to this mass",
    )
    parser.add_argument(*spellings("seed"), type=int, default=0, help="seed of the sampling")
    parser.add_argument(*spellings("revision"), default=None, help="pin a Hub commit, branch or tag")
    parser.add_argument(
        *spellings("memory_from_other_model"),
        action="store_true",
        help="continue a memory file made with other weights (by default it is refused)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_p)
    except ValueError as error:
        parser.error(str(error))
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")

    # The sonett package's own classes load the folder: none of its code runs (sonett.hub.loading).
    try:
        tokenizer = load_tokenizer(args.model, revision=args.revision)
        model = load_model(args.model, revision=args.revision)
    except OSError as error:  # transformers' "Repo id must be ..." / "couldn't connect" for a mistyped folder
        if Path(args.model).expanduser().exists():
            raise
        parser.error(
            f"{args.model} is neither a model folder nor a Hub repository that could be loaded ({error}). Pass a "
            "folder written by `sonett train` (e.g. runs/sonett-tiny) or a Hub id."
        )
    if args.memory is not None and args.memory.is_file():
        try:
            conversation = Conversation.load(
                args.memory, model, tokenizer, allow_other_weights=args.memory_from_other_model
            )
        except ValueError as error:  # the file cannot be used; the message says why and what to do
            sys.exit(f"[memory] {error}")
        print(f"[memory] continuing from {args.memory}: {conversation.tokens_in_state} tokens in the state")
    else:
        conversation = Conversation(model, tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    interactive = sys.stdin.isatty()

    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            break
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            conversation = Conversation(model, tokenizer)
            if args.memory is not None:
                args.memory.unlink(missing_ok=True)
            print("[memory] cleared" + (f" (deleted {args.memory})" if args.memory is not None else ""))
            continue
        if not message.strip():
            continue
        try:
            pieces = conversation.reply(message, args.max_new_tokens, args.temperature, args.top_p, generator)
        except ConversationFullError as error:  # checked before the turn is fed: the state is unchanged
            print(f"[memory] {error}", flush=True)
            continue
        print("sonett> ", end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        if args.memory is not None:
            conversation.save(args.memory)
    print(
        f"[memory] {conversation.tokens_in_state} tokens in the state, {conversation.cache.nbytes():,} bytes; "
        f"this session read {conversation.prompt_tokens_read} prompt tokens"
    )


if __name__ == "__main__":
    sys.exit(main())

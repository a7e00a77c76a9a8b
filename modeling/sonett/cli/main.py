"""`sonett`: one command for every job, each a subcommand with its own `--help`.

    sonett train --config sonett-tiny        # pretrain a preset on the embedded corpus (or your data)
    sonett chat runs/sonett-tiny             # talk to a folder, with a memory that survives restarts

A subcommand's module is imported only when it runs, so `sonett --help` is instant and a subcommand needs only
the extras it uses (for example `sonett[train]` for `train`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sonett.extras import MissingExtraError

# Set to any value to get the full traceback of an error the command would otherwise print as one message.
TRACEBACK_VARIABLE = "SONETT_TRACEBACK"

# name -> (module under sonett.cli with a `main(argv)` function, one line for `sonett --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "pretrain a model from a preset on the embedded corpus or your data (Accelerate)"),
    "train-tokenizer": ("train_tokenizer", "train a byte-level BPE tokenizer with the chat template"),
    "finetune": ("finetune", "fine-tune a folder on instructions with LoRA (PEFT) and the Trainer"),
    "evaluate": ("evaluate", "score a folder: perplexity, MQAR or passkey retrieval"),
    "compare": ("compare", "train Sonett and an equal-size Llama side by side (lm, mqar, passkey)"),
    "chat": ("chat", "chat with a folder in the terminal, with a memory file that survives restarts"),
    "serve": ("serve", "serve a folder with an OpenAI-compatible HTTP API"),
    "push": ("push", "check a saved folder and upload it to the Hugging Face Hub"),
    "benchmark": ("benchmark", "speed and memory against an equal-size Llama, side by side"),
    "info": ("info", "a folder's or preset's layer mix, parameters and state size per token"),
}


def _parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="sonett",
        description="Sonett: a hybrid, multimodal transformer language model for the Hugging Face ecosystem.",
        epilog=f"commands:\n{listing}\n\nRun `sonett COMMAND --help` for the flags of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="the job to run (see below)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sonett")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run `sonett COMMAND ARGS...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _parser().parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _parser().parse_args([command])  # exits 2 with the list of commands
    try:
        module = importlib.import_module(f"sonett.cli.{COMMANDS[command][0]}")
        result = module.main(rest)
    except MissingExtraError as error:  # an optional dependency is missing: say which extra installs it
        print(f"sonett {command}: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as error:  # bad input: the message names it and the fix
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"sonett {command}: error: {error}", file=sys.stderr)
        print(f"(set {TRACEBACK_VARIABLE}=1 to see where it was raised)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

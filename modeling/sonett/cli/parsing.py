"""Parsers of the `sonett` subcommands: one help style, `sonett NAME` as the usage line, and both spellings of every
flag (`--output_dir` and `--output-dir`), as transformers' `HfArgumentParser` accepts for dataclass fields."""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help (as `HfArgumentParser` shows them) and the description as written.

    A default of None or False is not shown (the help says what happens without the flag), nor one the help
    already names."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def spellings(name: str) -> list[str]:
    """`--name` with underscores and, when it has any, with dashes: `spellings("max_new_tokens")` ->
    `["--max_new_tokens", "--max-new-tokens"]`."""
    underscored = "--" + name.replace("-", "_")
    dashed = "--" + name.replace("_", "-")
    return [underscored] if dashed == underscored else [underscored, dashed]


def argument_parser(command: str, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser whose usage line reads `sonett COMMAND` (e.g. `sonett chat`)."""
    return argparse.ArgumentParser(prog=f"sonett {command}", description=description, formatter_class=HelpFormatter)


def dataclass_parser(dataclass_types: Any, command: str, description: str | None):
    """A transformers `HfArgumentParser` over `dataclass_types` whose usage line reads `sonett COMMAND`; a flag no
    dataclass has exits 2 with argparse's "unrecognized arguments" (HfArgumentParser raises a ValueError)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def parse_args_into_dataclasses(self, args=None, **kwargs) -> tuple[Any, ...]:
            if kwargs.get("return_remaining_strings"):
                return super().parse_args_into_dataclasses(args=args, **kwargs)
            *parsed, remaining = super().parse_args_into_dataclasses(args=args, return_remaining_strings=True, **kwargs)
            if remaining:
                self.error(f"unrecognized arguments: {' '.join(remaining)}")
            return tuple(parsed)

    return Parser(dataclass_types, prog=f"sonett {command}", description=description, formatter_class=HelpFormatter)

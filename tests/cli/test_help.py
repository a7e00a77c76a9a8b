"""Every `sonett` subcommand (and sub-subcommand: `train vision`, `compare lm|mqar|passkey`) answers `--help` with
exit status 0 and a `sonett NAME` usage line, has a description, and explains every flag; every flag takes both
spellings (`--output_dir` and `--output-dir`), as transformers' HfArgumentParser does for dataclass fields."""

import argparse
import contextlib
import importlib
import io

import pytest

from sonett.cli.main import COMMANDS
from sonett.cli.main import main as sonett

MODULES = {name: module for name, (module, _) in COMMANDS.items()}


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(`sonett ...` command line, its parser) for every subcommand and sub-subcommand."""
    found = []
    for name, module_name in MODULES.items():
        module = importlib.import_module(f"sonett.cli.{module_name}")
        found.append((name, module.build_parser()))
        for sub, build in getattr(module, "SUBCOMMANDS", {}).items():
            found.append((f"{name} {sub}", build()))
    return found


ALL = parsers()
COMMAND_LINES = [line for line, _ in ALL]


def run(argv: list[str]) -> tuple[int, str]:
    """`sonett ARGV` in this process: (exit status, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = sonett(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    return code, out.getvalue()


def test_the_table_names_every_job_of_the_issue():
    expected = {"train", "train-tokenizer", "finetune", "evaluate", "compare", "chat", "serve", "push", "benchmark"}
    assert expected | {"info"} == set(COMMANDS)
    assert {"train vision", "compare lm", "compare mqar", "compare passkey"} <= set(COMMAND_LINES)


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_help_exits_0_with_a_sonett_usage_line(line):
    code, output = run([*line.split(), "--help"])
    assert code == 0, output[-2000:]
    assert output.startswith(f"usage: sonett {line} "), output[:300]


@pytest.mark.parametrize(("line", "parser"), ALL, ids=COMMAND_LINES)
def test_every_flag_has_a_help_text_and_the_command_a_description(line, parser):
    assert parser.prog == f"sonett {line}"
    assert parser.description and parser.description.strip()
    silent = [
        action.option_strings or [action.dest]
        for action in parser._actions
        if action.help is not argparse.SUPPRESS and not (action.help or "").strip()
    ]
    assert not silent, f"sonett {line}: no help text for {silent}"
    parser.format_help()  # a `%` in a help text breaks here (argparse formats help texts)


@pytest.mark.parametrize(("line", "parser"), ALL, ids=COMMAND_LINES)
def test_every_flag_takes_both_spellings(line, parser):
    missing = []
    for action in parser._actions:
        flags = set(action.option_strings)
        for flag in flags:
            if not flag.startswith("--"):
                continue
            name = flag[2:]
            for other in ("--" + name.replace("-", "_"), "--" + name.replace("_", "-")):
                if other not in flags:
                    missing.append(other)
    assert not missing, f"sonett {line}: missing spellings {sorted(set(missing))}"


def test_sonett_and_compare_help_list_their_subcommands():
    code, output = run(["--help"])
    assert code == 0 and all(name in output for name in COMMANDS)
    code, output = run(["compare", "--help"])
    assert code == 0, output
    for name in ("lm", "mqar", "passkey"):
        assert f"  {name}  " in output, output
    code, output = run(["compare"])  # no comparison named: a usage error that lists them, not a traceback
    assert code == 2 and "lm" in output and "passkey" in output, output
    code, output = run(["compare", "lmm"])
    assert code == 2 and "invalid choice: 'lmm'" in output, output


def test_compare_lm_reads_output_dir_in_both_spellings(tmp_path):
    """`sonett compare lm --output-dir X` was silently ignored (a string search for `--output_dir` only)."""
    from sonett.cli.compare import LM_OUTPUT_DIR, build_lm_parser

    for flag in ("--output_dir", "--output-dir"):
        (args,) = build_lm_parser().parse_args_into_dataclasses([flag, str(tmp_path / "x"), "--max-steps", "7"])
        assert (args.output_dir, args.max_steps) == (str(tmp_path / "x"), 7)
    (args,) = build_lm_parser().parse_args_into_dataclasses([])
    assert args.output_dir == LM_OUTPUT_DIR == "runs/compare-lm"


def test_argparse_commands_read_both_spellings():
    from sonett.cli import chat, train_tokenizer

    dashed = train_tokenizer.build_parser().parse_args(["--output-dir", "tok", "--vocab-size", "300"])
    underscored = train_tokenizer.build_parser().parse_args(["--output_dir", "tok", "--vocab_size", "300"])
    assert vars(dashed) == vars(underscored) and dashed.vocab_size == 300
    args = chat.build_parser().parse_args(["folder", "--max-new-tokens", "5", "--memory-from-other-model"])
    assert (args.max_new_tokens, args.memory_from_other_model) == (5, True)

"""A mistake on the `sonett` command line ends with one clear message and exit status 1 (2 for an unknown flag, as
argparse does), not a traceback: a preset that does not exist, a model folder that would be overwritten, flags
that contradict each other, a flag a subcommand does not have."""

import contextlib
import io

import pytest

from sonett.cli.main import main as sonett


def run(argv: list[str]) -> tuple[int, str]:
    """`sonett ARGV` in this process: (exit status, stdout + stderr); an exception other than SystemExit fails."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = sonett(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    return code, out.getvalue()


def test_an_unknown_preset_is_named_with_the_presets_there_are():
    code, output = run(["train", "--config", "no-such-preset", "--max_steps", "1"])
    assert code == 1
    assert "sonett train: error: No preset 'no-such-preset'" in output and "sonett-tiny-constant" in output


def test_an_existing_model_folder_is_refused_with_both_ways_on_and_left_alone(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    code, output = run(["train", "--output_dir", str(folder), "--max_steps", "1"])
    assert code == 1
    assert f"sonett train: error: {folder} already holds a model (config.json)" in output
    assert "--output_dir" in output and "--overwrite_output_dir" in output
    assert (folder / "config.json").read_text() == '{"mine": true}'


def test_contradicting_flags_are_a_message_not_a_traceback():
    code, output = run(["train", "--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    assert code == 1 and "sonett train: error: --overwrite_output_dir and --resume_from_checkpoint contradict" in output


@pytest.mark.parametrize("command", ["train", "finetune", "compare lm", "evaluate"])
def test_a_flag_the_command_does_not_have_exits_2_naming_it(command):
    code, output = run([*command.split(), "--no_such_flag", "1"])
    assert code == 2
    assert f"sonett {command}: error: unrecognized arguments: --no_such_flag 1" in output


def test_sonett_traceback_raises_the_error_instead(monkeypatch):
    monkeypatch.setenv("SONETT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="No preset 'no-such-preset'"):
        sonett(["train", "--config", "no-such-preset", "--max_steps", "1"])

"""A `%` in a dataclass help text crashed `--help` (argparse formats help texts with `%`): `sonett train --help`,
`compare lm --help` and `scripts/stability_training.py --help` died with "unsupported format character"."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a lone `%`: not `%%` and not the `%(default)s`-style fields argparse fills in
LONE_PERCENT = re.compile(r"%(?!\()")  # searched after taking out every `%%`


def help_texts(path: Path) -> list[tuple[int, str]]:
    """The literal parts of every `"help": ...` value and `help=...` argument in a Python file, with line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        values = []
        if isinstance(node, ast.Dict):
            values = [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "help"]
        elif isinstance(node, ast.Call):
            values = [keyword.value for keyword in node.keywords if keyword.arg == "help"]
        for value in values:
            parts = value.values if isinstance(value, ast.JoinedStr) else [value]
            text = "".join(p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str))
            found.append((value.lineno, text))
    return found


def test_no_help_text_holds_a_lone_percent():
    files = [*(ROOT / "modeling" / "sonett").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    texts = {(str(path.relative_to(ROOT)), line): text for path in files for line, text in help_texts(path)}
    assert len(texts) > 50  # the scan sees the help texts
    assert any("5%%" in text for text in texts.values())  # PretrainArguments.architecture, escaped
    offenders = {where: text for where, text in texts.items() if LONE_PERCENT.search(text.replace("%%", ""))}
    assert offenders == {}, "write %% for a percent sign in a help text (argparse formats it)"


def run_help(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *command, "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )


def test_sonett_train_help_exits_0_and_shows_the_percent():
    result = run_help("-m", "sonett", "train")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(within 5%)" in " ".join(result.stdout.split()) and "--overwrite_output_dir" in result.stdout


def test_stability_training_help_exits_0():
    result = run_help(str(ROOT / "scripts" / "stability_training.py"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "--architecture" in result.stdout

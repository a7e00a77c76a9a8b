"""Every entry point answers `--help` as a newcomer calls it: exit status 0 and a usage text, never a traceback.
`python -m sonett` is the `sonett` command, and each old job script in scripts/ is a thin wrapper that still runs
its command (its usage line names `sonett COMMAND`)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from sonett.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
# scripts/classification_example.py is a README example without flags (it trains when run), so it has no --help.
SCRIPTS = sorted(path.name for path in (ROOT / "scripts").glob("*.py") if path.stem != "classification_example")
# The old job scripts, kept as wrappers of the command: script -> the `sonett` subcommand it runs.
WRAPPERS = {
    "train.py": "train",
    "train_tokenizer.py": "train-tokenizer",
    "finetune.py": "finetune",
    "evaluate.py": "evaluate",
    "compare.py": "compare",
    "chat.py": "chat",
    "serve.py": "serve",
    "push_to_hub.py": "push",
    "benchmark.py": "benchmark",
    "count_parameters.py": "info",
}
TASKS = ("lm", "mqar", "passkey")
SCRIPT_CALLS = [[str(ROOT / "scripts" / name), "--help"] for name in SCRIPTS]
SCRIPT_CALLS += [[str(ROOT / "scripts" / "compare.py"), task, "--help"] for task in TASKS]
MODULE_CALLS = [["-m", "sonett", "--help"]] + [["-m", "sonett", name, "--help"] for name in COMMANDS]

# One process runs every entry point (runpy), so the heavy imports are paid once: scripts by path, `-m sonett` as
# `python -m sonett` runs it.
RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    results = {}
    for call in json.loads(sys.argv[1]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                if call[0] == "-m":
                    sys.argv = ["sonett", *call[2:]]
                    runpy.run_module(call[1], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = call
                    runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except Exception as error:
                code = f"{type(error).__name__}: {error}"
        results[" ".join(call)] = [code, out.getvalue()[:300] + " ... " + out.getvalue()[-300:]]
    print("RESULTS " + json.dumps(results))
    """
)


def test_every_entry_point_answers_help():
    calls = SCRIPT_CALLS + MODULE_CALLS
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(calls)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    failed = {call: output for call, (code, output) in results.items() if code != 0 or "usage" not in output.lower()}
    assert not failed, failed
    for name, command in WRAPPERS.items():  # the wrapper runs its command
        output = results[f"{ROOT / 'scripts' / name} --help"][1]
        assert output.startswith(f"usage: sonett {command} "), (name, output)
    for task in TASKS:
        output = results[f"{ROOT / 'scripts' / 'compare.py'} {task} --help"][1]
        assert output.startswith(f"usage: sonett compare {task} "), output
    for name in COMMANDS:
        assert results[f"-m sonett {name} --help"][1].startswith(f"usage: sonett {name} ")

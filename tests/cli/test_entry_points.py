"""Every entry point answers `--help` as a newcomer calls it: exit status 0 and a usage text, never a traceback."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# scripts/classification_example.py is a README example without flags (it trains when run), so it has no --help.
SCRIPTS = sorted(path.name for path in (ROOT / "scripts").glob("*.py") if path.stem != "classification_example")
TASKS = ("lm", "mqar", "passkey")
HELP_CALLS = [[name, "--help"] for name in SCRIPTS] + [["compare.py", task, "--help"] for task in TASKS]

# One process runs every script's main (runpy), so the heavy imports are paid once.
RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    results = {}
    for call in json.loads(sys.argv[1]):
        sys.argv = call
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
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
    calls = [[str(ROOT / "scripts" / call[0]), *call[1:]] for call in HELP_CALLS]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(calls)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    failed = {call: output for call, (code, output) in results.items() if code != 0 or "usage" not in output.lower()}
    assert not failed, failed

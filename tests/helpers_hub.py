"""Shared by the Hub upload tests: a fake token that must reach no output, a small code corpus for the tokenizer,
the environment of a child process that may use the network, and a driver that runs `scripts/push_to_hub.py`'s
main() for several argv lists in one interpreter."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers_remote import fresh_process_env

ROOT = Path(__file__).resolve().parents[1]
PUSH_SCRIPT = ROOT / "scripts" / "push_to_hub.py"
TOKEN = "hf_dummyTokenSonettPushTest9f3k2q"  # recognisable: it must appear in no output of any process

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 8


# Runs the script's main() once per argv list in one interpreter (one import of torch instead of four).
PUSH_DRIVER = textwrap.dedent(
    """
    import json
    import sys

    sys.path.insert(0, sys.argv[1])
    from push_to_hub import main

    codes = []
    for argv in json.loads(sys.argv[2]):
        print("### push", argv, flush=True)
        print("### push", argv, file=sys.stderr, flush=True)
        codes.append(main(argv))
    print("### exit codes", json.dumps(codes))
    """
)


def online_env(home: Path, endpoint: str | None, token: str) -> dict:
    """A child environment that may use the network: offline switches off, its own empty HF_HOME."""
    env = fresh_process_env(home)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        env.pop(name, None)
    env.update(HF_TOKEN=token, HF_DEBUG="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    return env


def run_python(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd` with this checkout's package importable; output captured."""
    env = {**env, "PYTHONPATH": str(ROOT / "modeling")}  # this checkout's package, not the installed one
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True)


def run_pushes(argvs: list[list[str]], env: dict, cwd: Path) -> tuple[list[int], str]:
    """scripts/push_to_hub.py's main() once per argv list, in one child interpreter; the exit codes and the output."""
    driver = cwd / "push_driver.py"
    driver.write_text(PUSH_DRIVER)
    result = run_python([str(driver), str(PUSH_SCRIPT.parent), json.dumps(argvs)], env, cwd)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    codes = json.loads(re.search(r"### exit codes (.*)", result.stdout).group(1))
    return codes, output

#!/usr/bin/env python
"""Kept for old commands: the same as `sonett evaluate` (see `sonett evaluate --help`)."""

import sys
from pathlib import Path

# This file is named like the `evaluate` library and Python puts its folder first on sys.path, which would make
# `import evaluate` import this file: drop that folder before importing the command.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from sonett.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

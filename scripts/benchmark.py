#!/usr/bin/env python
"""Kept for old commands: the same as `sonett benchmark` (see `sonett benchmark --help`)."""

import sys

from sonett.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Kept for old commands: the same as `sonett benchmark` (see `sonett benchmark --help`)."""

import sys

from sonett.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))

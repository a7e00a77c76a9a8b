#!/usr/bin/env python
"""Kept for old commands: the same as `sonett compare` (see `sonett compare --help`)."""

import sys

from sonett.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))

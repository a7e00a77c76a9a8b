#!/usr/bin/env python
"""Kept for old commands: the same as `sonett serve` (see `sonett serve --help`)."""

import sys

from sonett.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

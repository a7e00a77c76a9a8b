#!/usr/bin/env python
"""Kept for old commands: the same as `sonett push` (see `sonett push --help`)."""

import sys

from sonett.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))

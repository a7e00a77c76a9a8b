#!/usr/bin/env python
"""Kept for old commands: the same as `sonett chat` (see `sonett chat --help`)."""

import sys

from sonett.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))

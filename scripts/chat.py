#!/usr/bin/env python
"""Kept for old commands: the same as `sonett chat` (see `sonett chat --help`)."""

import sys

from sonett.cli.chat import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Kept for old commands: the same as `sonett push` (see `sonett push --help`)."""

import sys

from sonett.cli.push import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

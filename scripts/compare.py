#!/usr/bin/env python
"""Kept for old commands: the same as `sonett compare` (see `sonett compare --help`)."""

import sys

from sonett.cli.compare import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

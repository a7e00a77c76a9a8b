#!/usr/bin/env python
"""Kept for old commands: the same as `sonett serve` (see `sonett serve --help`)."""

import sys

from sonett.cli.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Kept for old commands: the same as `sonett train` (see `sonett train --help`)."""

import sys

from sonett.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

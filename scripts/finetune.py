#!/usr/bin/env python
"""Kept for old commands: the same as `sonett finetune` (see `sonett finetune --help`)."""

import sys

from sonett.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))

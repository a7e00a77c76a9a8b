#!/usr/bin/env python
"""Kept for old commands: the same as `sonett finetune` (see `sonett finetune --help`)."""

import sys

from sonett.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Kept for old commands: the same as `sonett train-tokenizer` (see `sonett train-tokenizer --help`)."""

import sys

from sonett.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Kept for old commands: the parameter count (and state size) of every shipped preset as a Markdown table, the
same as `sonett info` with no model (see `sonett info --help`)."""

import sys

from sonett.cli.info import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

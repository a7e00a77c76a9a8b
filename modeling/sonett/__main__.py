"""`python -m sonett COMMAND ...`: the same as the `sonett` command."""

import sys

from sonett.cli.main import main

sys.exit(main())

"""`python -m data_tools.mixture`: the training-mixture planner's command (the README's spelling).

The code lives in data_tools/training_mixture.py; this module only keeps the documented command and the
`vla-mixture` entry point's old target working (build_parser: the command's flags, for tests/test_cli_flags.py). Import from data_tools.training_mixture.
"""
from __future__ import annotations

import sys

from data_tools.training_mixture import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
